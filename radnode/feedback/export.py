"""The feedback loop's records as tables a quality committee can take away: one registry, one entry per kind.

Each kind (:data:`EXPORTS`) names its columns and makes its rows from the job store; ``GET
/api/export/{kind}?format=csv|json`` and ``radnode export KIND`` serve every kind the same way. Rows carry no
patient identifiers: the columns of :data:`IDENTIFIERS` (Patient ID, name, birth date, accession number, the
study's and the correction's UIDs, a reviewer's free-text note, which may name the patient) are filled only for an
export that asks for them, by a role the site allows (``api.export_identifier_roles``). A new kind is one
function under :func:`export_kind`.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from radnode.node.store import JobStore
from radnode.node.store.records import CorrectionState

IDENTIFIERS = ("patient_id", "patient_name", "patient_birth_date", "accession_number", "study_instance_uid")
"""Columns every kind ends with when identifiers are asked for: who the patient is and which study."""

Row = dict[str, object]


@dataclass(frozen=True)
class ExportQuery:
    """What an export is asked for."""

    since: float | None = None
    """Epoch seconds: records from then on (corrections received, decisions taken, jobs created)."""
    pipeline: str | None = None
    identifiers: bool = False
    """Fill the identifier columns (the caller's role was checked for it)."""


@dataclass(frozen=True)
class ExportKind:
    """One exportable kind: its columns (without identifiers) and how its rows are made."""

    name: str
    description: str
    columns: tuple[str, ...]
    rows: Callable[[JobStore, ExportQuery], list[Row]]
    private_columns: tuple[str, ...] = ()
    """The kind's own columns that may identify a patient (kept only with identifiers), before :data:`IDENTIFIERS`."""

    def all_columns(self, identifiers: bool) -> tuple[str, ...]:
        return self.columns + (self.private_columns + IDENTIFIERS if identifiers else ())


EXPORTS: dict[str, ExportKind] = {}
"""Every exportable kind by name."""


def export_kind(name: str, description: str, columns: Iterable[str], private_columns: Iterable[str] = ()):  # type: ignore[no-untyped-def]
    """Register the decorated ``rows(store, query)`` as the export ``name``."""
    def register(rows: Callable[[JobStore, ExportQuery], list[Row]]) -> Callable[[JobStore, ExportQuery], list[Row]]:
        if name in EXPORTS:
            raise ValueError(f"export kind {name!r} is registered twice")
        EXPORTS[name] = ExportKind(name, description, tuple(columns), rows, tuple(private_columns))
        return rows
    return register


class UnknownExport(LookupError):
    """An export kind no entry of the registry names."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"no export {kind!r}: one of {', '.join(sorted(EXPORTS))}")


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat()


@export_kind("agreement", "Per matched correction and segment: Dice, volumes, their difference, HD95, uncertainty",
             ("job_id", "pipeline", "model_version", "received_at", "segment", "property_type", "dice",
              "result_volume_ml", "corrected_volume_ml", "volume_difference_ml", "volume_difference_percent",
              "hd95_mm", "uncertainty"), private_columns=("correction_sop_instance_uid",))
def _agreement(store: JobStore, query: ExportQuery) -> list[Row]:
    rows: list[Row] = []
    pipelines: dict[int, str] = {}
    for correction in store.corrections(state=CorrectionState.MATCHED):
        if correction.job_id is None or (query.since is not None and correction.received_at < query.since):
            continue
        if correction.job_id not in pipelines:
            job = store.job(correction.job_id)
            pipelines[correction.job_id] = job.pipeline if job is not None else ""
        if query.pipeline is not None and pipelines[correction.job_id] != query.pipeline:
            continue
        for segment in correction.agreement:
            rows.append({"job_id": correction.job_id, "pipeline": pipelines[correction.job_id],
                         "model_version": correction.model_version, "received_at": _iso(correction.received_at),
                         **{key: segment.get(key) for key in ("segment", "property_type", "dice", "result_volume_ml",
                                                              "corrected_volume_ml", "volume_difference_ml",
                                                              "volume_difference_percent", "hd95_mm")},
                         "uncertainty": segment.get("uncertainty") or {},
                         "correction_sop_instance_uid": correction.sop_instance_uid})
    return rows


@export_kind("reviews", "Every decision on a job's results: who, when, accepted / corrected / rejected and why",
             ("job_id", "pipeline", "decision", "reason", "reviewer", "at"), private_columns=("note",))
def _reviews(store: JobStore, query: ExportQuery) -> list[Row]:
    rows: list[Row] = []
    for review in store.review_rows(query.pipeline, query.since):
        reason, note = None, review.note
        if review.decision == "rejected":
            reason, _, note = review.note.partition("; ")
        rows.append({"job_id": review.job_id, "pipeline": review.pipeline, "decision": review.decision,
                     "reason": reason, "reviewer": review.reviewer, "at": _iso(review.at), "note": note})
    return rows


@export_kind("performance", "Local performance per pipeline and segment (as `radnode performance` shows it)",
             ("pipeline", "model_versions", "processed", "reviewed", "accepted_unchanged", "corrected", "rejected",
              "review_flag_auroc", "spearman", "segment", "corrections", "median_dice", "worst_decile_dice",
              "median_hd95_mm", "median_abs_volume_difference_percent"))
def _performance(store: JobStore, query: ExportQuery) -> list[Row]:
    from radnode.feedback.performance import local_performance

    rows: list[Row] = []
    for p in local_performance(store, query.pipeline, query.since):
        common: Row = {"pipeline": p.pipeline, "model_versions": p.model_versions, "processed": p.processed,
                       "reviewed": p.reviewed, "accepted_unchanged": p.accepted_unchanged, "corrected": p.corrected,
                       "rejected": p.rejected, "review_flag_auroc": p.review_flag_auroc, "spearman": p.spearman}
        rows += [{**common, "segment": s.segment, "corrections": s.corrections, "median_dice": s.median_dice,
                  "worst_decile_dice": s.worst_decile_dice, "median_hd95_mm": s.median_hd95_mm,
                  "median_abs_volume_difference_percent": s.median_abs_volume_difference_percent}
                 for s in p.segments] or [common]
    return rows


@export_kind("drift", "Per pipeline and attribute: the latest PSI and two-sample p of the window against the baseline",
             ("pipeline", "attribute", "kind", "psi", "p_value", "drifting", "baseline_n", "window_n", "baseline",
              "window", "evaluated_at"))
def _drift(store: JobStore, query: ExportQuery) -> list[Row]:
    return [{"pipeline": p["pipeline"], **a, "evaluated_at": _iso(a["evaluated_at"])}
            for p in store.drift_document(query.pipeline) for a in p["attributes"]
            if query.since is None or a["evaluated_at"] >= query.since]


@export_kind("drift-alerts", "Every drift episode: the attribute, its PSI when raised and at its peak, raised and "
                             "cleared when", ("pipeline", "attribute", "kind", "psi", "peak_psi", "p_value", "message",
                                              "raised_at", "cleared_at"))
def _drift_alerts(store: JobStore, query: ExportQuery) -> list[Row]:
    return [{"pipeline": p["pipeline"], **{k: v for k, v in a.items() if k != "id"},
             "raised_at": _iso(a["raised_at"]), "cleared_at": _iso(a["cleared_at"])}
            for p in store.drift_document(query.pipeline) for a in p["alerts"]
            if query.since is None or a["raised_at"] >= query.since]


SHADOW_SEGMENT_COLUMNS = ("segment", "property_type", "dice", "production_volume_ml", "candidate_volume_ml",
                          "volume_difference_ml", "hd95_mm")


@export_kind("shadow", "Per shadow run and common segment: the candidate's Dice, volumes and HD95 against production's, "
                       "and both run times", ("job_id", "shadow_job_id", "production_pipeline", "candidate_pipeline",
                                              "state", "message", *SHADOW_SEGMENT_COLUMNS, "production_wall_seconds",
                                              "candidate_wall_seconds", "production_cpu_seconds",
                                              "candidate_cpu_seconds", "compared_at"))
def _shadow(store: JobStore, query: ExportQuery) -> list[Row]:
    rows: list[Row] = []
    for c in store.shadow_comparisons(since=query.since):
        if query.pipeline is not None and query.pipeline not in (c.production_pipeline, c.candidate_pipeline):
            continue
        common: Row = {"job_id": c.production_job_id, "shadow_job_id": c.shadow_job_id,
                       "production_pipeline": c.production_pipeline, "candidate_pipeline": c.candidate_pipeline,
                       "state": c.state, "message": c.message, "production_wall_seconds": c.production_wall_seconds,
                       "candidate_wall_seconds": c.candidate_wall_seconds,
                       "production_cpu_seconds": c.production_cpu_seconds,
                       "candidate_cpu_seconds": c.candidate_cpu_seconds, "compared_at": _iso(c.compared_at)}
        rows += [{**common, **{k: segment.get(k) for k in SHADOW_SEGMENT_COLUMNS}} for segment in c.segments] or [common]
    return rows


def _patient_identifiers(store: JobStore, outbox: Callable[[int], Path], job_ids: set[int]) -> dict[int, Row]:
    """Each job's patient and study identifiers: Patient ID and study from the store, the accession number from
    the study's details, name and birth date from the header of an object of the job's outbox."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    found: dict[int, Row] = {}
    for job_id in job_ids:
        job = store.job(job_id)
        if job is None:
            continue
        details = store.study_details([job.study_instance_uid]).get(job.study_instance_uid)
        name = birth = None
        for path in sorted(outbox(job_id).glob("*.dcm")):
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True,
                                         specific_tags=["PatientName", "PatientBirthDate"])
            except (OSError, InvalidDicomError):
                continue
            name, birth = str(header.get("PatientName", "")), str(header.get("PatientBirthDate", ""))
            break
        found[job_id] = {"patient_id": job.patient_id, "patient_name": name, "patient_birth_date": birth,
                         "accession_number": details.accession_number if details is not None else None,
                         "study_instance_uid": job.study_instance_uid}
    return found


