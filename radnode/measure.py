"""Per-segment CT measurements (volume, mean/SD attenuation, lung LAA-950) with the concept codes writers reuse.

Values are rounded here, once, so DICOM SR and FHIR carry identical numbers.
"""

from __future__ import annotations

import numpy as np
from highdicom.sr import CodedConcept

from radnode.imaging.volume import Volume
from radnode.results import Measurement, Segment

VOLUME = CodedConcept("118565006", "SCT", "Volume")
ATTENUATION = CodedConcept("112031", "DCM", "Attenuation Coefficient")
MEAN = CodedConcept("373098007", "SCT", "Mean")
STANDARD_DEVIATION = CodedConcept("386136009", "SCT", "Standard Deviation")
LAA950 = CodedConcept("LAA950", "99RADNODE", "Lung volume fraction below -950 HU")
"""No standard DICOM/SNOMED/LOINC concept for the LAA-950 emphysema index was found; private scheme."""

MILLILITER = CodedConcept("mL", "UCUM", "milliliter")
HOUNSFIELD_UNIT = CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
PERCENT = CodedConcept("%", "UCUM", "Percent")

LAA_THRESHOLD_HU = -950.0
LUNG_KEYS = ("lung_left", "lung_right")
VOLUME_DECIMALS, HU_DECIMALS, PERCENT_DECIMALS = 1, 1, 2


def measure_ct(volume: Volume, segments: list[Segment]) -> list[Measurement]:
    """Volume (mL), mean and SD attenuation (HU) per non-empty segment; LAA-950 (%) for each lung."""
    measurements: list[Measurement] = []
    for segment in segments:
        if segment.mask.shape != volume.shape:
            raise ValueError(f"mask of {segment.structure.key} has shape {segment.mask.shape}, volume {volume.shape}")
        values = volume.array[segment.mask].astype(np.float64)
        if values.size == 0:
            continue
        key = segment.structure.key
        measurements += [
            Measurement(key, VOLUME, round(values.size * volume.voxel_volume_ml, VOLUME_DECIMALS), MILLILITER),
            Measurement(key, ATTENUATION, round(float(values.mean()), HU_DECIMALS), HOUNSFIELD_UNIT, MEAN),
            Measurement(key, ATTENUATION, round(float(values.std()), HU_DECIMALS), HOUNSFIELD_UNIT,
                        STANDARD_DEVIATION),
        ]
        if key in LUNG_KEYS:
            fraction = 100.0 * np.count_nonzero(values < LAA_THRESHOLD_HU) / values.size
            measurements.append(Measurement(key, LAA950, round(fraction, PERCENT_DECIMALS), PERCENT))
    return measurements
