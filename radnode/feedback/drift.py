"""Drift: each pipeline's inputs and outputs, study by study, compared with a baseline the site sets.

Per study the node records what went in — the processed series' scanner (manufacturer and model), kVp, slice
thickness, pixel spacing, reconstruction kernel, contrast agent and, for CT, the body's mean HU and an image noise
estimate, all from the job's own input files (:func:`input_attributes`) — and what came out: every measurement
of the run's report, its uncertainty scores and whether it was flagged for review (:func:`output_attributes`).

The last ``feedback.drift.window`` studies are compared with the baseline (the pipeline's first N studies, or
those recorded in a date range) attribute by attribute with the population stability index (:func:`psi`):
numeric attributes on fixed bins cut at the baseline's quantiles (:func:`numeric_bins`), categorical ones by
category, ``EPSILON`` for a bin one side leaves empty. A shift is an attribute whose PSI reaches the threshold
(default 0.25) *and* whose two-sample test (Kolmogorov–Smirnov for numbers, χ² for categories) has a p-value
below ``feedback.drift.p_value``: PSI says how large the shift is, the test that a window of a few studies is
not just sampling noise (PSI's own noise is ≈ (bins − 1)·(1/window + 1/baseline)). The monitor
(:class:`DriftMonitor`, the node's ``drift`` thread) raises one alert per (pipeline, attribute) episode: stored,
counted in ``/metrics``, written to the audit trail; it clears when the attribute is back under the threshold.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from radnode.config import DriftConfig
    from radnode.execution import RunManifest
    from radnode.node.store import JobStore
    from radnode.security.audit import AuditTrail

log = logging.getLogger(__name__)

EPSILON = 1e-4
"""The proportion given to a bin that one side leaves empty (PSI's logarithm is undefined at 0)."""

Value = float | str
"""An attribute's value for one study: a number, or a category."""

INPUT_ATTRIBUTES = ("scanner", "kvp", "slice_thickness_mm", "pixel_spacing_mm", "convolution_kernel",
                    "contrast_agent", "body_hu_mean", "noise_hu")
"""The input attributes, in the order tables list them (CT only: the last two)."""

REVIEW_FLAG = "review flag"

SOFT_TISSUE_HU = (-50.0, 150.0)
"""The HU range of soft tissue in which the noise is estimated (water, fat-free soft tissue, blood, muscle)."""

BODY_HU = -500.0
"""Voxels above this HU are the body (air and lung below) for the body HU summary."""

SAMPLED_SLICES = 3
"""Slices read for the pixel-based attributes (at a quarter, half and three quarters of the series)."""


# --- observing a study ----------------------------------------------------------------------------------

def input_attributes(files: Iterable[Path]) -> dict[str, Value]:
    """The input attributes of the image series with the most instances among a job's input ``files``: headers of
    its first instance, and for single-frame CT the body HU mean and the noise estimate over ``SAMPLED_SLICES``
    slices. Attributes a header lacks are left out (a numeric attribute is never guessed)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    by_series: dict[str, list[tuple[int, Path, Any]]] = {}
    for path in sorted(files):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):  # a non-DICOM file in the input is the pipeline's business
            continue
        if "Rows" in ds and "SeriesInstanceUID" in ds:
            by_series.setdefault(str(ds.SeriesInstanceUID), []).append((int(ds.get("InstanceNumber") or 0), path, ds))
    if not by_series:
        return {}
    series = sorted(max(by_series.values(), key=len), key=lambda item: item[0])
    first = series[0][2]
    attributes: dict[str, Value] = {
        "scanner": " / ".join(str(first.get(k) or "unknown") for k in ("Manufacturer", "ManufacturerModelName")),
        "convolution_kernel": "\\".join(_strings(first.get("ConvolutionKernel"))) or "none",
        "contrast_agent": str(first.get("ContrastBolusAgent") or "none")}
    for name, keyword in (("kvp", "KVP"), ("slice_thickness_mm", "SliceThickness")):
        if (number := _number(first.get(keyword))) is not None:
            attributes[name] = number
    if (spacing := first.get("PixelSpacing")) and (number := _number(spacing[0])) is not None:
        attributes["pixel_spacing_mm"] = number
    if str(first.get("Modality")) == "CT" and int(first.get("NumberOfFrames") or 1) == 1:  # single-frame CT
        n = len(series)
        picks = sorted({min(n - 1, max(0, round(n * k / (SAMPLED_SLICES + 1)))) for k in range(1, SAMPLED_SLICES + 1)})
        slices = [_hounsfield(pydicom.dcmread(series[i][1])) for i in picks]
        attributes.update(ct_pixel_attributes(slices))
    return attributes


def ct_pixel_attributes(slices: Sequence[np.ndarray]) -> dict[str, float]:
    """``body_hu_mean`` (mean HU of the voxels above ``BODY_HU``: a mean, so the image noise leaves it where it is,
    where a median of the tissue mixture moves with it) and ``noise_hu``: a robust estimate of the
    image noise σ in homogeneous soft tissue — each pixel whose 3×3 neighbourhood lies wholly in
    ``SOFT_TISSUE_HU`` minus its neighbourhood's mean, scaled by √(9/8) (white noise of σ leaves a residual of
    σ·√(8/9)), its spread taken as 1.4826 × the median absolute deviation, so edges and outliers do not count."""
    from scipy import ndimage

    body, residuals = [], []
    for hu in slices:
        hu = hu.astype(np.float64)
        body.append(hu[hu > BODY_HU])
        soft = (hu >= SOFT_TISSUE_HU[0]) & (hu <= SOFT_TISSUE_HU[1])
        homogeneous = ndimage.binary_erosion(soft, structure=np.ones((3, 3), bool), border_value=0)
        residual = (hu - ndimage.uniform_filter(hu, size=3, mode="nearest")) * math.sqrt(9 / 8)
        residuals.append(residual[homogeneous])
    out: dict[str, float] = {}
    if (inside := np.concatenate(body)).size:
        out["body_hu_mean"] = float(np.mean(inside))
    if (r := np.concatenate(residuals)).size >= 50:
        out["noise_hu"] = float(1.4826 * np.median(np.abs(r - np.median(r))))
    return out


def output_attributes(manifest: "RunManifest") -> dict[str, Value]:
    """What a run put out: each measurement of its report (``structure: concept (unit)``), each uncertainty
    score (``structure: UNC-…``) and, when the pipeline assesses it, the review flag."""
    from radnode.uncertainty import UNCERTAINTY_CONCEPTS

    out: dict[str, Value] = {}
    for m in manifest.measurements:
        concept = m.get("concept") or {}
        try:
            value = float(m["value"])
        except (KeyError, TypeError, ValueError):
            continue
        if concept.get("value") in UNCERTAINTY_CONCEPTS:
            out[f"{m.get('structure')}: {concept['value']}"] = value
        else:
            out[f"{m.get('structure')}: {concept.get('meaning')} ({m.get('unit')})"] = value
    if manifest.review is not None:
        out[REVIEW_FLAG] = "flagged" if manifest.review.needs_review else "not flagged"
    return out


def _strings(value: Any) -> list[str]:
    """A header's values as strings: none, one, or each of a multi-valued element's."""
    from pydicom.multival import MultiValue

    if value is None or value == "":
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple, MultiValue)) else [str(value)]


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _hounsfield(ds: Any) -> np.ndarray:
    """A CT slice in HU (Rescale Slope and Intercept applied)."""
    pixels = ds.pixel_array.astype(np.float64)
    return pixels * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)


# --- comparing two windows ------------------------------------------------------------------------------

def numeric_bins(baseline: Sequence[float], bins: int) -> np.ndarray:
    """The fixed bin edges of a numeric attribute: the baseline's distinct quantiles at 1/bins … (bins−1)/bins
    (linear interpolation). Values fall in the open intervals between edges, below the first, above the last, or
    on an edge itself (:func:`numeric_proportions`), so a protocol value the whole baseline shares (a slice
    thickness) is a bin of its own and a change either way shows."""
    levels = np.arange(1, bins) / bins
    return np.unique(np.quantile(np.asarray(baseline, dtype=float), levels))


def numeric_counts(values: Sequence[float], edges: np.ndarray) -> np.ndarray:
    """How many values fall in each of the 2k+1 bins of ``k`` edges: (−∞, e₁), [e₁], (e₁, e₂), [e₂], …, [eₖ],
    (eₖ, ∞)."""
    counts = np.zeros(2 * len(edges) + 1, dtype=int)
    for v in values:
        i = int(np.searchsorted(edges, v, side="left"))
        counts[2 * i + 1 if i < len(edges) and edges[i] == v else 2 * i] += 1
    return counts


def psi(expected: Sequence[float], actual: Sequence[float], epsilon: float = EPSILON) -> float:
    """Population stability index Σ (aᵢ − eᵢ)·ln(aᵢ / eᵢ) of two distributions over the same bins (proportions;
    an empty bin counts as ``epsilon``, a bin empty on both sides as nothing)."""
    e = np.maximum(np.asarray(expected, dtype=float), epsilon)
    a = np.maximum(np.asarray(actual, dtype=float), epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass(frozen=True)
class Shift:
    """One attribute compared over the baseline and the window."""

    attribute: str
    kind: str
    """``input`` or ``output``."""
    psi: float
    p_value: float
    drifting: bool
    baseline_n: int
    window_n: int
    baseline: str
    """The baseline in a few words: the median and range of a number, the commonest categories."""
    window: str


def compare(attribute: str, kind: str, baseline: Sequence[Value], window: Sequence[Value], *, bins: int,
            threshold: float, p_value: float | None) -> Shift:
    """PSI and the two-sample test of one attribute (numeric when every value is a number, else categorical)."""
    from scipy import stats

    if all(isinstance(v, (int, float)) for v in (*baseline, *window)):
        base, win = np.asarray(baseline, float), np.asarray(window, float)
        edges = numeric_bins(base, bins)
        index = psi(numeric_counts(base, edges) / len(base), numeric_counts(win, edges) / len(win))
        p = 1.0 if np.ptp(np.concatenate([base, win])) == 0 else float(stats.ks_2samp(base, win).pvalue)
        described = (_numbers(base), _numbers(win))
    else:
        categories = sorted({str(v) for v in (*baseline, *window)})
        table = np.array([[sum(str(v) == c for v in side) for c in categories] for side in (baseline, window)])
        index = psi(table[0] / len(baseline), table[1] / len(window))
        p = 1.0 if len(categories) < 2 else float(stats.chi2_contingency(table).pvalue)
        described = (_categories(baseline), _categories(window))
    drifting = index >= threshold and (p_value is None or p < p_value)
    return Shift(attribute, kind, index, p, drifting, len(baseline), len(window), *described)


def _numbers(values: np.ndarray) -> str:
    return f"median {np.median(values):.4g} (range {values.min():.4g}–{values.max():.4g})"


def _categories(values: Sequence[Value]) -> str:
    counts = Counter(str(v) for v in values)
    return ", ".join(f"{c} {100 * n / len(values):.0f}%" for c, n in counts.most_common(3))


@dataclass(frozen=True)
class Observation:
    """One study's recorded attributes (no patient identifier)."""

    job_id: int
    pipeline: str
    recorded_at: float
    inputs: Mapping[str, Value]
    outputs: Mapping[str, Value]


