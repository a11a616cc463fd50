"""Local performance per pipeline: how the node's results fare against the site's own clinicians.

From the job store (``Feedback.performance_rows``): studies processed, reviewed, accepted unchanged, corrected
and rejected; per segment the median and worst-decile (10th percentile) Dice to the corrections, median HD95
and median absolute volume difference; whether the uncertainty scores rank the corrections (Spearman between
each score and 1 − Dice over every corrected segment); and the AUROC of the run's own review flag for "needed
a correction". ``radnode performance``, ``GET /api/performance``, the dashboard and ``/metrics`` show these
same figures. No patient identifiers are in them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from radnode.node.store import JobStore
from radnode.node.store.records import MatchedCorrection, PerformanceRows

UNCHANGED_DICE = 1.0 - 1e-9
"""A correction whose every segment has Dice at least this changed nothing: the result was accepted as it was."""


@dataclass(frozen=True)
class SegmentPerformance:
    """One segment's agreement with the clinicians' corrections."""

    segment: str
    corrections: int
    median_dice: float
    worst_decile_dice: float
    """10th percentile of Dice: the worst tenth of cases is at or below it."""
    median_hd95_mm: float | None
    median_abs_volume_difference_percent: float | None


@dataclass(frozen=True)
class CorrectedSegment:
    """One segment of one correction: what the uncertainty ranking is computed from (and plotted)."""

    job_id: int
    segment: str
    dice: float
    uncertainty: dict[str, float]


@dataclass(frozen=True)
class PipelinePerformance:
    """The local performance of one pipeline (its model versions named)."""

    pipeline: str
    model_versions: list[str]
    processed: int
    reviewed: int
    accepted_unchanged: int
    corrected: int
    rejected: int
    segments: list[SegmentPerformance]
    spearman: dict[str, float | None]
    """Per uncertainty score (``UNC-MEAN``, ``UNC-BOUNDARY``, ``UNC-AGREEMENT``): Spearman's rho between the
    score and 1 − Dice over every corrected segment (None with fewer than 3 pairs or a constant side)."""
    review_flag_auroc: float | None
    """AUROC of the run's review flag for "needed a correction", over assessed jobs with feedback (None
    unless both outcomes occur)."""
    points: list[CorrectedSegment] = field(default_factory=list)


def _changed(correction: MatchedCorrection) -> bool:
    return any(float(s["dice"]) < UNCHANGED_DICE for s in correction.agreement)


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _spearman(scores: list[float], disagreement: list[float]) -> float | None:
    from radnode.uncertainty import spearman

    if len(scores) < 3 or len(set(scores)) < 2 or len(set(disagreement)) < 2:
        return None
    rho = spearman(scores, disagreement)
    return None if math.isnan(rho) else rho


def _auroc(flags: list[bool], needed: list[bool]) -> float | None:
    from radnode.uncertainty import auroc

    if len(set(needed)) < 2:
        return None
    return auroc(np.asarray(flags, dtype=float), np.asarray(needed, dtype=bool))


def summarise(rows: PerformanceRows) -> list[PipelinePerformance]:
    """Each pipeline's figures from the store's rows, pipelines by name."""
    pipelines = sorted({*rows.processed, *(p for _, p, _ in rows.decisions), *(c.pipeline for c in rows.matched)})
    out = []
    for name in pipelines:
        matched = [c for c in rows.matched if c.pipeline == name]
        decisions = {job: d for job, p, d in rows.decisions if p == name}
        changed_jobs = {c.job_id for c in matched if _changed(c)}
        unchanged_jobs = {c.job_id for c in matched if not _changed(c)} - changed_jobs
        accepted = unchanged_jobs | {j for j, d in decisions.items() if d == "accepted"} - changed_jobs
        corrected = changed_jobs | {j for j, d in decisions.items() if d == "corrected"}
        by_segment: dict[str, list[dict]] = defaultdict(list)
        points = []
        for c in matched:
            for s in c.agreement:
                by_segment[s["segment"]].append(s)
                points.append(CorrectedSegment(c.job_id, s["segment"], float(s["dice"]), dict(s.get("uncertainty") or {})))
        segments = []
        for segment, figures in sorted(by_segment.items()):
            dice = [float(f["dice"]) for f in figures]
            segments.append(SegmentPerformance(
                segment=segment, corrections=len(figures), median_dice=float(np.median(dice)),
                worst_decile_dice=float(np.percentile(dice, 10)),
                median_hd95_mm=_median([float(f["hd95_mm"]) for f in figures if f["hd95_mm"] is not None]),
                median_abs_volume_difference_percent=_median([abs(float(f["volume_difference_percent"]))
                                                              for f in figures
                                                              if f["volume_difference_percent"] is not None])))
        scores = sorted({code for p in points for code in p.uncertainty})
        spearman = {code: _spearman([p.uncertainty[code] for p in points if code in p.uncertainty],
                                    [1 - p.dice for p in points if code in p.uncertainty]) for code in scores}
        flagged = {c.job_id: c.needs_review for c in matched if c.needs_review is not None}
        assessed = sorted(flagged)
        out.append(PipelinePerformance(
            pipeline=name, model_versions=sorted({c.model_version for c in matched if c.model_version}),
            processed=rows.processed.get(name, 0), reviewed=len(set(decisions) | {c.job_id for c in matched}),
            accepted_unchanged=len(accepted), corrected=len(corrected),
            rejected=sum(1 for d in decisions.values() if d == "rejected"), segments=segments, spearman=spearman,
            review_flag_auroc=_auroc([bool(flagged[j]) for j in assessed], [j in changed_jobs for j in assessed]),
            points=points))
    return out


def local_performance(store: JobStore, pipeline: str | None = None, since: float | None = None) -> list[PipelinePerformance]:
    """The figures of every pipeline (or one), for jobs created since ``since`` (epoch seconds)."""
    return summarise(store.performance_rows(pipeline, since))


def from_document(document: dict) -> PipelinePerformance:
    """A pipeline's figures from the API's JSON (``GET /api/performance``), for the CLI's table and plot."""
    values = dict(document)
    values["segments"] = [SegmentPerformance(**s) for s in document["segments"]]
    values["points"] = [CorrectedSegment(**p) for p in document["points"]]
    return PipelinePerformance(**values)


