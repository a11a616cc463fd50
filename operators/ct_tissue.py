"""Operators for the model-free CT tissue pipeline: segmentation and measurements."""

from __future__ import annotations

import logging

from holoscan.core import ExecutionContext, InputContext, Operator, OperatorSpec, OutputContext

from radnode.execution import timed_phase
from radnode.imaging.ct_tissue import assess_scanned_range, segment_ct_tissues
from radnode.measure import measure_ct
from radnode.results import PipelineResult
from radnode.operators.measurement import MeasurementOperator

log = logging.getLogger(__name__)


class CTTissueSegmentationOperator(Operator):
    """Segments body, lungs, bone, adipose tissue and skeletal muscle by thresholds and morphology."""

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.output("segments")

    @timed_phase("segment")
    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        segments = segment_ct_tissues(op_input.receive("volume"))
        log.info("segmented %s", ", ".join(f"{s.structure.key} ({s.voxel_count()} voxels)" for s in segments))
        op_output.emit(segments, "segments")


class CTMeasurementOperator(MeasurementOperator):
    """Measures volume, attenuation and the lung emphysema index per segment the scanned range can report
    (:func:`radnode.imaging.ct_tissue.assess_scanned_range`: no lungs on a head CT, no body composition off
    the trunk); what it cannot report goes into the result as not assessed, with the reason. The last reader
    of the voxels: it hands the writers the volume's ``geometry`` (no voxels), so the HU array is freed once
    it is done."""

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.input("segments")
        spec.output("result")
        spec.output("geometry")

    @timed_phase("measure")
    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        volume = op_input.receive("volume")
        segments, not_assessed = assess_scanned_range(volume, op_input.receive("segments"),
                                                      str(volume.study.get("BodyPartExamined", "") or ""))
        for item in not_assessed:
            log.info("not assessed: %s (%s)", item.what, item.reason)
        result = PipelineResult(segments=segments, measurements=measure_ct(volume, segments),
                                algorithm_name=self.algorithm.name, algorithm_version=self.algorithm.version,
                                not_assessed=not_assessed)
        op_output.emit(result, "result")
        op_output.emit(volume.geometry(), "geometry")
