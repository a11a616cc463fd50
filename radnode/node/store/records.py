"""The job store's durable records as the rest of the node sees them, and how rows become records.

Rows are mapped by column name (``row._mapping``), never by position, so a new column is one line here.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from radnode.pipelines.routing import Execution, ExecutionMode, Priority, Provenance


class JobState(StrEnum):
    """Where a job is in its life; ``done`` and ``failed`` are final."""

    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    DELIVERING = "delivering"
    DONE = "done"
    FAILED = "failed"


FINAL_STATES = (JobState.DONE, JobState.FAILED)
UNFINISHED_STATES = tuple(s for s in JobState if s not in FINAL_STATES)

CANCELLED_BY = "cancelled by"
"""How the reason of a job an operator cancelled begins (it ends ``failed`` with it)."""


class ActionRefused(ValueError):
    """An operator's action (re-send, retry, cancel, review) that does not apply to the job as it is; the
    message says why. Guarded like the node's own transitions, so two operators clicking at once act once."""


class ShadowNotDelivered(RuntimeError):
    """A shadow run's results offered for delivery: refused by the store, whoever asks (a candidate pipeline's
    results are compared, never sent to a PACS or an EHR)."""


class ResultsOutOfDate(RuntimeError):
    """A job's results offered for delivery after a later job of the same study and pipeline (made when more of
    the study had arrived) delivered its own: sent now, the older ones would replace the newer at the PACS and
    in the EHR, so they never go out."""


class InstanceFileGone(RuntimeError):
    """A re-sent instance was to keep its earlier copy's file, which a retention purge removed meanwhile: the
    caller writes the file it received and records the instance again."""


class InstanceBeingPurged(OSError):
    """An instance arrived again while the retention purge removing its earlier copy is under way (a
    transient refusal: the sender is told to try again later)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EBUSY, message)


class ForeignInstance(ValueError):
    """An instance whose SOP Instance UID the store already holds under another study: refused, never merged
    into the first study (the message names both studies)."""


class Arrival(StrEnum):
    """What recording an instance meant for its study."""

    NEW = "new"
    """Part of a study still being received."""
    LATE = "late"
    """Its study's job had already started; kept and logged, not part of that job's input."""
    DUPLICATE = "duplicate"
    """The SOP instance was already indexed; the first copy is kept."""
    OWN_RESULT = "own-result"
    """A result of the node's own come back after its study's job started: kept and logged, never processed."""


@dataclass(frozen=True)
class Instance:
    """One received SOP instance and where it came from."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    modality: str
    sop_class_uid: str
    path: str
    calling_ae: str = ""
    peer_address: str = ""
    association_id: str = ""
    received_at: float = 0.0


INSTANCE_FIELDS = tuple(Instance.__dataclass_fields__)
"""The ``instances`` columns an :class:`Instance` is made of (same names, but ``patient_id``: the column
``sealed_patient_id``)."""


@dataclass(frozen=True)
class Job:
    """A pipeline run for one study, from first instance to delivered results."""

    id: int
    study_instance_uid: str
    patient_id: str
    pipeline: str
    state: JobState
    calling_ae: str
    peer_address: str
    instances: int
    late_instances: int
    created_at: float
    last_instance_at: float
    updated_at: float
    runs: int
    reason: str | None
    """Why the job failed, or why a study was not processed (every series skipped: ``not processed: …``)."""
    priority: Priority = Priority.ROUTINE
    forwards: tuple[str, ...] = ()
    """Destinations of the study's route: results go there, or the study itself on a forward-only route."""
    execution: Execution = Execution()
    """The execution settings of the routes that chose the job's pipeline (set when it is queued)."""
    needs_review: bool | None = None
    """The run flagged the study for human review (its uncertainty passed a limit); None: not assessed."""
    review_reasons: tuple[str, ...] = ()
    """Why, one sentence per score past its limit (e.g. ``lesion: mean uncertainty 0.471 > 0.2``)."""
    purged_at: float | None = None
    """When retention last removed the job's files (spool instances, job folder, outbox); None: never."""
    sibling_of: int | None = None
    """The main job this job runs another selected pipeline for (its input is that job's); None for a study's
    own job. A sibling's ``instances`` are the main job's."""
    own_results: int = 0
    """Instances recorded with the job that are results of the node's own (never processed; counted in
    ``late_instances`` too when they came after the job started)."""
    queue: str = ""
    """The broker queue the rules name for the job ('' for the default), with the distributed engine."""
    attempt: int = 0
    """The current (or last) attempt on a worker, with the distributed engine; 0 before any."""
    worker: str = ""
    """The worker running (or that last ran) the current attempt."""
    shadow: bool = False
    """A shadow run of a candidate pipeline beside job ``sibling_of`` (the production job): its results are
    stored under the job and compared with the production run's, never delivered."""


