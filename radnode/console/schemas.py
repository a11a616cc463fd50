"""The API's documents (Pydantic models, which FastAPI turns into the OpenAPI schema).

Times are ISO-8601 in UTC (``2026-12-01T10:15:00.250000Z``), states and priorities by name. Patient fields
(``patient_id``) are null for a caller whose role may not see patient data (``api.patient_data_roles``), and so
are free texts that may quote it (a pipeline's error output, a note an operator typed): those are named in the
document's ``withheld``.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from radnode.node.store import (
    CANCELLED_BY, Correction, CorrectionState, Delivery, Event, Job, JobState, ShadowComparison, StudyDetails,
)

Priority = StrEnum("Priority", {"STAT": "stat", "ROUTINE": "routine", "OFF_PEAK": "off-peak"})  # type: ignore[misc]
"""A job's priority by name (the store orders by rank: off-peak 0, routine 1, stat 2)."""
_PRIORITY_BY_RANK = {0: "off-peak", 1: "routine", 2: "stat"}


def utc(epoch: float | None) -> dt.datetime | None:
    """An epoch time (as the store keeps it) as an aware UTC datetime."""
    return None if epoch is None else dt.datetime.fromtimestamp(epoch, dt.timezone.utc)


def priority_name(value: object) -> str:
    """A stored priority (its rank, or already its name) by name."""
    if isinstance(value, int):
        return _PRIORITY_BY_RANK.get(value, "routine")
    return str(getattr(value, "value", value))


class Document(BaseModel):
    """An API document: unknown fields are an error, never silently dropped."""

    model_config = ConfigDict(extra="forbid")


WITHHELD = "withheld for your role"
"""What the dashboard and ``radnode jobs`` show in place of a text named in a document's ``withheld``."""

WITHHELD_DESCRIPTION = ("fields given as null because they are free text that may quote patient data (a "
                        "pipeline's error output, an operator's note) and the caller's role may not see it")

WITHHELD_EVENTS = frozenset({"retry", "refusals-waived", "cancelled", "reviewed", "resend", "forced-complete", "failed"})
"""Event kinds whose message may quote what a person typed (an operator's note) or a pipeline wrote (``failed``:
the last line of its stderr), either of which can name the patient."""

WITHHELD_FAILURES = frozenset({"cancelled", "processing"})
"""Failure kinds whose reason may quote patient data: a cancel's note, a processing failure's last stderr line."""


class JobSummary(Document):
    """A job as the job list shows it."""

    id: int
    study_instance_uid: str
    patient_id: str | None = Field(description="null when the caller's role may not see patient data")
    accession_number: str | None = Field(description="null when the caller's role may not see patient data")
    study_description: str
    modalities: list[str] = Field(description="modalities of the instances received for the study")
    pipeline: str
    state: JobState
    reason: str | None = Field(description="why it failed, or why the study was not processed")
    needs_review: bool | None = Field(description="true: flagged for human review; false: assessed, not flagged; "
                                                   "null: not assessed")
    review_reasons: list[str]
    reviewed_by: str | None = Field(description="who marked the flagged job reviewed (null: not yet)")
    failure: str | None = Field(description="why a failed job failed, by kind: delivery (re-send it), cancelled, "
                                            "refused (instances of its study were refused at ingest: re-send them "
                                            "corrected, or retry without them), or processing; null unless failed")
    priority: Priority
    calling_ae: str
    peer_address: str
    instances: int
    late_instances: int
    runs: int
    created_at: dt.datetime
    updated_at: dt.datetime
    purged_at: dt.datetime | None = Field(description="when retention removed the job's files")
    sibling_of: int | None = Field(description="the study's main job when this one runs a further pipeline")
    shadow: bool = Field(False, description="a shadow run of a candidate pipeline beside job sibling_of: its "
                                            "results are compared with that job's, never delivered")
    withheld: list[Literal["reason"]] = Field(default_factory=list, description=WITHHELD_DESCRIPTION)


class EventDocument(Document):
    id: int
    at: dt.datetime
    kind: str
    message: str | None = Field(description="null when withheld")
    withheld: list[Literal["message"]] = Field(default_factory=list, description=WITHHELD_DESCRIPTION)