def table(performance: list[PipelinePerformance]) -> str:
    """The figures as a plain-text table a quality committee can read."""
    lines: list[str] = []
    for p in performance:
        versions = ", ".join(p.model_versions) or "no corrections yet"
        lines.append(f"{p.pipeline} ({versions})")
        lines.append(f"  studies processed {p.processed}, reviewed {p.reviewed}: accepted unchanged "
                     f"{p.accepted_unchanged}, corrected {p.corrected}, rejected {p.rejected}")
        if p.segments:
            lines.append(f"  {'segment':<24} {'n':>4} {'median Dice':>12} {'worst 10% Dice':>15} "
                         f"{'median HD95 mm':>15} {'median |dV| %':>14}")
            for s in p.segments:
                lines.append(f"  {s.segment:<24} {s.corrections:>4} {s.median_dice:>12.3f} {s.worst_decile_dice:>15.3f} "
                             f"{_fmt(s.median_hd95_mm):>15} {_fmt(s.median_abs_volume_difference_percent):>14}")
        for code, rho in p.spearman.items():
            lines.append(f"  Spearman({code}, 1 - Dice) = {_fmt(rho)} over "
                         f"{sum(1 for x in p.points if code in x.uncertainty)} corrected segments")
        lines.append(f"  review flag AUROC for 'needed a correction': {_fmt(p.review_flag_auroc)}")
    return "\n".join(lines) if lines else "no processed studies in this period"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def plot(performance: list[PipelinePerformance], target: Path) -> Path:
    """Per pipeline, Dice per segment (each correction a dot, the median a bar) and each uncertainty score
    against 1 − Dice with its Spearman; PNG or SVG by ``target``'s suffix (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if target.suffix.lower() not in (".png", ".svg"):
        raise ValueError(f"{target.name}: the plot is written as .png or .svg")
    rows = max(len(performance), 1)
    figure, axes = plt.subplots(rows, 2, figsize=(12, 4.5 * rows), squeeze=False)
    for (left, right), p in zip(axes, performance):
        labels = [s.segment for s in p.segments]
        for k, segment in enumerate(labels):
            dice = [x.dice for x in p.points if x.segment == segment]
            left.scatter(np.full(len(dice), k) + np.linspace(-0.15, 0.15, len(dice)), dice, s=14, alpha=0.7)
            left.hlines(p.segments[k].median_dice, k - 0.3, k + 0.3, colors="black")
        left.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        left.set_ylim(0, 1.02)
        left.set_ylabel("Dice to the clinician's correction")
        left.set_title(f"{p.pipeline}: agreement per segment (bar: median)")
        for code in p.spearman:
            pts = [x for x in p.points if code in x.uncertainty]
            right.scatter([x.uncertainty[code] for x in pts], [1 - x.dice for x in pts], s=14, alpha=0.7,
                          label=f"{code} (Spearman {_fmt(p.spearman[code])})")
        right.set_xlabel("uncertainty score")
        right.set_ylabel("1 - Dice")
        right.set_title(f"{p.pipeline}: does the uncertainty rank the corrections?")
        if p.spearman:
            right.legend()
        else:
            right.text(0.5, 0.5, "the pipeline scores no uncertainty", ha="center", transform=right.transAxes)
    figure.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target)
    plt.close(figure)
    return target