def _as_stored(value: str) -> str:
    return value


def job_from_row(row: Mapping[str, Any], open_identity: Callable[[str], str] = _as_stored) -> Job:
    """A :class:`Job` from a row of :data:`radnode.node.store.queries.job_columns`, its patient identifier opened
    with ``open_identity`` (the store's seal)."""
    return Job(
        id=row["id"], study_instance_uid=row["study_instance_uid"],
        patient_id=open_identity(row["sealed_patient_id"]),
        pipeline=row["pipeline"], state=JobState(row["state"]), calling_ae=row["calling_ae"],
        peer_address=row["peer_address"], instances=row["instances"], late_instances=row["late_instances"],
        created_at=row["created_at"], last_instance_at=row["last_instance_at"], updated_at=row["updated_at"],
        runs=row["runs"], reason=row["reason"], priority=Priority.from_rank(row["priority"]),
        forwards=split_names(row["forwards"]), execution=execution_from(row["execution_mode"], row["timeout_seconds"]),
        needs_review=None if row["needs_review"] is None else bool(row["needs_review"]),
        review_reasons=tuple(json.loads(row["review_reasons"] or "[]")), purged_at=row["purged_at"],
        sibling_of=row["sibling_of"], own_results=row["own_results"], queue=row["queue"], attempt=row["attempt"],
        worker=row["worker"], shadow=bool(row["shadow"]))


def instance_from_row(row: Mapping[str, Any], open_identity: Callable[[str], str] = _as_stored) -> Instance:
    """An :class:`Instance` from a row with the :data:`INSTANCE_FIELDS` columns (the patient identifier's is
    ``sealed_patient_id``, opened with ``open_identity``)."""
    values = {name: row[name] for name in INSTANCE_FIELDS if name != "patient_id"}
    return Instance(**values, patient_id=open_identity(row["sealed_patient_id"]))


def execution_from(mode: str, timeout_seconds: float | None) -> Execution:
    """Execution settings from their two job columns ('' mode: the node's default)."""
    return Execution(ExecutionMode(mode) if mode else None, timeout_seconds)


def split_names(text: str) -> tuple[str, ...]:
    """Names stored comma-separated (destination and pipeline names have no commas)."""
    return tuple(t for t in (text or "").split(",") if t)


@dataclass(frozen=True)
class Event:
    """One line of a job's append-only log."""

    id: int
    job_id: int
    at: float
    kind: str
    message: str


@dataclass(frozen=True)
class Attempt:
    """One run of a job on a worker (the distributed engine)."""

    job_id: int
    number: int
    worker: str
    started_at: float
    ended_at: float | None
    outcome: str
    """``running``, ``completed``, ``failed`` or ``lost`` (its worker died or vanished)."""
    reason: str


@dataclass(frozen=True)
class WorkerInfo:
    """A ``radnode worker`` process as it last reported itself."""

    name: str
    host: str
    queues: tuple[str, ...]
    gpus: str
    pid: int
    started_at: float
    heartbeat_at: float
    current_job: int | None
    stopped_at: float | None


@dataclass(frozen=True)
class PurgePlan:
    """What one retention purge of one job removes, as recorded in the store before any file goes."""

    job_id: int
    state: JobState
    final_at: float
    """When the job reached its final state (its ``updated_at``)."""
    marker: float
    """The purge's start: ``purge_started_at`` of the job and ``purged_at`` of the instances it removes."""
    paths: tuple[str, ...]
    """Spool files of the instances this purge removes."""
    kept_for: tuple[tuple[int, int], ...] = ()
    """(job id, instances): instances of this job kept because that newer, not yet purgeable job needs them."""
    resumed: bool = False
    """Finishing a purge that was interrupted (the node or the command stopped between its steps)."""
    folders_kept_for: int | None = None
    """The newer job, not staged yet, that still needs this job's ``jobs/`` and ``outbox/`` folders (a re-run's
    rejection note is made of the results in the outbox): they stay, and go with the purge of the instances kept."""