class DeliveryDocument(Document):
    id: int
    destination: str
    object: str
    state: str
    attempts: int
    next_attempt_at: dt.datetime | None
    last_error: str | None = Field(description="null when withheld (a cancelled delivery's error is the job's "
                                                "cancel reason, with its note)")
    sent_uid: str | None = Field(None, description="the SOP Instance UID that went out (a DICOM object), once "
                                                   "delivered: a re-send sends the same")
    withheld: list[Literal["last_error"]] = Field(default_factory=list, description=WITHHELD_DESCRIPTION)


class SegmentAgreementDocument(Document):
    """One segment of the node's SEG beside the clinician's segment of the same coded property type."""

    segment: str = Field(description="the node's Segment Label")
    property_type: str = Field(description="the coded Segmented Property Type both share (and its modifiers)")
    result_segment_number: int
    correction_segment_number: int
    dice: float
    result_volume_ml: float
    corrected_volume_ml: float
    volume_difference_ml: float = Field(description="corrected minus the node's, in mL")
    volume_difference_percent: float | None = Field(description="of the node's volume; null when it is empty")
    hd95_mm: float | None = Field(description="symmetric 95th-percentile surface distance (MONAI); null when "
                                              "either segment is empty")
    uncertainty: dict[str, float] = Field(default_factory=dict, description="the node's uncertainty scores of "
                                                                             "its segment, by concept code")


class CorrectionDocument(Document):
    """A clinician's corrected SEG and how the node settled it."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    calling_ae: str
    received_at: dt.datetime
    state: CorrectionState = Field(description="pending, matched, unmatched (kept and listed: no job's result "
                                               "fits) or unreadable")
    job_id: int | None = Field(description="the job whose SEG it corrects (matched only)")
    result_sop_instance_uid: str | None = Field(description="the node's SEG it was compared with")
    message: str
    settled_at: dt.datetime | None
    segments: list[SegmentAgreementDocument]


class CorrectionList(Document):
    corrections: list[CorrectionDocument]


class SegmentPerformanceDocument(Document):
    segment: str
    corrections: int
    median_dice: float
    worst_decile_dice: float = Field(description="10th percentile of Dice")
    median_hd95_mm: float | None
    median_abs_volume_difference_percent: float | None


class CorrectedSegmentDocument(Document):
    job_id: int
    segment: str
    dice: float
    uncertainty: dict[str, float]


class PipelinePerformanceDocument(Document):
    """One pipeline's local performance (``radnode.feedback.performance``)."""

    pipeline: str
    model_versions: list[str]
    processed: int
    reviewed: int
    accepted_unchanged: int
    corrected: int
    rejected: int
    segments: list[SegmentPerformanceDocument]
    spearman: dict[str, float | None] = Field(description="per uncertainty score: Spearman's rho with 1 - Dice")
    review_flag_auroc: float | None = Field(description="AUROC of the review flag for 'needed a correction'")
    points: list[CorrectedSegmentDocument]


class PerformanceDocument(Document):
    pipelines: list[PipelinePerformanceDocument]
    since: dt.datetime | None


class DriftAttributeDocument(Document):
    """One attribute's latest comparison of the window with the baseline (``radnode.feedback.drift``)."""

    attribute: str
    kind: Literal["input", "output"]
    psi: float = Field(description="population stability index of the window against the baseline")
    p_value: float = Field(description="two-sample test: Kolmogorov-Smirnov (numbers) or chi-squared (categories)")
    drifting: bool = Field(description="PSI at or past feedback.drift.psi_alert and p below feedback.drift.p_value")
    baseline_n: int
    window_n: int
    baseline: str = Field(description="the baseline in words: median and range, or the commonest categories")
    window: str
    evaluated_at: float


class DriftAlertDocument(Document):
    """One drift episode of an attribute: raised once, cleared when the attribute is back under the threshold."""

    id: int
    attribute: str
    kind: Literal["input", "output"]
    psi: float = Field(description="PSI when the alert was raised")
    peak_psi: float
    p_value: float
    message: str
    raised_at: float
    cleared_at: float | None = Field(description="null while the shift lasts")


class PipelineDriftDocument(Document):
    pipeline: str
    studies: int = Field(description="studies recorded for drift (done jobs of the pipeline)")
    attributes: list[DriftAttributeDocument]
    alerts: list[DriftAlertDocument]