def split(observations: Sequence[Observation], settings: "DriftConfig") -> tuple[list[Observation], list[Observation]]:
    """(baseline, window) of one pipeline's observations in job order: the baseline as configured, the window the
    last ``window`` studies after it (empty until the baseline is complete and a whole window follows it)."""
    ordered = sorted(observations, key=lambda o: o.job_id)
    if settings.baseline_to is not None:
        start = settings.baseline_from.timestamp() if settings.baseline_from else -math.inf
        end = settings.baseline_to.timestamp()
        baseline = [o for o in ordered if start <= o.recorded_at <= end]
        after = [o for o in ordered if o.recorded_at > end]
    else:
        baseline, after = ordered[:settings.baseline_studies], ordered[settings.baseline_studies:]
        if len(baseline) < settings.baseline_studies:
            return baseline, []
    return baseline, (after[-settings.window:] if len(after) >= settings.window and baseline else [])


def evaluate(observations: Sequence[Observation], settings: "DriftConfig") -> tuple[int, int, list[Shift]]:
    """(baseline size, window size, each attribute's shift) for one pipeline; no shifts until there is a window.
    An attribute is compared when at least half of each side carries it."""
    baseline, window = split(observations, settings)
    if not window:
        return len(baseline), 0, []
    shifts = []
    for kind in ("input", "output"):
        names = sorted({n for o in (*baseline, *window) for n in getattr(o, f"{kind}s")})
        for name in names:
            base = [getattr(o, f"{kind}s")[name] for o in baseline if name in getattr(o, f"{kind}s")]
            win = [getattr(o, f"{kind}s")[name] for o in window if name in getattr(o, f"{kind}s")]
            if 2 * len(base) < len(baseline) or 2 * len(win) < len(window):
                continue
            shifts.append(compare(name, kind, base, win, bins=settings.bins, threshold=settings.psi_alert,
                                  p_value=settings.p_value))
    return len(baseline), len(window), shifts


