"""Operator writing a result's voxel-wise uncertainty as a DICOM Parametric Map next to the SEG and SR."""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import ExecutionContext, InputContext, Operator, OperatorSpec, OutputContext

from radnode.outputs.algorithm import AlgorithmInfo
from radnode.outputs.pmap import build_uncertainty_map

log = logging.getLogger(__name__)

PMAP_FILE = "uncertainty-map.dcm"


class UncertaintyMapWriterOperator(Operator):
    """Writes ``result.uncertainty.map`` as a float Parametric Map on the source series' geometry."""

    def __init__(self, fragment, *args, output_folder: Path, algorithm: AlgorithmInfo, uid_root: str, **kwargs):
        self.output_folder = Path(output_folder)
        self.algorithm = algorithm
        self.uid_root = uid_root
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.input("result")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        volume = op_input.receive("volume")
        result = op_input.receive("result")
        report = result.uncertainty
        # The map covers the region of the first (outermost) segment, e.g. the intracranial contents.
        pmap = build_uncertainty_map(volume, report, self.algorithm, uid_root=self.uid_root,
                                     anatomic_region=result.segments[0].structure.property_type)
        self.output_folder.mkdir(parents=True, exist_ok=True)
        target = self.output_folder / PMAP_FILE
        tmp = target.with_name(f".{PMAP_FILE}.tmp")
        pmap.save_as(tmp)
        tmp.replace(target)
        log.info("wrote %s (%s, %d samples)", PMAP_FILE, report.method, report.n_samples)