class DriftDocument(Document):
    """Drift of each pipeline's inputs and outputs against its baseline; no patient identifier."""

    method: str
    window: int
    baseline: str
    bins: int
    psi_alert: float
    p_value: float | None
    pipelines: list[PipelineDriftDocument]
class ShadowSegmentDocument(Document):
    """A segment both runs wrote (same coded property type): the candidate's beside production's."""

    segment: str = Field(description="the production SEG's Segment Label")
    property_type: str
    production_segment_number: int
    candidate_segment_number: int
    dice: float
    production_volume_ml: float
    candidate_volume_ml: float
    volume_difference_ml: float = Field(description="candidate minus production, in mL")
    hd95_mm: float | None = Field(description="symmetric 95th-percentile surface distance (MONAI); null when "
                                              "either segment is empty")


class ShadowMeasurementDocument(Document):
    measurement: str
    unit: str | None
    production: float
    candidate: float
    difference: float = Field(description="candidate minus production")


class ShadowComparisonDocument(Document):
    """A shadow run compared with its production run on the same input."""

    shadow_job_id: int
    production_job_id: int
    production_pipeline: str
    candidate_pipeline: str
    state: Literal["compared", "not-compared"]
    message: str
    segments: list[ShadowSegmentDocument]
    measurements: list[ShadowMeasurementDocument]
    production_wall_seconds: float | None
    production_cpu_seconds: float | None
    candidate_wall_seconds: float | None
    candidate_cpu_seconds: float | None
    compared_at: dt.datetime


class ShadowSegmentSummaryDocument(Document):
    segment: str
    studies: int
    median_dice: float
    worst_decile_dice: float = Field(description="10th percentile of Dice")
    median_hd95_mm: float | None


class ShadowMeasurementSummaryDocument(Document):
    measurement: str
    unit: str | None
    studies: int
    mean_difference: float = Field(description="candidate minus production, averaged over the studies")
    mean_absolute_difference: float


class ShadowSummaryDocument(Document):
    """A production/candidate pair over its compared studies (``radnode performance --compare``)."""

    production: str
    candidate: str
    studies_compared: int
    not_compared: int
    candidate_failures: int
    segments: list[ShadowSegmentSummaryDocument]
    measurements: list[ShadowMeasurementSummaryDocument]
    wall_time_ratio: float | None = Field(description="median of candidate over production wall time")
    cpu_time_ratio: float | None = Field(description="median of candidate over production CPU time")
    since: dt.datetime | None


class JobDetail(JobSummary):
    """One job with its event log, deliveries, clinicians' corrections of its results and shadow comparisons."""

    events: list[EventDocument]
    deliveries: list[DeliveryDocument]
    corrections: list[CorrectionDocument]
    shadow_comparisons: list[ShadowComparisonDocument] = Field(
        default_factory=list, description="candidate pipelines' shadow runs compared with this job's run (or, for "
                                          "a shadow job, its own comparison)")


class JobList(Document):
    jobs: list[JobSummary]
    total: int = Field(description="jobs matching the filters (the page holds at most `limit` of them)")


class WorkerSummary(Document):
    """A ``radnode worker`` process of the distributed engine as it last reported itself."""

    name: str
    host: str
    queues: list[str]
    gpus: str = Field(description="GPU indices it sees (CUDA_VISIBLE_DEVICES), or cpu")
    pid: int
    state: Literal["idle", "busy", "lost", "stopped"] = Field(
        description="lost: no heartbeat for longer than engine.lease_seconds")
    current_job: int | None
    last_heartbeat: float = Field(description="seconds since the epoch")
    started_at: float


class WorkerList(Document):
    workers: list[WorkerSummary]


class Health(Document):
    status: str
    jobs: dict[str, int] = Field(description="jobs per state")
    needs_review: int = Field(description="jobs flagged for human review")


class Me(Document):
    name: str
    role: str
    kind: str = Field(description="user (signed in) or token")
    patient_data: bool = Field(description="whether this identity is shown patient data")


class Problem(Document):
    """What an error answer carries."""

    detail: Any


class Queued(Document):
    queued: bool


