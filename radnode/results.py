"""What a pipeline produces before it is written out: coded structures, masks and measurements.

Writers (SEG, SR, FHIR) all read these same objects, so the numbers in every output are identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from highdicom.sr import CodedConcept


@dataclass(frozen=True)
class Structure:
    """An anatomical structure or tissue a segment stands for, coded in SNOMED CT."""

    key: str
    """Stable machine name, e.g. ``lung_left``."""
    label: str
    """Human label, e.g. ``Left lung``."""
    category: CodedConcept
    """Segmented Property Category (e.g. SCT 91723000 Anatomical structure, 85756007 Tissue)."""
    property_type: CodedConcept
    """Segmented Property Type (e.g. SCT 44029006 Left lung)."""
    laterality: CodedConcept | None = None
    color_rgb: tuple[int, int, int] = (255, 0, 0)


class Segment:
    """One segment over the volume grid: the voxels of ``labels`` equal to ``value``.

    ``labels`` is the segment's own bool mask (``value`` 1), or a label map (unsigned integers) the segment
    shares with the other segments of its result that it never overlaps: one byte per voxel for all of them
    instead of one per segment, which is what lets a 600-slice CT fit in a few times its pixel data. Segments
    may overlap across masks (e.g. the body, a mask of its own, contains the organs of a label map).
    """

    def __init__(self, structure: Structure, labels: np.ndarray, value: int = 1) -> None:
        if labels.dtype != bool and labels.dtype.kind != "u":
            raise TypeError(f"segment {structure.key!r}: a mask is bool or a label map of unsigned integers, "
                            f"not {labels.dtype}")
        if labels.dtype == bool and value != 1:
            raise ValueError(f"segment {structure.key!r}: a bool mask is the segment's own (value 1)")
        self.structure = structure
        self.labels = labels
        self.value = int(value)

    def __repr__(self) -> str:
        return f"Segment({self.structure.key!r}, {self.labels.dtype}{list(self.labels.shape)}, value={self.value})"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.labels.shape)

    @property
    def shares_labels(self) -> bool:
        """True for a segment of a label map (its mask is computed on demand), False for its own bool mask."""
        return self.labels.dtype != bool

    @property
    def mask(self) -> np.ndarray:
        """bool (n_slices, rows, columns). A label-map segment's mask is a new array each time (one byte per
        voxel): prefer :meth:`slice_mask`, :meth:`slice_counts` and :meth:`voxel_count` where they do."""
        if not self.shares_labels:
            return self.labels
        return self.labels == self.value

    @mask.setter
    def mask(self, mask: np.ndarray) -> None:
        self.labels, self.value = np.asarray(mask, dtype=bool), 1

    def slice_mask(self, index: int) -> np.ndarray:
        """bool (rows, columns): the segment on one slice."""
        if not self.shares_labels:
            return self.labels[index]
        return self.labels[index] == self.value

    def slice_counts(self) -> np.ndarray:
        """Voxels of the segment per slice (axis 0), int64."""
        flat = self.labels.reshape(len(self.labels), -1)
        if not self.shares_labels:
            return np.count_nonzero(flat, axis=1).astype(np.int64)
        return np.array([np.count_nonzero(row == self.value) for row in flat], dtype=np.int64)

    def voxel_count(self) -> int:
        return int(self.slice_counts().sum())


@dataclass(frozen=True)
class Measurement:
    """One number about one segment, coded so SR and FHIR carry it the same way."""

    structure_key: str
    name: CodedConcept
    value: float
    unit: CodedConcept
    """UCUM unit, e.g. mL or [hnsf'U]."""
    derivation: CodedConcept | None = None
    """e.g. SCT 373098007 Mean for a mean attenuation."""


@dataclass(frozen=True)
class NotAssessed:
    """Something the report would cover but cannot, and why (outside the scanned range, no such segment, …)."""

    what: str
    reason: str
    keys: tuple[str, ...] = ()
    """The structure keys it concerns, when they are the pipeline's structures (e.g. ``lung_left``)."""


@dataclass
class PipelineResult:
    """Everything one pipeline run produced, ready for the writers."""

    segments: list[Segment]
    measurements: list[Measurement]
    algorithm_name: str
    algorithm_version: str
    notes: list[str] = field(default_factory=list)
    not_assessed: list[NotAssessed] = field(default_factory=list)
    """Structures the pipeline dropped before measuring (e.g. lungs on a head CT), with the reason."""

    def measurements_for(self, key: str) -> list[Measurement]:
        return [m for m in self.measurements if m.structure_key == key]
