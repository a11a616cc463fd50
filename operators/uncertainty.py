"""Operator writing a result's voxel-wise uncertainty as a DICOM Parametric Map next to the SEG and SR, and the
output stage every pipeline with uncertainty shares."""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import Application, ExecutionContext, InputContext, Operator, OperatorSpec, OutputContext

from radnode.operators.result_writers import (
    FhirReportWriterOperator,
    MeasurementReportWriterOperator,
    SegmentationWriterOperator,
    _write_atomically,
)
from radnode.outputs.algorithm import AlgorithmInfo
from radnode.outputs.layout import RunOutput
from radnode.outputs.pmap import build_uncertainty_map

log = logging.getLogger(__name__)


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
                                     anatomic_region=result.segments[0].structure.property_type,
                                     series_number=RunOutput.UNCERTAINTY_MAP.series_number)
        self.output_folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.output_folder / RunOutput.UNCERTAINTY_MAP.file, pmap.save_as)
        log.info("wrote %s (%s, %d samples)", RunOutput.UNCERTAINTY_MAP.file, report.method, report.n_samples)


def add_uncertain_result_writers(app: Application, volume_source: Operator, result_source: Operator, *,
                                 output_folder: Path, algorithm: AlgorithmInfo, uid_root: str) -> None:
    """The output stage of a pipeline whose result carries uncertainty: DICOM SEG → TID 1500 SR → FHIR Bundle,
    and the uncertainty Parametric Map; each takes ``volume`` from ``volume_source`` and ``result`` from
    ``result_source``."""
    writers = dict(output_folder=output_folder, algorithm=algorithm, uid_root=uid_root)
    seg_writer = SegmentationWriterOperator(app, name="seg_writer", **writers)
    sr_writer = MeasurementReportWriterOperator(app, name="sr_writer", **writers)
    fhir_writer = FhirReportWriterOperator(app, name="fhir_writer", **writers)
    pmap_writer = UncertaintyMapWriterOperator(app, name="pmap_writer", **writers)
    for writer in (seg_writer, sr_writer, fhir_writer, pmap_writer):
        app.add_flow(volume_source, writer, {("volume", "volume")})
        app.add_flow(result_source, writer, {("result", "result")})
    app.add_flow(seg_writer, sr_writer, {("seg", "seg")})
    app.add_flow(sr_writer, fhir_writer, {("sr", "sr")})
