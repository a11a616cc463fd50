"""Operators of the MRI brain pipeline: 3D T1 series selection, brain extraction and brain volumetry."""

from __future__ import annotations

import logging
from pathlib import Path

from holoscan.core import ExecutionContext, InputContext, Operator, OperatorSpec, OutputContext

from radnode.imaging.brain import brain_parenchymal_fraction, extract_brain
from radnode.models.inference import segment_volumes
from radnode.imaging.mri import select_t1_series
from radnode.models.deepbet import load_deepbet
from radnode.uncertainty import UncertainPipelineResult, UncertaintyThresholds
from radnode.operators.measurement import MeasurementOperator

log = logging.getLogger(__name__)


class T1SeriesSelectorOperator(Operator):
    """Chooses the 3D T1-weighted series by its acquisition attributes and logs why others were skipped."""

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study")
        spec.output("series")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        series, skipped = select_t1_series(op_input.receive("study"))
        log.info("selected %s", series.describe())
        for reason in skipped:
            log.info("skipped %s", reason)
        op_output.emit(series, "series")


class BrainExtractionOperator(Operator):
    """Brain mask (deepbet) with test-time augmentation (radnode.imaging.brain); the networks load when the app is composed,
    so missing or wrong weights stop the run before any study is read."""

    def __init__(self, fragment, *args, model_folder: Path | None = None,
                 thresholds: UncertaintyThresholds = UncertaintyThresholds(), **kwargs):
        self.models = load_deepbet(model_folder)
        self.thresholds = thresholds
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.output("extraction")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        extraction = extract_brain(op_input.receive("volume"), self.models, limits=self.thresholds)
        log.info("brain extraction: %s", ", ".join(f"{s.structure.key} {int(s.mask.sum())} voxels"
                                                   for s in extraction.segments))
        op_output.emit(extraction, "extraction")


class BrainMeasurementOperator(MeasurementOperator):
    """Intracranial and brain volumes, the brain parenchymal fraction and the uncertainty scores, as one result
    for the writers."""

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.input("extraction")
        spec.output("result")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        volume = op_input.receive("volume")
        extraction = op_input.receive("extraction")
        uncertainty = extraction.uncertainty
        volumes = segment_volumes(volume, extraction.segments)
        result = UncertainPipelineResult(
            segments=extraction.segments,
            measurements=volumes + brain_parenchymal_fraction(volumes) + uncertainty.measurements(),
            algorithm_name=self.algorithm.name, algorithm_version=self.algorithm.version,
            notes=uncertainty.review_reasons, uncertainty=uncertainty,
        )
        if uncertainty.needs_review:
            log.warning("flagged for human review: %s", "; ".join(uncertainty.review_reasons))
        op_output.emit(result, "result")
