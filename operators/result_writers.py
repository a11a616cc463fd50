"""Operators that write a pipeline's results as DICOM SEG and TID 1500 SR (the report stage writes the rest).

File names and series numbers come from the output layout (:mod:`radnode.outputs.layout`), which the node's
egress and the MAP manifests read too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from holoscan.core import ExecutionContext, InputContext, Operator, OperatorSpec, OutputContext
from pydicom import Dataset

from radnode.execution import parent_alive, run_in_child, timed_phase
from radnode.imaging.volume import Volume
from radnode.outputs.algorithm import AlgorithmInfo
from radnode.outputs.layout import RunOutput
from radnode.outputs.seg import build_segmentation, plan_segmentation, segmentation_header
from radnode.outputs.sr import build_measurement_report
from radnode.results import PipelineResult

log = logging.getLogger(__name__)


def _write_atomically(path: Path, write: Callable[[Path], object], keep: Callable[[], bool] = lambda: True) -> None:
    """Write through a temporary name so a reader never sees half a file; dropped instead when ``keep()`` says
    the run it belongs to has ended meanwhile (RuntimeError)."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    if not keep():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{path.name} not kept: the run it was written for has ended")
    tmp.replace(path)


class _WriterOperator(Operator):
    """Shared settings of the result writers: where files go, the algorithm and the UID root."""

    def __init__(self, fragment, *args, output_folder: Path, algorithm: AlgorithmInfo, uid_root: str, **kwargs):
        self.output_folder = Path(output_folder)
        self.algorithm = algorithm
        self.uid_root = uid_root
        super().__init__(fragment, *args, **kwargs)


class SegmentationWriterOperator(_WriterOperator):
    """Writes the segments as a binary DICOM SEG on the source series' frame of reference.

    The SEG's UIDs and segment descriptions are decided first and passed on at once (its header, no frames), so
    the SR and the report, which only reference the SEG, are written while a child process encodes and saves its
    frames (:func:`radnode.execution.run_in_child`, phase ``write_seg``): the same file, on another core."""

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.input("result")
        spec.output("seg")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        header = write_segmentation(self.fragment, op_input.receive("volume"), op_input.receive("result"),
                                    self.output_folder, self.algorithm, self.uid_root)
        op_output.emit(header, "seg")


def write_segmentation(app: object, volume: Volume, result: PipelineResult, output_folder: Path,
                       algorithm: AlgorithmInfo, uid_root: str) -> Dataset:
    """Start writing ``result``'s SEG into ``output_folder`` as phase ``write_seg`` of ``app``'s run, in a child
    process where that pays; returns its header (:func:`radnode.outputs.seg.segmentation_header`) at once."""
    plan = plan_segmentation(volume, result.segments, algorithm, uid_root=uid_root,
                             series_number=RunOutput.SEG.series_number)
    output_folder.mkdir(parents=True, exist_ok=True)
    path, parent = output_folder / RunOutput.SEG.file, os.getpid()

    def write() -> None:
        seg = build_segmentation(volume, result.segments, algorithm, uid_root=uid_root, plan=plan)
        _write_atomically(path, seg.save_as, keep=lambda: os.getpid() == parent or parent_alive(parent))
        log.info("wrote %s (%d segments, %d frames)", RunOutput.SEG.file, len(result.segments), seg.NumberOfFrames)

    run_in_child(app, "write_seg", write)
    return segmentation_header(volume, plan)


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
