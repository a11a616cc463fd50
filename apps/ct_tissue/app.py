"""The embedded default pipeline: CT tissue segmentation and measurements as a MONAI Deploy application.

Runs anywhere (no model, no GPU): DICOM folder → series selection → volume → tissue segmentation →
measurements → DICOM SEG, TID 1500 SR and FHIR Bundle in the output folder. Inputs and outputs follow
the MAP contract (``--input/--output`` or HOLOSCAN_INPUT_PATH / HOLOSCAN_OUTPUT_PATH).
"""

from __future__ import annotations

import logging

from holoscan.core import Application
from holoscan.conditions import CountCondition
from pydicom.sr.codedict import codes

import radnode
from radnode.config import config_from_environment
from radnode.execution import app_paths
from radnode.imaging.series import CT_IMAGE_STORAGE, VolumeCriteria
from radnode.operators.ct_tissue import CTMeasurementOperator, CTTissueSegmentationOperator
from radnode.operators.dicom_input import (
    SeriesToVolumeOperator,
    StudyFolderLoaderOperator,
    VolumeSeriesSelectorOperator,
)
from radnode.operators.report import add_result_writers
from radnode.outputs.algorithm import AlgorithmInfo

log = logging.getLogger(__name__)

# Thresholds and morphology, not a learned model: the SEG says so in its algorithm family (CID 7162).
ALGORITHM = AlgorithmInfo(name="radnode CT tissue", version=radnode.__version__,
                          family=codes.cid7162.MorphologicalOperations)
CRITERIA = VolumeCriteria(modality="CT", sop_classes=(CT_IMAGE_STORAGE,), min_slices=10)


class CTTissueApp(Application):
    """Segments body, lungs, bone, fat and muscle on an axial CT and reports volumes and attenuation."""

    name = "ct_tissue"
    description = "CT tissue segmentation (body, lungs, bone, adipose tissue, skeletal muscle) with measurements"
    version = radnode.__version__

    def compose(self) -> None:
        input_folder, output_folder = app_paths(self.name, list(self.argv))
        config = config_from_environment()
        log.info("ct_tissue: input %s, output %s", input_folder, output_folder)

        loader = StudyFolderLoaderOperator(self, CountCondition(self, 1), input_folder=input_folder, name="loader")
        selector = VolumeSeriesSelectorOperator(self, criteria=CRITERIA, name="series_selector")
        to_volume = SeriesToVolumeOperator(self, name="series_to_volume")
        segment = CTTissueSegmentationOperator(self, name="tissue_segmentation")
        measure = CTMeasurementOperator(self, algorithm=ALGORITHM, name="measurements")

        self.add_flow(loader, selector, {("study", "study")})
        self.add_flow(selector, to_volume, {("series", "series")})
        self.add_flow(to_volume, segment, {("volume", "volume")})
        self.add_flow(to_volume, measure, {("volume", "volume")})
        self.add_flow(segment, measure, {("segments", "segments")})
        # the writers need slices and positions, not voxels: they take the geometry from measure, the last
        # reader of the HU array, which is freed from then on
        add_result_writers(self, measure, measure, volume_port="geometry", output_folder=output_folder,
                           algorithm=ALGORITHM, uid_root=config.uid_root, report_config=config.report,
                           fhir_config=config.fhir)