def export_rows(kind: str, store: JobStore, outbox: Callable[[int], Path], query: ExportQuery) -> list[Row]:
    """The rows of export ``kind`` with exactly its columns: identifiers only when ``query.identifiers``
    (``outbox(job_id)``: the job's outbox folder, whose objects name the patient). UnknownExport for a kind the
    registry does not hold."""
    entry = EXPORTS.get(kind)
    if entry is None:
        raise UnknownExport(kind)
    rows = entry.rows(store, query)
    columns = entry.all_columns(query.identifiers)
    if query.identifiers:
        identities = _patient_identifiers(store, outbox, {int(r["job_id"]) for r in rows if r.get("job_id")})
        rows = [{**row, **identities.get(int(row["job_id"]), {})} if row.get("job_id") else row for row in rows]
    return [{column: row.get(column) for column in columns} for row in rows]


def _cell(value: object) -> object:
    """One CSV cell: nested values as JSON; text a spreadsheet would run as a formula (``=``, ``+``, ``-``,
    ``@`` first: a segment label or user name is someone else's text) quoted with ``'`` (OWASP CSV injection)."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def as_csv(kind: str, rows: list[Row], identifiers: bool) -> str:
    """The rows as CSV with a header line (the kind's columns, even without rows)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EXPORTS[kind].all_columns(identifiers))
    for row in rows:
        writer.writerow([_cell(v) for v in row.values()])
    return out.getvalue()
