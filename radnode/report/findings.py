"""Structured findings: what a pipeline measured, compared with literature reference ranges.

Everything the report text may state comes from a :class:`StructuredFindings`: the study's identity (the
report header), the measured quantities, the findings a reference range supports (present or absent), the
segmentation's uncertainty flags and what could not be assessed and why. The language model sees only
the Findings and Impression sentences built from it, and the verifier checks the text against it.

A reference range is applied only to the measurement it was defined for (:class:`MeasurementSpec`: the
structure, the concept, the region — e.g. the whole lung — the contrast phase and the patient's age and
sex where the source gives limits by them); anything short of that is "not assessed" with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from radnode.imaging.identity import StudyIdentity
from radnode.resources import package_file
from radnode.results import Measurement, NotAssessed, PipelineResult, Segment, Structure

REFERENCE_RANGES_FILE = package_file("radnode.report", "reference_ranges.yaml")

UNIT_SYMBOLS = {"mL": "mL", "[hnsf'U]": "HU", "%": "%", "1": ""}
"""UCUM codes of the measurements as written in report text (a ratio has no unit symbol)."""

TISSUE_CATEGORY = "85756007"
"""SNOMED CT "Tissue": tissues (fat, muscle, bone) run through every slice, so touching an edge is no crop."""

QUANTITY_NAMES = {("118565006", None): "volume", ("112031", "373098007"): "mean attenuation",
                  ("112031", "386136009"): "attenuation standard deviation", ("LAA950", None): "LAA-950",
                  ("BPF", None): "brain parenchymal fraction"}
"""Report wording of the measurement concepts of :mod:`radnode.measure` (concept, derivation)."""
REPORTED_QUANTITIES = frozenset(QUANTITY_NAMES.values()) - {"attenuation standard deviation"}
"""Quantities the report text states (the SD is in the SR and FHIR only)."""


@dataclass(frozen=True)
class Code:
    """A coded concept (e.g. the SNOMED CT code of a finding) in plain form."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class MeasurementSpec:
    """The exact measurement a reference range was defined for."""

    modality: str
    structures: tuple[str, ...]
    concept: str
    derivation: str | None = None
    region: str = "whole"
    """``whole``: the structure lies entirely in the scanned range; any other text names a sub-region only a
    dedicated measurement produces (e.g. L1 trabecular bone), never approximated by a larger segment."""
    contrast: str = "any"
    """``unenhanced``: only where the images record no contrast agent; ``any``: either."""

    def matches(self, measurement: Measurement) -> bool:
        derivation = measurement.derivation.value if measurement.derivation is not None else None
        return (measurement.structure_key in self.structures and measurement.name.value == self.concept
                and derivation == self.derivation)


@dataclass(frozen=True)
class AgeBand:
    """Limits for patients aged ``min_years`` to ``max_years`` inclusive."""

    min_years: int
    max_years: int
    lower: float | None = None
    upper: float | None = None


@dataclass(frozen=True)
class Limit:
    """The limit that applies to one patient: the range's own, or its age band's."""

    lower: float | None
    upper: float | None
    age_band: AgeBand | None = None

    def is_abnormal(self, value: float) -> bool:
        return (self.lower is not None and value < self.lower) or (self.upper is not None and value >= self.upper)


