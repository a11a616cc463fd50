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


@dataclass
class Segment:
    """One binary mask over the volume grid (segments may overlap, e.g. body contains lungs)."""

    structure: Structure
    mask: np.ndarray
    """bool (n_slices, rows, columns) on the source volume's grid."""


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
