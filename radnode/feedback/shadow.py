"""Shadow runs compared with their production run: the evidence a site promotes a candidate pipeline on.

A rule's ``shadow: [PIPELINE]`` runs the candidate on the production job's input after the production run
(``radnode/node/store/shadow.py``); its results stay under its job and are never delivered. Once both jobs are
final, the node's shadow thread compares them here, once per shadow job:

* segments: each of the production SEG's segments beside the candidate SEG's segment of the same coded
  property type (``corrections.property_key``), both read onto the source series' grid, measured with
  :func:`radnode.feedback.agreement.measure` (MONAI's Dice and HD95; the production segment is the reference);
* measurements: each measurement both runs' SRs report (same finding type, quantity, derivation and unit),
  with the candidate's value minus the production one;
* time: wall and CPU seconds of both runs, from their manifests (``RunManifest.seconds`` and the phases' CPU).

A failed run, or a side without a SEG, is recorded ``not-compared`` with why.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom

from radnode.config import Config
from radnode.execution import ManifestError, RunManifest
from radnode.feedback.corrections import compare, property_key, referenced_series, source_grid
from radnode.node.egress import outbox_dir
from radnode.node.store import Job, JobState, JobStore, ShadowComparison
from radnode.node.worker import job_dir
from radnode.outputs.provenance import own_result

log = logging.getLogger(__name__)

COMPARED, NOT_COMPARED = "compared", "not-compared"


@dataclass(frozen=True)
class ShadowSegment:
    """One segment both runs wrote (same coded property type): how far the candidate's is from production's."""

    segment: str
    """The production SEG's Segment Label."""
    property_type: str
    production_segment_number: int
    candidate_segment_number: int
    dice: float
    production_volume_ml: float
    candidate_volume_ml: float
    volume_difference_ml: float
    """Candidate minus production."""
    hd95_mm: float | None
    """Symmetric 95th-percentile surface distance (None when either segment is empty)."""


def run_outputs(config: Config, job: Job) -> Path:
    """Where a run's outputs are kept: a shadow run's in its job folder's ``out/`` (never staged); a production
    run's in its outbox once staged, else in ``out/``."""
    outbox = outbox_dir(config, job.id)
    return outbox if outbox.is_dir() and not job.shadow else job_dir(config, job.id) / "out"


def own_seg(folder: Path) -> Path | None:
    """The node's own SEG among a run's outputs, or None."""
    for path in sorted(folder.glob("*.dcm")):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        if header.get("Modality") == "SEG" and own_result(header) is not None:
            return path
    return None


def _manifest(folder: Path) -> RunManifest | None:
    try:
        return RunManifest.read(folder)
    except (OSError, ManifestError):
        return None


def _times(manifest: RunManifest | None) -> tuple[float | None, float | None]:
    """(wall, CPU) seconds of a run from its manifest; None where there is none."""
    if manifest is None:
        return None, None
    return manifest.seconds, round(sum(p.cpu_seconds for p in manifest.phases.values()), 3)


SegmentKeys = dict[int, tuple[object, str]]
"""A SEG's segments by number: their coded property type (``corrections.property_key``) and label."""


def segment_keys(seg) -> SegmentKeys:  # type: ignore[no-untyped-def]
    """The property type and label of each segment of a (highdicom) SEG, by segment number."""
    return {int(s.SegmentNumber): (property_key(s), str(s.SegmentLabel)) for s in seg.SegmentSequence}


def _code(item: dict | None) -> tuple[str, str] | None:
    return (item["scheme_designator"], item["value"]) if item else None


def _measurement_key(row: dict, segments: SegmentKeys) -> tuple:
    """What a measurement is of, independent of the pipeline that made it: the coded property type of the
    segment it measures (laterality included; else its finding type and tracking identifier), the quantity,
    its derivation and unit."""
    number = row.get("segment_number")
    site = segments[number][0] if number in segments else (_code(row.get("finding_type")), row.get("structure"))
    return site, _code(row.get("concept")), _code(row.get("derivation")), row.get("unit")


def _measurement_name(row: dict, segments: SegmentKeys) -> str:
    derivation = f" ({row['derivation']['meaning']})" if row.get("derivation") else ""
    number = row.get("segment_number")
    site = segments[number][1] if number in segments else (
        (row.get("finding_type") or {}).get("meaning") or row.get("structure") or "?")
    return f"{site}: {row['concept']['meaning']}{derivation}"


def compare_measurements(production: Iterable[dict], candidate: Iterable[dict], production_segments: SegmentKeys,
                         candidate_segments: SegmentKeys) -> list[dict]:
    """Each measurement both runs report (of segments of the same property type, same quantity, derivation and
    unit), in production's order: its name, unit, both values and the candidate's minus production's."""
    theirs = {_measurement_key(row, candidate_segments): row for row in candidate}
    rows = []
    for row in production:
        other = theirs.get(_measurement_key(row, production_segments))
        if other is None:
            continue
        rows.append({"measurement": _measurement_name(row, production_segments), "unit": row.get("unit"),
                     "production": float(row["value"]), "candidate": float(other["value"]),
                     "difference": float(other["value"]) - float(row["value"])})
    return rows