@dataclass(frozen=True)
class ReferenceRange:
    """A limit for one exact measurement, the finding it supports and its literature source."""

    id: str
    finding: str
    finding_code: Code
    description: str
    measurement: MeasurementSpec
    unit: str
    source: str
    lower: float | None = None
    """Values below this support the finding."""
    upper: float | None = None
    """Values at or above this support the finding."""
    age_bands: tuple[AgeBand, ...] = ()
    sex: str | None = None
    """``M`` or ``F`` when the source's limits are for one sex."""

    @property
    def modality(self) -> str:
        return self.measurement.modality

    @property
    def structures(self) -> tuple[str, ...]:
        return self.measurement.structures

    def applies_to(self, measurement: Measurement) -> bool:
        return self.measurement.matches(measurement)

    def limit_for(self, identity: StudyIdentity | None) -> tuple[Limit | None, str | None]:
        """The limit for this patient, or None with the reason it cannot be applied (age or sex)."""
        if self.sex is not None:
            if identity is None or not identity.sex:
                return None, "the patient's sex is not recorded in the study"
            if identity.sex != self.sex:
                return None, f"the reference is for {'men' if self.sex == 'M' else 'women'} only"
        if not self.age_bands:
            return Limit(self.lower, self.upper), None
        if identity is None or identity.age_years is None:
            return None, "the reference depends on age and the patient's age is not recorded in the study"
        age = int(identity.age_years)
        for band in self.age_bands:
            if band.min_years <= age <= band.max_years:
                return Limit(band.lower, band.upper, band), None
        return None, f"the reference has no limits for age {age} years"

    def limit_text(self, limit: Limit) -> str:
        """The normal range as written in the report, e.g. ``below 5 %`` or ``at least 0.74 for age 60-69``."""
        unit = UNIT_SYMBOLS.get(self.unit, self.unit)
        unit = f" {unit}" if unit else ""
        if limit.lower is not None and limit.upper is not None:
            text = f"{_number(limit.lower)} to {_number(limit.upper)}{unit}"
        elif limit.upper is not None:
            text = f"below {_number(limit.upper)}{unit}"
        else:
            text = f"at least {_number(limit.lower)}{unit}"
        band = limit.age_band
        return text + (f" for age {band.min_years} to {band.max_years} years" if band else "")


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
    """Report unit symbol: mL, HU, % or empty for a ratio."""

    def text(self) -> str:
        return f"{self.name} {_number(self.value)}" + (f" {self.unit}" if self.unit else "")


@dataclass(frozen=True)
class Finding:
    """A measurement compared with a reference range: the finding it supports, present or absent."""

    finding: str
    code: Code
    present: bool
    quantity: Quantity
    reference: ReferenceRange
    limit: Limit


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
    identity: StudyIdentity | None = None
    """The patient and study the report is about (its header)."""

    @property
    def present(self) -> list[Finding]:
        return [f for f in self.findings if f.present]


def _number(value: float) -> str:
    """A number as the report writes it: no trailing zeros, no exponent."""
    if value == int(value):
        return str(int(value))
    return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1 else f"{value:.2f}".rstrip("0").rstrip(".")


def load_reference_ranges(path: Path = REFERENCE_RANGES_FILE) -> list[ReferenceRange]:
    """The reference ranges of the data file; each must name its measurement and its literature source."""
    data = yaml.safe_load(path.read_text())
    ranges = []
    for entry in data["ranges"]:
        rid = entry.get("id")
        if not str(entry.get("source", "")).strip():
            raise ValueError(f"{path}: reference range {rid!r} has no literature source")
        spec = entry.get("measurement")
        if not isinstance(spec, dict) or not {"modality", "structures", "concept"} <= set(spec):
            raise ValueError(f"{path}: reference range {rid!r} does not name its measurement "
                             "(measurement: modality, structures, concept)")
        if spec.get("contrast", "any") not in ("any", "unenhanced"):
            raise ValueError(f"{path}: reference range {rid!r}: contrast must be 'any' or 'unenhanced'")
        population = entry.get("population") or {}
        bands = tuple(AgeBand(int(b["min"]), int(b["max"]), b.get("lower"), b.get("upper"))
                      for b in population.get("age_bands", ()))
        code = entry["finding_code"]
        ranges.append(ReferenceRange(
            id=rid, finding=entry["finding"], description=entry["description"], unit=str(entry["unit"]),
            source=" ".join(str(entry["source"]).split()), lower=entry.get("lower"), upper=entry.get("upper"),
            finding_code=Code(str(code["value"]), code["scheme"], code["meaning"]),
            measurement=MeasurementSpec(
                modality=str(spec["modality"]).upper(), structures=tuple(spec["structures"]),
                concept=str(spec["concept"]), derivation=str(spec["derivation"]) if spec.get("derivation") else None,
                region=str(spec.get("region", "whole")), contrast=str(spec.get("contrast", "any"))),
            age_bands=bands, sex=population.get("sex")))
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