class StowFailure(Document):
    sop_instance_uid: str | None
    reason: str


class StowResult(Document):
    """What a STOW-RS request stored (the API's JSON view; DICOM JSON clients get the same as a 0008,1199 list)."""

    stored: list[str]
    failed: list[StowFailure]


JobIdPath = Annotated[int, Field(ge=1, le=2**62)]


def failure_kind(job: Job) -> str | None:
    """``delivery``, ``cancelled``, ``refused`` or ``processing`` for a failed job (from its reason), else None."""
    if job.state is not JobState.FAILED:
        return None
    reason = job.reason or ""
    if reason.startswith("delivery") or " undelivered" in reason:
        return "delivery"
    if reason.startswith("not processed:") and "refused at ingest" in reason:
        return "refused"
    return "cancelled" if reason.startswith(CANCELLED_BY) else "processing"


def job_summary(job: Job, patient_data: bool, details: StudyDetails | None = None,
                reviewed_by: str | None = None) -> JobSummary:
    """The job as the caller's role may see it: patient fields and a reason that may quote patient data
    (:data:`WITHHELD_FAILURES`) are null without ``patient_data``."""
    details = details or StudyDetails()
    failure = failure_kind(job)
    hide_reason = not patient_data and job.reason is not None and failure in WITHHELD_FAILURES
    return JobSummary(
        id=job.id, study_instance_uid=job.study_instance_uid, patient_id=job.patient_id if patient_data else None,
        accession_number=details.accession_number if patient_data else None,
        study_description=details.study_description, modalities=list(details.modalities),
        pipeline=job.pipeline, state=job.state, reason=None if hide_reason else job.reason,
        needs_review=job.needs_review, review_reasons=list(job.review_reasons), reviewed_by=reviewed_by,
        failure=failure, priority=Priority(priority_name(job.priority)),
        calling_ae=job.calling_ae, peer_address=job.peer_address, instances=job.instances,
        late_instances=job.late_instances, runs=job.runs, created_at=utc(job.created_at),
        updated_at=utc(job.updated_at), purged_at=utc(job.purged_at), sibling_of=job.sibling_of,
        shadow=job.shadow, withheld=["reason"] if hide_reason else [])


def shadow_document(comparison: ShadowComparison) -> ShadowComparisonDocument:
    record = comparison.to_record()
    del record["study_instance_uid"]
    return ShadowComparisonDocument.model_validate({**record, "compared_at": utc(comparison.compared_at)})


def event_document(event: Event, patient_data: bool) -> EventDocument:
    """One event; without ``patient_data`` the message of a kind that may quote patient data
    (:data:`WITHHELD_EVENTS`) is null."""
    hide = not patient_data and event.kind in WITHHELD_EVENTS
    return EventDocument(id=event.id, at=utc(event.at), kind=event.kind, message=None if hide else event.message,
                         withheld=["message"] if hide else [])


def delivery_document(delivery: Delivery, withheld_reason: str | None = None) -> DeliveryDocument:
    """One delivery; its last error is null when it is ``withheld_reason`` (the job's reason, withheld from the
    caller: a cancel writes it into the deliveries it stops)."""
    pending = delivery.state == "pending"
    hide = withheld_reason is not None and delivery.last_error == withheld_reason
    return DeliveryDocument(id=delivery.id, destination=delivery.destination, object=delivery.object,
                            state=delivery.state, attempts=delivery.attempts,
                            next_attempt_at=utc(delivery.next_attempt_at) if pending else None,
                            last_error=None if hide else delivery.last_error, sent_uid=delivery.sent_uid,
                            withheld=["last_error"] if hide else [])


def correction_document(correction: Correction) -> CorrectionDocument:
    return CorrectionDocument(
        sop_instance_uid=correction.sop_instance_uid, series_instance_uid=correction.series_instance_uid,
        study_instance_uid=correction.study_instance_uid, calling_ae=correction.calling_ae,
        received_at=utc(correction.received_at), state=correction.state, job_id=correction.job_id,
        result_sop_instance_uid=correction.result_sop_instance_uid, message=correction.message,
        settled_at=utc(correction.settled_at),
        segments=[SegmentAgreementDocument.model_validate(s) for s in correction.agreement])