METHOD = ("population stability index over fixed bins (numbers: cut at the baseline's quantiles, each edge value "
          "its own bin; categories: one bin each; epsilon 1e-4 for an empty bin), with a two-sample test "
          "(Kolmogorov-Smirnov for numbers, chi-squared for categories) guarding against sampling noise")
"""The method in one sentence, as ``GET /api/drift`` and ``radnode drift`` state it."""


def baseline_description(settings: "DriftConfig") -> str:
    """The configured baseline in words."""
    if settings.baseline_to is not None:
        start = settings.baseline_from.isoformat() if settings.baseline_from else "the first study"
        return f"studies recorded from {start} to {settings.baseline_to.isoformat()}"
    return f"the pipeline's first {settings.baseline_studies} studies"


def alert_message(pipeline: str, shift: Shift) -> str:
    """The alert in one line: what shifted, by how much, from what to what."""
    return (f"{pipeline}: {shift.kind} drift in {shift.attribute}: PSI {shift.psi:.3f} (p {shift.p_value:.2g}) over "
            f"the last {shift.window_n} studies against a baseline of {shift.baseline_n}; baseline {shift.baseline}; "
            f"window {shift.window}")


# --- reading it -----------------------------------------------------------------------------------------

CSV_COLUMNS = ("pipeline", "kind", "attribute", "psi", "p_value", "drifting", "alert", "baseline_n", "window_n",
               "baseline", "window")