class ShadowComparer:
    """Compares every shadow job whose run and production run are over (one :meth:`tick` per round of the
    node's shadow thread); a comparison that cannot be made is kept ``not-compared`` with why."""

    def __init__(self, config: Config, store: JobStore) -> None:
        self.config = config
        self.store = store

    def tick(self) -> None:
        for shadow, production in self.store.shadows_to_compare():
            try:
                comparison = self.compare(shadow, production)
            except Exception as e:  # never stop the thread, never retry forever: kept with why
                log.exception("shadow job %d cannot be compared with job %d", shadow.id, production.id)
                comparison = self._record(shadow, production, NOT_COMPARED,
                                          f"cannot be compared: {type(e).__name__}: {e}")
            self.store.record_shadow_comparison(comparison)

    def compare(self, shadow: Job, production: Job) -> ShadowComparison:
        """The comparison of one shadow run with its production run (both final)."""
        import highdicom as hd

        ours_folder, theirs_folder = run_outputs(self.config, production), run_outputs(self.config, shadow)
        ours, theirs = _manifest(ours_folder), _manifest(theirs_folder)
        if shadow.state is JobState.FAILED:
            return self._record(shadow, production, NOT_COMPARED, f"the candidate run failed: {shadow.reason}",
                                ours, None)
        if ours is None:
            return self._record(shadow, production, NOT_COMPARED,
                                f"the production run left no results ({production.state}: {production.reason})",
                                None, theirs)
        our_seg, their_seg = own_seg(ours_folder), own_seg(theirs_folder)
        if our_seg is None or their_seg is None:
            missing = " and ".join(side for side, seg in (("production", our_seg), ("candidate", their_seg))
                                   if seg is None)
            measurements = compare_measurements(ours.measurements, theirs.measurements if theirs else [], {}, {})
            return self._record(shadow, production, NOT_COMPARED, f"no SEG from the {missing} run to compare",
                                ours, theirs, measurements=measurements)
        result, candidate = hd.seg.segread(our_seg), hd.seg.segread(their_seg)
        measurements = compare_measurements(ours.measurements, theirs.measurements if theirs else [],
                                            segment_keys(result), segment_keys(candidate))
        shared = [uid for uid in referenced_series(result) if uid in referenced_series(candidate)]
        if not shared:
            return self._record(shadow, production, NOT_COMPARED, "the two SEGs segment different series",
                                ours, theirs, measurements=measurements)
        grid = source_grid(i.path for i in self.store.job_inputs(production.id)
                           if i.series_instance_uid == shared[0])
        agreements, _ = compare(result, candidate, grid)
        segments = [ShadowSegment(segment=a.segment, property_type=a.property_type,
                                  production_segment_number=a.result_segment_number,
                                  candidate_segment_number=a.correction_segment_number, dice=a.dice,
                                  production_volume_ml=a.result_volume_ml, candidate_volume_ml=a.corrected_volume_ml,
                                  volume_difference_ml=a.volume_difference_ml, hd95_mm=a.hd95_mm)
                    for a in agreements]
        message = f"{len(segments)} common segment(s)"
        if segments:
            message += f", lowest Dice {min(s.dice for s in segments):.3f}"
        message += f"; {len(measurements)} measurement(s) both report"
        if ours.seconds and theirs is not None and theirs.seconds:
            message += f"; candidate wall time ×{theirs.seconds / ours.seconds:.2f}"
        return self._record(shadow, production, COMPARED, message, ours, theirs, [asdict(s) for s in segments],
                            measurements)

    @staticmethod
    def _record(shadow: Job, production: Job, state: str, message: str, ours: RunManifest | None = None,
                theirs: RunManifest | None = None, segments: list[dict] | None = None,
                measurements: list[dict] | None = None) -> ShadowComparison:
        (our_wall, our_cpu), (their_wall, their_cpu) = _times(ours), _times(theirs)
        return ShadowComparison(
            shadow_job_id=shadow.id, production_job_id=production.id,
            study_instance_uid=production.study_instance_uid, production_pipeline=production.pipeline,
            candidate_pipeline=shadow.pipeline, state=state, message=message, segments=segments or [],
            measurements=measurements or [], production_wall_seconds=our_wall, production_cpu_seconds=our_cpu,
            candidate_wall_seconds=their_wall, candidate_cpu_seconds=their_cpu, compared_at=time.time())


# --- the summary `radnode performance --compare` prints ---------------------------------------------


