"""Structured findings: what a pipeline measured, compared with literature reference ranges.

Everything the report text may state comes from a :class:`StructuredFindings`: the measured quantities,
the findings a reference range supports (present or absent), the segmentation's uncertainty flags and
what could not be assessed and why. The language model sees only this, and the verifier checks the
text against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from radnode.resources import package_file
from radnode.results import Measurement, PipelineResult, Structure

REFERENCE_RANGES_FILE = package_file("radnode.report", "reference_ranges.yaml")

UNIT_SYMBOLS = {"mL": "mL", "[hnsf'U]": "HU", "%": "%"}
"""UCUM codes of the measurements as written in report text."""

TISSUE_CATEGORY = "85756007"
"""SNOMED CT "Tissue": tissues (fat, muscle, bone) run through every slice, so touching an edge is no crop."""

QUANTITY_NAMES = {("118565006", None): "volume", ("112031", "373098007"): "mean attenuation",
                  ("112031", "386136009"): "attenuation standard deviation", ("LAA950", None): "LAA-950"}
"""Report wording of the measurement concepts of :mod:`radnode.measure` (concept, derivation)."""


@dataclass(frozen=True)
class Code:
    """A coded concept (e.g. the SNOMED CT code of a finding) in plain form."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class ReferenceRange:
    """A limit for one measurement of some structures, the finding it supports and its literature source."""

    id: str
    finding: str
    finding_code: Code
    modality: str
    structures: tuple[str, ...]
    concept: str
    unit: str
    description: str
    source: str
    derivation: str | None = None
    lower: float | None = None
    """Values below this support the finding."""
    upper: float | None = None
    """Values at or above this support the finding."""

    def applies_to(self, measurement: Measurement) -> bool:
        derivation = measurement.derivation.value if measurement.derivation is not None else None
        return (measurement.structure_key in self.structures and measurement.name.value == self.concept
                and derivation == self.derivation)

    def is_abnormal(self, value: float) -> bool:
        return (self.lower is not None and value < self.lower) or (self.upper is not None and value >= self.upper)

    def limit_text(self) -> str:
        """The normal range as written in the report, e.g. ``below 5 %``."""
        unit = UNIT_SYMBOLS.get(self.unit, self.unit)
        if self.lower is not None and self.upper is not None:
            return f"{_number(self.lower)} to {_number(self.upper)} {unit}"
        if self.upper is not None:
            return f"below {_number(self.upper)} {unit}"
        return f"at least {_number(self.lower)} {unit}"


@dataclass(frozen=True)
class Quantity:
    """One measured number about one structure, as the report writes it."""

    structure_key: str
    structure_label: str
    laterality: str | None
    """``left``, ``right`` or None."""
    name: str
    value: float
    unit: str
    """Report unit symbol: mL, HU or %."""

    def text(self) -> str:
        return f"{self.name} {_number(self.value)} {self.unit}"


@dataclass(frozen=True)
class Finding:
    """A measurement compared with a reference range: the finding it supports, present or absent."""

    finding: str
    code: Code
    present: bool
    quantity: Quantity
    reference: ReferenceRange


@dataclass(frozen=True)
class NotAssessed:
    """Something the report would cover but cannot, and why (missing structure, failed segmentation, …)."""

    what: str
    reason: str


@dataclass
class StructuredFindings:
    """All the report may say about one study."""

    modality: str
    structures: dict[str, Structure]
    quantities: list[Quantity]
    findings: list[Finding]
    not_assessed: list[NotAssessed]
    flags: list[str]
    """Uncertainty flags of the segmentation (cropped anatomy, pipeline notes)."""
    algorithms: list[tuple[str, str]] = field(default_factory=list)
    """(name, version) of every algorithm behind the numbers."""

    @property
    def present(self) -> list[Finding]:
        return [f for f in self.findings if f.present]


def _number(value: float) -> str:
    """A number as the report writes it: no trailing zeros, no exponent."""
    return f"{value:.2f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))


def load_reference_ranges(path: Path = REFERENCE_RANGES_FILE) -> list[ReferenceRange]:
    """The reference ranges of the data file; each must name its literature source."""
    data = yaml.safe_load(path.read_text())
    ranges = []
    for entry in data["ranges"]:
        if not str(entry.get("source", "")).strip():
            raise ValueError(f"{path}: reference range {entry.get('id')!r} has no literature source")
        code = entry.pop("finding_code")
        ranges.append(ReferenceRange(**{**entry, "structures": tuple(entry["structures"]),
                                        "concept": str(entry["concept"]),
                                        "derivation": str(entry["derivation"]) if entry.get("derivation") else None,
                                        "finding_code": Code(str(code["value"]), code["scheme"], code["meaning"])}))
    return ranges


def _laterality(structure: Structure) -> str | None:
    if structure.laterality is None:
        return None
    return str(structure.laterality.meaning).lower()


def _quantity(measurement: Measurement, structure: Structure) -> Quantity | None:
    derivation = measurement.derivation.value if measurement.derivation is not None else None
    name = QUANTITY_NAMES.get((measurement.name.value, derivation))
    if name is None:
        return None
    return Quantity(structure.key, structure.label, _laterality(structure), name, float(measurement.value),
                    UNIT_SYMBOLS.get(measurement.unit.value, measurement.unit.value))


def _cropped(result: PipelineResult) -> list[str]:
    """Flags for anatomical structures touching the first or last slice: the scan may have cut them off."""
    flags = []
    for segment in result.segments:
        mask, structure = segment.mask, segment.structure
        if structure.key == "body" or structure.category.value == TISSUE_CATEGORY or not mask.any():
            continue
        if mask[0].any() or mask[-1].any():
            flags.append(f"{structure.label} reaches the edge of the scanned range; "
                         "its volume may be underestimated")
    return flags


def structured_findings(result: PipelineResult, modality: str,
                        ranges: list[ReferenceRange] | None = None) -> StructuredFindings:
    """Quantities, findings against reference ranges, flags and not-assessed items of one pipeline result."""
    ranges = load_reference_ranges() if ranges is None else ranges
    structures = {s.structure.key: s.structure for s in result.segments}
    quantities: list[Quantity] = []
    findings: list[Finding] = []
    for m in result.measurements:
        quantity = _quantity(m, structures[m.structure_key])
        if quantity is None or quantity.name == "attenuation standard deviation":
            continue
        quantities.append(quantity)
        for reference in ranges:
            if reference.applies_to(m):
                findings.append(Finding(reference.finding, reference.finding_code,
                                        reference.is_abnormal(quantity.value), quantity, reference))

    measured = {m.structure_key for m in result.measurements}
    not_assessed = [NotAssessed(s.structure.label.lower(), "segmentation found no such region")
                    for s in result.segments if s.structure.key not in measured and not np.any(s.mask)]
    for reference in ranges:
        if reference.modality.upper() != modality.upper():
            continue
        missing = [key for key in reference.structures if key not in structures]
        if len(missing) == len(reference.structures):
            not_assessed.append(NotAssessed(reference.description,
                                            f"no {missing[0].replace('_', ' ')} segment in this pipeline"))
    flags = _cropped(result) + list(result.notes)
    return StructuredFindings(modality.upper(), structures, quantities, findings, not_assessed, flags,
                              [(result.algorithm_name, result.algorithm_version)])
