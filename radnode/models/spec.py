"""What a segmentation model needs and produces: input spacing, intensity normalisation, patch size, labels.

The same description comes from a TorchScript model's sidecar YAML (``model.yaml``), from the
``radnode`` section of a MONAI bundle's ``metadata.json`` or, failing that, from the bundle's own
inference config (Spacingd, ScaleIntensityRanged, NormalizeIntensityd, the inferer's roi_size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from highdicom.sr import CodedConcept

from radnode.models.errors import ModelError
from radnode.results import Structure
from radnode.uncertainty import PRIVATE_SCHEME

NORMALISATIONS = ("window", "zscore", "percentile")
_DEFAULT_CATEGORY = CodedConcept("91723000", "SCT", "Anatomical Structure")
_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)]


@dataclass(frozen=True)
class Normalisation:
    """How intensities are mapped before the network.

    ``window``: clip to [low, high] and scale to [0, 1] (e.g. a CT HU window); ``zscore``: subtract the
    mean and divide by the SD of the volume; ``percentile``: clip to the [low, high] percentiles, scale to [0, 1].
    """

    kind: str = "zscore"
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in NORMALISATIONS:
            raise ModelError(f"normalisation {self.kind!r}: expected one of {', '.join(NORMALISATIONS)}")
        if self.kind in ("window", "percentile") and (self.low is None or self.high is None or self.low >= self.high):
            raise ModelError(f"normalisation {self.kind!r} needs low < high (got {self.low}, {self.high})")


@dataclass(frozen=True)
class ModelSpec:
    """A model's contract with the pipeline; labels are the network's output channels 1…n (0 is background)."""

    name: str
    version: str
    labels: dict[int, Structure]
    patch_size: tuple[int, int, int]
    spacing: tuple[float, float, float] | None = None
    """Target voxel size (slice, row, column) in mm; None keeps the source spacing."""
    normalisation: Normalisation = Normalisation()
    in_channels: int = 1
    modality: str = "CT"
    """The modality of the series the model reads, ``CT`` or ``MR`` (``input.modality``)."""
    series: Any = None
    """Further attributes that series must have, as a routing-rule condition (``input.series``, the language
    of ``docs/rules.md``), parsed; None: any volume series of the modality."""

    @property
    def out_channels(self) -> int:
        return len(self.labels) + 1


def _concept(value: Any, where: str) -> CodedConcept:
    """A code written ``[value, scheme, meaning]`` or ``{value, scheme, meaning}``."""
    if isinstance(value, dict):
        value = [value.get("value"), value.get("scheme"), value.get("meaning")]
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(value):
        raise ModelError(f"{where}: a code is [value, scheme, meaning], got {value!r}")
    return CodedConcept(str(value[0]), str(value[1]), str(value[2]))


def parse_labels(raw: dict[Any, Any], where: str) -> dict[int, Structure]:
    """Labels by output channel. Each is a name, or a mapping with key/name/code/category/color.

    A label without a code gets a private code (scheme 99RADNODE) so it can still be written; give
    a SNOMED CT code (``code: [10200004, SCT, Liver]``) for anything a hospital will read.
    """
    labels: dict[int, Structure] = {}
    for channel, item in raw.items():
        try:
            index = int(channel)
        except (TypeError, ValueError):
            raise ModelError(f"{where}: label channel {channel!r} is not an integer") from None
        if index == 0:
            continue  # background
        item = {"name": item} if isinstance(item, str) else dict(item or {})
        name = str(item.get("name") or item.get("key") or f"label {index}")
        key = str(item.get("key") or name.lower().replace(" ", "_"))
        code = (_concept(item["code"], f"{where}: label {index}") if "code" in item
                else CodedConcept(key.upper()[:16], PRIVATE_SCHEME, name))
        category = _concept(item["category"], f"{where}: label {index}") if "category" in item else _DEFAULT_CATEGORY
        color = tuple(int(c) for c in item.get("color", _PALETTE[(index - 1) % len(_PALETTE)]))
        labels[index] = Structure(key, name, category, code, color_rgb=color)  # type: ignore[arg-type]
    if not labels:
        raise ModelError(f"{where}: no foreground labels")
    if sorted(labels) != list(range(1, len(labels) + 1)):
        raise ModelError(f"{where}: label channels must be 1..n without gaps, got {sorted(labels)}")
    return labels


MODALITIES = {"CT": "CT", "MR": "MR", "MRI": "MR"}
"""Modalities a model may read (as DICOM Modality); MONAI bundles often write ``MRI``."""


def _series_selection(source: dict[str, Any], where: str) -> tuple[str, Any]:
    """``input.modality`` (default CT) and ``input.series`` (a rule condition, checked now) of a model."""
    modality = MODALITIES.get(str(source.get("modality") or "CT").strip().upper())
    if modality is None:
        raise ModelError(f"{where}: input.modality {source.get('modality')!r}; expected one of CT, MR")
    if source.get("series") is None:
        return modality, None
    from radnode.pipelines.conditions import RuleError, parse_condition

    try:
        return modality, parse_condition(source["series"], f"{where}: input.series")
    except RuleError as e:
        raise ModelError(str(e)) from None


def parse_model_yaml(data: dict[str, Any], where: str, *, name: str, version: str = "unknown") -> ModelSpec:
    """A ModelSpec from a sidecar YAML or a bundle's ``radnode`` mapping::

        name: liver-ct            # optional; version likewise
        input:
          spacing: [1.5, 1.5, 1.5] # mm (slice, row, column); omit to keep the source spacing
          normalisation: {kind: window, low: -160, high: 240}   # or zscore, or percentile low/high
          patch_size: [96, 96, 96]
          modality: CT             # or MR; the series read is the largest volume series of it
          series: {SeriesDescription: {matches: "(?i)venous"}}   # optional: a condition as in rule files
        labels:
          1: {key: liver, name: Liver, code: [10200004, SCT, Liver]}
    """
    if not isinstance(data, dict):
        raise ModelError(f"{where}: expected a mapping")
    source = data.get("input", {}) or {}
    try:
        patch = tuple(int(v) for v in source["patch_size"])
    except KeyError:
        raise ModelError(f"{where}: input.patch_size missing") from None
    if len(patch) != 3 or min(patch) < 1:
        raise ModelError(f"{where}: input.patch_size must be three positive integers, got {patch}")
    spacing = source.get("spacing")
    if spacing is not None and (len(spacing) != 3 or min(float(v) for v in spacing) <= 0):
        raise ModelError(f"{where}: input.spacing must be three positive numbers (mm), got {spacing}")
    norm = source.get("normalisation", {}) or {}
    modality, series = _series_selection(source, where)
    if "labels" not in data:
        raise ModelError(f"{where}: labels missing")
    return ModelSpec(
        name=str(data.get("name", name)),
        version=str(data.get("version", version)),
        labels=parse_labels(data["labels"], where),
        patch_size=patch,  # type: ignore[arg-type]
        spacing=tuple(float(v) for v in spacing) if spacing is not None else None,  # type: ignore[arg-type]
        normalisation=Normalisation(str(norm.get("kind", "zscore")), norm.get("low"), norm.get("high")),
        in_channels=int(source.get("channels", 1)),
        modality=modality,
        series=series,
    )