def _reaches_scan_edge(segment: Segment) -> bool:
    """Whether a segment has voxels on the first or last slice (the scan may have cut it off)."""
    counts = segment.slice_counts()
    return bool(counts.any() and (counts[0] or counts[-1]))


def _cropped(result: PipelineResult) -> list[str]:
    """Flags for anatomical structures touching the first or last slice: the scan may have cut them off."""
    flags = []
    for segment in result.segments:
        structure = segment.structure
        if structure.key == "body" or structure.category.value == TISSUE_CATEGORY:
            continue
        if _reaches_scan_edge(segment):
            flags.append(f"{structure.label} reaches the edge of the scanned range; "
                         "its volume may be underestimated")
    return flags


def _region_problem(reference: ReferenceRange, segment: Segment | None, contrast_agent: str | None) -> str | None:
    """Why the measured structure is not the one the reference was defined for, or None."""
    spec = reference.measurement
    if spec.contrast == "unenhanced" and contrast_agent:
        return f"the reference is for unenhanced CT and the images record contrast agent {contrast_agent!r}"
    if spec.region == "whole" and segment is not None and _reaches_scan_edge(segment):
        return (f"{segment.structure.label.lower()} is cut by the scanned range; the reference is defined "
                "on the whole structure")
    return None


def structured_findings(result: PipelineResult, modality: str, ranges: list[ReferenceRange] | None = None, *,
                        identity: StudyIdentity | None = None,
                        contrast_agent: str | None = None) -> StructuredFindings:
    """Quantities, findings against reference ranges, flags and not-assessed items of one pipeline result.

    ``identity`` supplies the patient's age and sex for ranges that depend on them; ``contrast_agent`` is
    Contrast/Bolus Agent (0018,0010) of the analysed series (empty or None: none recorded).
    """
    ranges = load_reference_ranges() if ranges is None else ranges
    structures = {s.structure.key: s.structure for s in result.segments}
    segments = {s.structure.key: s for s in result.segments}
    quantities: list[Quantity] = []
    findings: list[Finding] = []
    not_assessed = list(result.not_assessed)
    for m in result.measurements:
        quantity = _quantity(m, structures[m.structure_key])
        if quantity is None or quantity.name not in REPORTED_QUANTITIES:
            continue
        quantities.append(quantity)
        for reference in ranges:
            if not reference.applies_to(m) or reference.modality != modality.upper():
                continue
            structure = structures[m.structure_key].label.lower()
            limit, why_not = reference.limit_for(identity)
            why_not = why_not or _region_problem(reference, segments.get(m.structure_key), contrast_agent)
            if why_not or limit is None:
                not_assessed.append(NotAssessed(f"{reference.finding} ({structure})", why_not or "no limit"))
                continue
            findings.append(Finding(reference.finding, reference.finding_code, limit.is_abnormal(quantity.value),
                                    quantity, reference, limit))

    measured = {m.structure_key for m in result.measurements}
    said = {n.what for n in not_assessed}
    not_assessed += [NotAssessed(s.structure.label.lower(), "segmentation found no such region")
                     for s in result.segments
                     if s.structure.key not in measured and s.voxel_count() == 0 and s.structure.label.lower() not in said]
    for reference in ranges:
        if reference.modality != modality.upper() or any(k in measured for k in reference.structures):
            continue
        reason = next((n.reason for n in result.not_assessed if set(n.keys) & set(reference.structures)), None)
        not_assessed.append(NotAssessed(reference.finding, reason or f"this pipeline does not measure the "
                                                                     f"{reference.description}"))
    flags = _cropped(result) + list(result.notes)
    return StructuredFindings(modality.upper(), structures, quantities, findings, not_assessed, flags,
                              [(result.algorithm_name, result.algorithm_version)], identity)
