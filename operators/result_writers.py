"""Operators that write a pipeline's results as DICOM SEG and TID 1500 SR (the report stage writes the rest).

File names in the output folder are fixed (``seg.dcm``, ``sr.dcm``, ``fhir-bundle.json``) so the
node's egress and the MAP contract find them without guessing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from holoscan.core import ExecutionContext, InputContext, Operator, OperatorSpec, OutputContext

from radnode.execution import timed_phase
from radnode.outputs.algorithm import AlgorithmInfo
from radnode.outputs.seg import build_segmentation
from radnode.outputs.sr import build_measurement_report

log = logging.getLogger(__name__)

SEG_FILE = "seg.dcm"
SR_FILE = "sr.dcm"
FHIR_FILE = "fhir-bundle.json"


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
        seg = build_segmentation(volume, result.segments, self.algorithm, uid_root=self.uid_root)
        self.output_folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.output_folder / SEG_FILE, seg.save_as)
        log.info("wrote %s (%d segments)", SEG_FILE, len(result.segments))
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
                                      parametric_map=pmap)
        _write_atomically(self.output_folder / SR_FILE, sr.save_as)
        log.info("wrote %s (%d measurements)", SR_FILE, len(result.measurements))
        op_output.emit(sr, "sr")
