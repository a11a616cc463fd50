"""Per-segment CT measurements (volume, mean/SD attenuation, lung LAA-950) with the concept codes writers reuse.

Values are rounded here, once, so DICOM SR and FHIR carry identical numbers.
"""

from __future__ import annotations

import numpy as np
from highdicom.sr import CodedConcept

from radnode.imaging.slabs import map_slabs, slab_bounds
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
    for segment in segments:
        if segment.shape != volume.shape:
            raise ValueError(f"mask of {segment.structure.key} has shape {segment.shape}, volume {volume.shape}")
    statistics = _segment_statistics(volume.array, segments)
    measurements: list[Measurement] = []
    for segment, (count, total, squares, below) in zip(segments, statistics):
        if count == 0:
            continue
        key = segment.structure.key
        mean = total / count
        std = float(np.sqrt(max((count * squares - total * total) / (count * count), 0)))
        measurements += [
            Measurement(key, VOLUME, round(count * volume.voxel_volume_ml, VOLUME_DECIMALS), MILLILITER),
            Measurement(key, ATTENUATION, round(mean, HU_DECIMALS), HOUNSFIELD_UNIT, MEAN),
            Measurement(key, ATTENUATION, round(std, HU_DECIMALS), HOUNSFIELD_UNIT, STANDARD_DEVIATION),
        ]
        if key in LUNG_KEYS:
            measurements.append(Measurement(key, LAA950, round(100.0 * below / count, PERCENT_DECIMALS), PERCENT))
    return measurements


def _segment_statistics(values: np.ndarray, segments: list[Segment]) -> list[tuple[int | float, ...]]:
    """Per segment: voxel count, sum, sum of squares and voxels below −950 HU, gathered slab by slab on all
    cores (a slab's selection in memory, never a segment's). On whole-number HU the sums are exact integers,
    kept as Python integers: mean and variance, (n·Σx² − (Σx)²) / n², come out correctly rounded."""
    exact = values.dtype.kind in "iu"

    def slab(z: slice) -> np.ndarray:
        sums = np.zeros((len(segments), 4), dtype=np.int64 if exact else np.float64)
        hu = values[z]
        for row, segment in zip(sums, segments):
            selected = hu[segment.labels[z] if not segment.shares_labels else segment.labels[z] == segment.value]
            wide = selected.astype(np.int64 if exact else np.float64)
            row[:] = (len(wide), wide.sum(), np.dot(wide, wide), np.count_nonzero(selected < LAA_THRESHOLD_HU))
        return sums

    totals = np.sum(map_slabs(slab, slab_bounds(len(values), int(np.prod(values.shape[1:])))), axis=0)
    return [tuple(v.item() for v in row) for row in totals]
