"""Operators that write a pipeline's results as DICOM SEG and TID 1500 SR (the report stage writes the rest).

File names and series numbers come from the output layout (:mod:`radnode.outputs.layout`), which the node's
egress and the MAP manifests read too.
"""

from __future__ import annotations

import logging
from pathlib import Path

from holoscan.core import ExecutionContext, InputContext, Operator, OperatorSpec, OutputContext

from radnode.execution import timed_phase
from radnode.outputs.algorithm import AlgorithmInfo
from radnode.outputs.layout import RunOutput
from radnode.outputs.seg import build_segmentation
from radnode.outputs.sr import build_measurement_report

log = logging.getLogger(__name__)


def _write_atomically(path: Path, write) -> None:
    """Write through a temporary name so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


class _WriterOperator(Operator):
    """Shared settings of the result writers: where files go, the algorithm and the UID root."""

    def __init__(self, fragment, *args, output_folder: Path, algorithm: AlgorithmInfo, uid_root: str, **kwargs):
        self.output_folder = Path(output_folder)
        self.algorithm = algorithm
        self.uid_root = uid_root
        super().__init__(fragment, *args, **kwargs)


class SegmentationWriterOperator(_WriterOperator):
    """Writes the segments as a binary DICOM SEG on the source series' frame of reference."""

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.input("result")
        spec.output("seg")

    @timed_phase("write_seg")
    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        volume = op_input.receive("volume")
        result = op_input.receive("result")
        seg = build_segmentation(volume, result.segments, self.algorithm, uid_root=self.uid_root,
                                 series_number=RunOutput.SEG.series_number)
        self.output_folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.output_folder / RunOutput.SEG.file, seg.save_as)
        log.info("wrote %s (%d segments)", RunOutput.SEG.file, len(result.segments))
        op_output.emit(seg, "seg")


class MeasurementReportWriterOperator(_WriterOperator):
    """Writes the measurements as a TID 1500 Comprehensive 3D SR referencing the SEG's segments and, with
    ``with_parametric_map``, the uncertainty Parametric Map its uncertainty scores were measured on."""

    def __init__(self, fragment, *args, with_parametric_map: bool = False, **kwargs):
        self.with_parametric_map = with_parametric_map
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.input("seg")
        spec.input("result")
        if self.with_parametric_map:
            spec.input("pmap")
        spec.output("sr")

    @timed_phase("write_sr")
    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        volume = op_input.receive("volume")
        seg = op_input.receive("seg")
        result = op_input.receive("result")
        pmap = op_input.receive("pmap") if self.with_parametric_map else None
        sr = build_measurement_report(volume, seg, result, self.algorithm, uid_root=self.uid_root,
                                      series_number=RunOutput.MEASUREMENT_SR.series_number, parametric_map=pmap)
        _write_atomically(self.output_folder / RunOutput.MEASUREMENT_SR.file, sr.save_as)
        log.info("wrote %s (%d measurements)", RunOutput.MEASUREMENT_SR.file, len(result.measurements))
        op_output.emit(sr, "sr")
