"""The MRI brain pipeline as a MONAI Deploy application.

DICOM folder → 3D T1 series selection (reasons for every skipped series) → volume → deepbet brain
extraction with test-time augmentation (mirror, rotations, scaling, shifts, gamma) → intracranial and brain-parenchyma volumes plus
uncertainty scores and the brain parenchymal fraction → DICOM SEG, uncertainty Parametric Map, TID 1500 SR,
and the report (SR, text, PDF, FHIR DiagnosticReport with the BPF against its age-dependent reference).
The networks are loaded while composing, so missing weights fail before any study is read.
"""

from __future__ import annotations

import logging

from holoscan.conditions import CountCondition
from holoscan.core import Application

import radnode
from radnode.config import config_from_environment
from radnode.execution import app_paths
from radnode.operators.brain import BrainExtractionOperator, BrainMeasurementOperator, T1SeriesSelectorOperator
from radnode.operators.dicom_input import SeriesToVolumeOperator, StudyFolderLoaderOperator
from radnode.operators.report import add_result_writers
from radnode.outputs.algorithm import AlgorithmInfo

log = logging.getLogger(__name__)

ALGORITHM = AlgorithmInfo(name="radnode MRI brain (deepbet)", version=radnode.__version__)


class MRIBrainApp(Application):
    """Brain extraction on a 3D T1-weighted MRI; reports intracranial and brain volumes with uncertainty."""

    name = "mri_brain"
    description = "MRI T1 brain extraction (deepbet): intracranial and brain volumes, uncertainty map"
    version = radnode.__version__

    def compose(self) -> None:
        input_folder, output_folder = app_paths(self.name, list(self.argv))
        config = config_from_environment()
        log.info("mri_brain: input %s, output %s", input_folder, output_folder)

        loader = StudyFolderLoaderOperator(self, CountCondition(self, 1), input_folder=input_folder, name="loader")
        selector = T1SeriesSelectorOperator(self, name="t1_selector")
        to_volume = SeriesToVolumeOperator(self, name="series_to_volume")
        extract = BrainExtractionOperator(self, thresholds=config.uncertainty.thresholds(), name="brain_extraction")
        measure = BrainMeasurementOperator(self, algorithm=ALGORITHM, name="measurements")

        self.add_flow(loader, selector, {("study", "study")})
        self.add_flow(selector, to_volume, {("series", "series")})
        self.add_flow(to_volume, extract, {("volume", "volume")})
        self.add_flow(to_volume, measure, {("volume", "volume")})
        self.add_flow(extract, measure, {("extraction", "extraction")})
        add_result_writers(self, to_volume, measure, output_folder=output_folder, algorithm=ALGORITHM,
                           uid_root=config.uid_root, report_config=config.report, fhir_config=config.fhir,
                           uncertainty_map=True)
