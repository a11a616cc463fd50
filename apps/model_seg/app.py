"""Segmentation by the site's own model as a MONAI Deploy application.

DICOM folder → the largest volume series of the model's modality (``input.modality``, CT unless the model
says otherwise; only series meeting its ``input.series`` condition) → preprocessing to the model's grid (GPU
with CuPy, else NumPy) → sliding-window inference (samples: ensemble members × mirrors × Monte Carlo
dropout) → consensus segments and uncertainty on the source grid → segment volumes → DICOM SEG, TID 1500
SR, FHIR Bundle and an uncertainty Parametric Map.

The model folder is a MONAI bundle or a TorchScript file with a ``model.yaml``; it comes from ``--model DIR``
(``radnode run``; repeated: an ensemble) or ``HOLOSCAN_MODEL_PATH`` (the MAP contract: the node's
subprocess and container executors set it from ``processing.models``, a MAP image has its models in
``/opt/holoscan/models``), which may also be a folder of model folders (an ensemble). It is loaded and
probed while composing, so a missing or wrong model fails before any study is read, with the message of
``radnode models check``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from holoscan.conditions import CountCondition
from holoscan.core import Application

import radnode
from radnode.config import config_from_environment
from radnode.execution import app_model_folders, app_paths
from radnode.imaging.mri import MR_VOLUME_CRITERIA
from radnode.imaging.series import Series, VolumeCriteria
from radnode.models.inference import InferenceOptions
from radnode.models.loading import load_models
from radnode.models.spec import ModelSpec
from radnode.operators.dicom_input import (
    SeriesToVolumeOperator,
    StudyFolderLoaderOperator,
    VolumeSeriesSelectorOperator,
)
from radnode.operators.inference import (
    ModelPostprocessOperator,
    SegmentVolumeMeasurementOperator,
    SlidingWindowInferenceOperator,
)
from radnode.operators.preprocess import ModelPreprocessOperator
from radnode.operators.report import add_result_writers
from radnode.outputs.algorithm import AlgorithmInfo
from radnode.pipelines.conditions import condition_problem

log = logging.getLogger(__name__)

SERIES_CRITERIA = {
    "CT": VolumeCriteria(),
    "MR": replace(MR_VOLUME_CRITERIA, min_slices=VolumeCriteria().min_slices),
}
"""Which series can feed a model, by its modality: the CT pipeline's axial CT volume; the MR pipeline's MR
volume in any orientation, but from as few slices as a CT (models read 2D-acquired stacks too)."""

INFERENCE = InferenceOptions(mirror_tta=True, mc_dropout_passes=2)
"""Uncertainty samples: every mirror, and two Monte Carlo dropout passes when the network has dropout."""


def series_selection(spec: ModelSpec) -> tuple[VolumeCriteria, Callable[[Series], str | None] | None]:
    """The volume criteria of the model's modality and its ``input.series`` condition as a series check."""
    condition = spec.series
    if condition is None:
        return SERIES_CRITERIA[spec.modality], None

    def check(series: Series) -> str | None:
        problem = condition_problem(condition, series.first)
        return f"{series.describe()}: not the series {spec.name} reads ({problem})" if problem else None

    return SERIES_CRITERIA[spec.modality], check


class ModelSegApp(Application):
    """The site's model folder on the study's volume series: segments, their volumes, an uncertainty map."""

    name = "model_seg"
    description = "Your own model folder (MONAI bundle, TorchScript + model.yaml): segments, volumes, uncertainty"
    version = radnode.__version__

    def compose(self) -> None:
        argv = list(self.argv)
        input_folder, output_folder = app_paths(self.name, argv)
        folders = app_model_folders(self.name, argv)
        model = load_models(folders)  # probed: a wrong folder fails here, before the study is read
        config = config_from_environment()
        log.info("model_seg: %s %s (%s, %d network(s) from %s), input %s, output %s", model.spec.name,
                 model.spec.version, model.kind, len(model.networks), ", ".join(map(str, folders)), input_folder,
                 output_folder)
        algorithm = AlgorithmInfo(name=model.spec.name, version=model.spec.version)
        criteria, series_check = series_selection(model.spec)

        loader = StudyFolderLoaderOperator(self, CountCondition(self, 1), input_folder=input_folder, name="loader")
        selector = VolumeSeriesSelectorOperator(self, criteria=criteria, series_check=series_check,
                                                name="series_selector")
        to_volume = SeriesToVolumeOperator(self, name="series_to_volume")
        prepare = ModelPreprocessOperator(self, model_spec=model.spec, name="preprocess")
        infer = SlidingWindowInferenceOperator(self, model=model, options=INFERENCE, name="inference")
        post = ModelPostprocessOperator(self, model=model, thresholds=config.uncertainty.thresholds(),
                                        name="postprocess")
        measure = SegmentVolumeMeasurementOperator(self, algorithm=algorithm, name="measurements")

        self.add_flow(loader, selector, {("study", "study")})
        self.add_flow(selector, to_volume, {("series", "series")})
        self.add_flow(to_volume, prepare, {("volume", "volume")})
        self.add_flow(prepare, infer, {("prepared", "prepared")})
        self.add_flow(infer, post, {("prepared_out", "prepared"), ("samples", "samples")})
        self.add_flow(to_volume, measure, {("volume", "volume")})
        self.add_flow(post, measure, {("extraction", "extraction")})
        add_result_writers(self, to_volume, measure, output_folder=output_folder, algorithm=algorithm,
                           uid_root=config.uid_root, report_config=config.report, fhir_config=config.fhir,
                           uncertainty_map=True)