@dataclass(frozen=True)
class SegmentSummary:
    """A segment's Dice over the studies compared."""

    segment: str
    studies: int
    median_dice: float
    worst_decile_dice: float
    """The 10th percentile (linear interpolation): nine studies in ten agree at least this well."""
    median_hd95_mm: float | None


@dataclass(frozen=True)
class MeasurementSummary:
    """A measurement's difference (candidate minus production) over the studies compared."""

    measurement: str
    unit: str | None
    studies: int
    mean_difference: float
    mean_absolute_difference: float


@dataclass(frozen=True)
class ShadowSummary:
    """A production/candidate pair over its compared studies: what a site reads before promoting a candidate."""

    production: str
    candidate: str
    studies_compared: int
    not_compared: int
    candidate_failures: int
    segments: list[SegmentSummary]
    measurements: list[MeasurementSummary]
    wall_time_ratio: float | None
    """Median over the studies of the candidate's wall time over production's."""
    cpu_time_ratio: float | None

    def to_record(self) -> dict[str, object]:
        return asdict(self)


def summarise(production: str, candidate: str, comparisons: Iterable[ShadowComparison]) -> ShadowSummary:
    """The pair's comparisons summarised: per segment median and worst-decile Dice, per measurement the mean
    difference, and the median time ratios."""
    comparisons = list(comparisons)
    compared = [c for c in comparisons if c.state == COMPARED]
    dice: dict[str, list[float]] = {}
    hd95: dict[str, list[float]] = {}
    for c in compared:
        for s in c.segments:
            dice.setdefault(s["segment"], []).append(float(s["dice"]))
            if s.get("hd95_mm") is not None:
                hd95.setdefault(s["segment"], []).append(float(s["hd95_mm"]))
    differences: dict[tuple[str, str | None], list[float]] = {}
    for c in compared:
        for m in c.measurements:
            differences.setdefault((m["measurement"], m.get("unit")), []).append(float(m["difference"]))

    def ratio(pairs: list[tuple[float | None, float | None]]) -> float | None:
        values = [b / a for a, b in pairs if a and b is not None]
        return round(statistics.median(values), 3) if values else None

    return ShadowSummary(
        production=production, candidate=candidate, studies_compared=len(compared),
        not_compared=len(comparisons) - len(compared),
        candidate_failures=sum(c.message.startswith("the candidate run failed") for c in comparisons),
        segments=[SegmentSummary(name, len(values), float(np.median(values)), float(np.percentile(values, 10)),
                                 float(np.median(hd95[name])) if hd95.get(name) else None)
                  for name, values in dice.items()],
        measurements=[MeasurementSummary(name, unit, len(values), float(np.mean(values)),
                                         float(np.mean(np.abs(values))))
                      for (name, unit), values in differences.items()],
        wall_time_ratio=ratio([(c.production_wall_seconds, c.candidate_wall_seconds) for c in compared]),
        cpu_time_ratio=ratio([(c.production_cpu_seconds, c.candidate_cpu_seconds) for c in compared]),
    )


def summary_table(summary: ShadowSummary) -> str:
    """The summary as the plain-text table ``radnode performance --compare`` prints."""
    lines = [f"shadow comparison: {summary.candidate} (candidate) vs {summary.production} (production)",
             f"studies compared: {summary.studies_compared}; not compared: {summary.not_compared} "
             f"(candidate failed: {summary.candidate_failures})"]
    if summary.segments:
        lines.append(f"{'segment':<24} {'studies':>7} {'median Dice':>11} {'worst 10% Dice':>14} {'median HD95 mm':>14}")
        for s in summary.segments:
            hd = f"{s.median_hd95_mm:.3f}" if s.median_hd95_mm is not None else "-"
            lines.append(f"{s.segment:<24} {s.studies:>7} {s.median_dice:>11.3f} {s.worst_decile_dice:>14.3f} {hd:>14}")
    if summary.measurements:
        lines.append(f"{'measurement':<48} {'unit':<8} {'studies':>7} {'mean diff':>12} {'mean |diff|':>12}")
        for m in summary.measurements:
            lines.append(f"{m.measurement[:48]:<48} {m.unit or '':<8} {m.studies:>7} {m.mean_difference:>12.4g} "
                         f"{m.mean_absolute_difference:>12.4g}")
    for label, value in (("wall time", summary.wall_time_ratio), ("CPU time", summary.cpu_time_ratio)):
        lines.append(f"{label} candidate / production (median): " + (f"{value:.3f}" if value is not None else "-"))
    return "\n".join(lines)


def shadow_summaries(store: JobStore) -> list[ShadowSummary]:
    """Every production/candidate pair's summary (what ``/metrics`` carries)."""
    return [summarise(production, candidate, store.shadow_comparisons(production=production, candidate=candidate))
            for production, candidate in store.shadow_pairs()]
