"""Operator writing a result's voxel-wise uncertainty as a DICOM Parametric Map next to the SEG and SR."""

from __future__ import annotations

import logging

from holoscan.core import ExecutionContext, InputContext, OperatorSpec, OutputContext

from radnode.execution import timed_phase
from radnode.operators.result_writers import _write_atomically, _WriterOperator
from radnode.outputs.layout import RunOutput
from radnode.outputs.pmap import build_uncertainty_map

log = logging.getLogger(__name__)


class UncertaintyMapWriterOperator(_WriterOperator):
    """Writes ``result.uncertainty.map`` as a float Parametric Map on the source series' geometry and emits it,
    so the measurement SR can name it as the source of the uncertainty scores."""

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.input("result")
        spec.output("pmap")

    @timed_phase("write_pmap")
    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        volume = op_input.receive("volume")
        result = op_input.receive("result")
        report = result.uncertainty
        # The map covers the region of the first (outermost) segment, e.g. the intracranial contents.
        pmap = build_uncertainty_map(volume, report, self.algorithm, uid_root=self.uid_root,
                                     anatomic_region=result.segments[0].structure.property_type,
                                     series_number=RunOutput.UNCERTAINTY_MAP.series_number)
        self.output_folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.output_folder / RunOutput.UNCERTAINTY_MAP.file, pmap.save_as)
        log.info("wrote %s (%s, %d samples)", RunOutput.UNCERTAINTY_MAP.file, report.method, report.n_samples)
        op_output.emit(pmap, "pmap")
