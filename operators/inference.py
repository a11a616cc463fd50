"""Operators running a model folder's network(s): sliding-window inference with uncertainty samples,
results mapped back to the source grid, and per-segment volumes for the writers."""

from __future__ import annotations

import logging

from holoscan.core import ExecutionContext, InputContext, Operator, OperatorSpec, OutputContext

from radnode.config import config_from_environment
from radnode.measure import MILLILITER, VOLUME
from radnode.models.inference import InferenceOptions, postprocess, predict_samples, segment_volumes
from radnode.models.loading import LoadedModel
from radnode.results import Measurement
from radnode.uncertainty import UncertainPipelineResult, UncertaintyThresholds
from radnode.operators.measurement import MeasurementOperator

log = logging.getLogger(__name__)


class SlidingWindowInferenceOperator(Operator):
    """Softmax samples from every ensemble member, mirror and dropout pass (mixed precision on CUDA)."""

    def __init__(self, fragment, *args, model: LoadedModel, options: InferenceOptions = InferenceOptions(),
                 **kwargs):
        self.model = model
        self.options = options
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("prepared")
        spec.output("prepared_out")
        spec.output("samples")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        prepared = op_input.receive("prepared")
        samples, method = predict_samples(self.model, prepared, self.options)
        log.info("%d samples (%s) on %s", len(samples), method, self.model.device)
        op_output.emit(prepared, "prepared_out")
        op_output.emit((samples, method), "samples")


class ModelPostprocessOperator(Operator):
    """Samples → source grid, consensus segments, uncertainty map and per-segment scores."""

    def __init__(self, fragment, *args, model: LoadedModel, thresholds: UncertaintyThresholds | None = None,
                 **kwargs):
        """``thresholds``: when the study is flagged for review; default the node's ``uncertainty`` settings
        (the configuration in $RADNODE_CONFIG)."""
        self.model = model
        self.thresholds = thresholds or config_from_environment().uncertainty.thresholds()
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("prepared")
        spec.input("samples")
        spec.output("extraction")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        prepared = op_input.receive("prepared")
        samples, method = op_input.receive("samples")
        op_output.emit(postprocess(samples, prepared, self.model.spec, method, self.thresholds), "extraction")


class SegmentVolumeMeasurementOperator(MeasurementOperator):
    """Segment volumes plus uncertainty scores as one result; a flagged study is logged as such."""

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.input("extraction")
        spec.output("result")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        volume = op_input.receive("volume")
        extraction = op_input.receive("extraction")
        uncertainty = extraction.uncertainty
        segments = [s for s in extraction.segments if s.mask.any()]
        volumes = segment_volumes(volume, segments)
        if not segments:  # nothing found is a result too: every segment empty, 0 mL, instead of no SEG at all
            log.info("no segment has any voxel: %s", ", ".join(s.structure.key for s in extraction.segments))
            segments = list(extraction.segments)
            volumes = [Measurement(s.structure.key, VOLUME, 0.0, MILLILITER) for s in segments]
        if uncertainty.needs_review:
            log.warning("flagged for human review: %s", "; ".join(uncertainty.review_reasons))
        op_output.emit(UncertainPipelineResult(
            segments=segments,
            measurements=volumes + [m for m in uncertainty.measurements()
                                    if any(s.structure.key == m.structure_key for s in segments)],
            algorithm_name=self.algorithm.name, algorithm_version=self.algorithm.version,
            notes=uncertainty.review_reasons, uncertainty=uncertainty,
        ), "result")