def _rows(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for p in document["pipelines"]:
        open_alerts = {a["attribute"] for a in p["alerts"] if a["cleared_at"] is None}
        for a in p["attributes"]:
            rows.append({**{k: a[k] for k in CSV_COLUMNS if k in a}, "pipeline": p["pipeline"],
                         "alert": "open" if a["attribute"] in open_alerts else ""})
    return rows


def drift_csv(document: Mapping[str, Any]) -> str:
    """``GET /api/drift``'s document as CSV: one row per (pipeline, attribute)."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_rows(document))
    return out.getvalue()


def drift_table(document: Mapping[str, Any]) -> str:
    """``GET /api/drift``'s document as text: the method, then per pipeline each attribute and every alert."""
    lines = [f"method: {document['method']}",
             f"baseline: {document['baseline']}; window: the last {document['window']} studies after it; "
             f"alert at PSI >= {document['psi_alert']:g}"
             + (f" with p < {document['p_value']:g}" if document["p_value"] is not None else "")]
    for p in document["pipelines"]:
        lines += ["", f"{p['pipeline']}: {p['studies']} studies recorded"]
        if not p["attributes"]:
            lines.append("  not compared yet (the baseline and a whole window after it are needed)")
        for a in p["attributes"]:
            flag = "  DRIFT" if a["drifting"] else ""
            lines.append(f"  {a['kind']:<6} {a['attribute']:<44} PSI {a['psi']:8.3f}  p {a['p_value']:.2g}{flag}")
        for alert in p["alerts"]:
            state = "open" if alert["cleared_at"] is None else "cleared"
            lines.append(f"  alert {alert['id']} ({state}): {alert['message']}")
    return "\n".join(lines) + "\n"


# --- the node's drift thread ----------------------------------------------------------------------------

class DriftMonitor:
    """Evaluates each pipeline whose observations changed, and opens or clears its alerts (one per episode)."""

    def __init__(self, settings: "DriftConfig", store: "JobStore", audit: "AuditTrail | None") -> None:
        self.settings = settings
        self.store = store
        self.audit = audit
        self._seen: dict[str, tuple[int, int]] = {}

    def tick(self) -> None:
        """One pass: every pipeline with a new observation since the last pass is evaluated."""
        if not self.settings.enabled:
            return
        for pipeline, head in self.store.drift_heads().items():
            if self._seen.get(pipeline) != head:
                self.evaluate(pipeline)
                self._seen[pipeline] = head

    def evaluate(self, pipeline: str) -> list[Shift]:
        """Compare one pipeline's window with its baseline, record each attribute's figures, raise what is new."""
        baseline_n, window_n, shifts = evaluate(self.store.drift_observations(pipeline, self.settings), self.settings)
        change = self.store.record_drift(pipeline, baseline_n, window_n, shifts,
                                         {s.attribute: alert_message(pipeline, s) for s in shifts if s.drifting})
        from radnode.security.audit import DRIFT_ALERT, SUCCESS

        for shift in change.raised:
            message = alert_message(pipeline, shift)
            log.warning("drift alert: %s", message)
            if self.audit is not None:
                self.audit.security_alert(alert=DRIFT_ALERT, description=message)
        figures = {s.attribute: s for s in shifts}
        for attribute in change.cleared:  # the episode's end is on record as its start is
            now = figures.get(attribute)
            message = (f"{pipeline}: drift alert on {attribute} cleared: "
                       + (f"PSI {now.psi:.3f} (p {now.p_value:.2g}) over the last {now.window_n} studies"
                          if now is not None else "no longer compared (no window of studies)"))
            log.warning("%s", message)
            if self.audit is not None:
                self.audit.security_alert(alert=DRIFT_ALERT, description=message, outcome=SUCCESS)
        return shifts