@dataclass(frozen=True)
class Delivery:
    """One object for one destination of one job, with its retry state."""

    id: int
    job_id: int
    destination: str
    object: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    sent_uid: str | None = None
    """The SOP Instance UID that went out (DICOM objects), once delivered."""


DELIVERY_FIELDS = tuple(Delivery.__dataclass_fields__)


def delivery_from_row(row: Mapping[str, Any]) -> Delivery:
    """A :class:`Delivery` from a ``deliveries`` row."""
    return Delivery(**{name: row[name] for name in DELIVERY_FIELDS})


def provenance_of(text: str | None) -> Provenance:
    """An instance's provenance column (older rows: external)."""
    return Provenance(text) if text else Provenance.EXTERNAL


class CorrectionState(StrEnum):
    """Where a clinician's correction stands (``feedback.py``)."""

    PENDING = "pending"
    """Recorded at arrival, not yet matched."""
    MATCHED = "matched"
    """Matched to the job whose SEG it corrects; its agreement is recorded."""
    UNMATCHED = "unmatched"
    """No job's result fits (source series, Frame of Reference, segment types): kept and listed."""
    UNREADABLE = "unreadable"
    """Not readable as a SEG on its source series' grid; kept and listed with why."""


@dataclass(frozen=True)
class Correction:
    """A correction candidate and how it was settled."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: str
    calling_ae: str
    received_at: float
    state: CorrectionState
    job_id: int | None
    result_sop_instance_uid: str | None
    model_version: str
    agreement: list[dict]
    """Per segment, as ``radnode.feedback.agreement.SegmentAgreement.to_record`` writes it."""
    message: str
    settled_at: float | None


@dataclass(frozen=True)
class ReviewRow:
    """One reviewer's decision on a job's results, as exported."""

    id: int
    job_id: int
    pipeline: str
    decision: str
    reviewer: str
    note: str
    """The rejection reason first (``wrong-series; the scout was sent``), then the reviewer's free text."""
    at: float


@dataclass(frozen=True)
class ReissuePlan:
    """What a decision's re-issue sends, as egress planned it once the decision's objects were written: the store
    queues it in the transaction that records the decision (``Console.decide``)."""

    summary: str
    """What the job's ``reissue`` events start with (the decision, who, the review)."""
    deliveries: list[tuple[str, str]] | None
    """(destination, ``review-<id>/…`` object) to queue; None: the objects could not be written, nothing goes."""
    notes: list[str] = field(default_factory=list)
    """What else the job's log says of it (destinations left out, why nothing could be written)."""


@dataclass(frozen=True)
class MatchedCorrection:
    """A matched correction as local performance reads it."""

    job_id: int
    pipeline: str
    model_version: str
    needs_review: bool | None
    """The run's own review flag (None: the pipeline does not assess one)."""
    agreement: list[dict]


@dataclass(frozen=True)
class PerformanceRows:
    """The store's rows behind ``radnode performance`` (``Feedback.performance_rows``)."""

    processed: dict[str, int]
    """Done jobs per pipeline."""
    decisions: list[tuple[int, str, str]]
    """(job id, pipeline, latest review decision) of every reviewed job."""
    matched: list[MatchedCorrection]


@dataclass(frozen=True)
class ShadowComparison:
    """A shadow run compared with its production run on the same input (``radnode/feedback/shadow.py``)."""

    shadow_job_id: int
    production_job_id: int
    study_instance_uid: str
    production_pipeline: str
    candidate_pipeline: str
    state: str
    """``compared``, or ``not-compared`` (``message`` says why: a run failed, neither wrote a SEG, …)."""
    message: str
    segments: list[dict]
    """Per common segment (same coded property type): label, property type, Dice, both volumes, HD95."""
    measurements: list[dict]
    """Each measurement both runs report: its name, unit, both values and the candidate's minus production's."""
    production_wall_seconds: float | None
    production_cpu_seconds: float | None
    candidate_wall_seconds: float | None
    candidate_cpu_seconds: float | None
    compared_at: float

    def to_record(self) -> dict[str, object]:
        """As the API answers it."""
        return asdict(self)
