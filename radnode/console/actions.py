"""Operators' actions through the API (the dashboard's buttons and ``radnode jobs …`` call the same): retry a
failed job, re-send results, cancel, force a study complete, pause and resume the queue, mark a flagged job
reviewed or record a decision on a job's results (accepted, corrected, rejected with a reason). Each needs the
operator role, is recorded in the job's event log with the person (or
``token:NAME``) who took it, and is audited when the node has an audit trail. An action that does not apply
to the job's state answers 409 with the reason; an unknown job 404.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Body, HTTPException, Path, Request, status
from pydantic import Field

from radnode.console.accounts import Identity
from radnode.console.api import node_of
from radnode.console.auth import Operator, Viewer, client_address, gate_of
from radnode.console.schemas import Document
from radnode.node.store import ActionRefused, JobStore
from radnode.node.store.console import REJECT_REASONS, REVIEW_DECISIONS

log = logging.getLogger(__name__)

router = APIRouter(tags=["actions"])

_RESPONSES = {404: {"description": "no such job or study"}, 409: {"description": "the action does not apply now"}}


class Note(Document):
    """Why (kept in the job's event log)."""

    note: Annotated[str, Field(max_length=500)] = ""


class RetryRequest(Note):
    without_refused: bool = Field(False, description="give up on the study's refused instances (an instance a "
                                                     "sender cannot correct, one without a SOP Instance UID): it "
                                                     "is processed without them; needs a note saying why")


class ResendRequest(Note):
    destination: Annotated[str | None, Field(max_length=256, description="only this destination (as the job's "
                                                                           "deliveries name it); null: all")] = None
    failed_only: bool = Field(False, description="only deliveries that were not made (after an outage)")


class ActionResult(Document):
    job_id: int | None
    message: str


class QueueState(Document):
    paused: bool
    queued: int = Field(description="jobs waiting for a worker")


JobId = Annotated[int, Path(ge=1, le=2**62, description="the job's id")]


def _store(request: Request) -> JobStore:
    return request.app.state.store


def _act(request: Request, identity: Identity, action: str, job_id: int | None, run):  # type: ignore[no-untyped-def]
    """Run ``run()`` (the store's action), map refusals to HTTP answers, audit and log the outcome: a refused
    attempt is audited too (outcome minor failure, with why), so the trail holds what was tried, not only what
    was done."""
    try:
        message = run()
    except LookupError as e:
        _audit(request, identity, action, job_id, refused=str(e).strip("'"))
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(e).strip("'")) from None
    except ActionRefused as e:
        _audit(request, identity, action, job_id, refused=str(e))
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from None
    _audit(request, identity, action, job_id)
    log.info("%s by %s on %s: %s", action, identity.label, _target(job_id), message)
    return message


def _target(job_id: int | None, study_uid: str | None = None) -> str:
    """What a console action acts on, as the log and the audit trail name it."""
    return f"job/{job_id}" if job_id is not None else f"study/{study_uid}" if study_uid else "queue"


def _audit(request: Request, identity: Identity, action: str, job_id: int | None, refused: str | None = None,
           study_uid: str | None = None) -> None:
    """One audit message for a console action (or its refused attempt) when the node keeps an audit trail;
    ``study_uid``: the study acted on when there is no job (one the node has no job for)."""
    gate = gate_of(request)
    if gate.audit is None:
        return
    job = _store(request).job(job_id) if job_id is not None else None
    gate.audit.user_action(user=identity.label, address=client_address(request), action=action,
                           what=_target(job_id, study_uid),
                           study_uid=job.study_instance_uid if job else study_uid,
                           patient_id=job.patient_id if job else None, refused=refused)


def _refuse(request: Request, identity: Identity, action: str, job_id: int | None, code: int, reason: str,
            study_uid: str | None = None) -> HTTPException:
    """The HTTP error for an attempt refused before the store's action runs, audited as :func:`_act` audits
    one (the trail holds what was tried, whoever refused it)."""
    _audit(request, identity, action, job_id, refused=reason, study_uid=study_uid)
    return HTTPException(code, reason)


@router.post("/api/jobs/{job_id}/retry", response_model=ActionResult, responses=_RESPONSES,
             summary="Run a failed job again on every instance received for its study")
def retry(request: Request, identity: Operator, job_id: JobId,
          body: Annotated[RetryRequest, Body()] = RetryRequest()) -> ActionResult:
    count = _act(request, identity, "retry", job_id, lambda: _store(request).retry_job(
        job_id, identity.label, body.note, without_refused=body.without_refused))
    return ActionResult(job_id=job_id, message=f"job {job_id} queued again on {count} instance(s)")


@router.post("/api/jobs/{job_id}/resend", response_model=ActionResult, responses=_RESPONSES,
             summary="Deliver a job's results again, to all its destinations or one")
def resend(request: Request, identity: Operator, job_id: JobId,
           body: Annotated[ResendRequest, Body()] = ResendRequest()) -> ActionResult:
    egress = node_of(request).egress
    if egress is None:
        raise _refuse(request, identity, "resend", job_id, status.HTTP_503_SERVICE_UNAVAILABLE, "the node is stopping")
    count = _act(request, identity, "resend", job_id, lambda: egress.resend(
        job_id, body.destination, user=identity.label, reason=body.note, failed_only=body.failed_only))
    return ActionResult(job_id=job_id, message=f"{count} deliver{'y' if count == 1 else 'ies'} queued")


@router.post("/api/jobs/{job_id}/cancel", response_model=ActionResult, responses=_RESPONSES,
             summary="Cancel a job that has not finished (a running one's process is ended)")
def cancel(request: Request, identity: Operator, job_id: JobId, body: Annotated[Note, Body()] = Note()) -> ActionResult:
    was = _act(request, identity, "cancel", job_id, lambda: _store(request).cancel_job(job_id, identity.label, body.note))
    return ActionResult(job_id=job_id, message=f"job {job_id} cancelled (it was {was})")


class ReviewRequest(Note):
    decision: Literal[REVIEW_DECISIONS] = Field(  # type: ignore[valid-type]
        "reviewed", description="reviewed: looked at a flagged result; accepted / corrected / rejected: the "
                                "reviewer's decision on a done job's results (local performance counts them)")
    reason: Literal[REJECT_REASONS] | None = Field(  # type: ignore[valid-type]
        None, description="why it was rejected (rejected only, and then required)")


@router.post("/api/jobs/{job_id}/review", response_model=ActionResult, responses=_RESPONSES,
             summary="Record a review: a flagged job reviewed (it leaves the worklist), or a done job's results "
                     "accepted, corrected or rejected with a reason")
def review(request: Request, identity: Operator, job_id: JobId,
           body: Annotated[ReviewRequest, Body()] = ReviewRequest()) -> ActionResult:
    action = "review" if body.decision == "reviewed" else f"review-{body.decision}"
    egress = node_of(request).egress
    if egress is None and body.decision != "reviewed":
        raise _refuse(request, identity, action, job_id, status.HTTP_503_SERVICE_UNAVAILABLE, "the node is stopping")

    def decide() -> list[str]:
        """Record the review; a decision with its re-issue where the results went, in one transaction, so a
        refusal (results a re-run superseded in between, say) is the action's 409 and leaves nothing recorded."""
        if egress is None or body.decision == "reviewed":
            _store(request).mark_reviewed(job_id, identity.label, body.note, body.decision, body.reason)
            return []
        return [line for line in [egress.decide(job_id, identity.label, body.note, body.decision, body.reason)] if line]

    reissued = _act(request, identity, action, job_id, decide)
    return ActionResult(job_id=job_id, message="; ".join([f"job {job_id} {body.decision} by {identity.label}"
                                                          + (f" ({body.reason})" if body.reason else ""), *reissued]))


@router.post("/api/studies/{study_uid}/complete", response_model=ActionResult, responses=_RESPONSES,
             summary="Treat a study still being received as complete now: its job is queued")
def complete_study(request: Request, identity: Operator,
                   study_uid: Annotated[str, Path(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)],
                   body: Annotated[Note, Body()] = Note()) -> ActionResult:
    store = _store(request)
    job_id = store.study_job(study_uid)
    if job_id is None:
        raise _refuse(request, identity, "complete-study", None, status.HTTP_404_NOT_FOUND,
                      f"no job for study {study_uid}", study_uid=study_uid)

    def force() -> str:
        """Queue the job; a note goes into an event of its own (``forced-complete``), which roles without
        patient data are not shown, while the ``queued`` line stays readable to them."""
        state = store.queue_job(job_id, f"forced complete by {identity.label}")
        if state is None:
            job = store.job(job_id)
            raise ActionRefused(f"job {job_id} of study {study_uid} is {job.state if job else 'gone'}, not receiving")
        if body.note:
            store.note_action(job_id, "forced-complete", f"forced complete by {identity.label}: {body.note}")
        return f"job {job_id} {state}"

    return ActionResult(job_id=job_id, message=_act(request, identity, "complete-study", job_id, force))


@router.get("/api/queue", response_model=QueueState, tags=["queue"], summary="Whether the queue is paused")
def queue_state(request: Request, identity: Viewer) -> QueueState:
    store = _store(request)
    return QueueState(paused=store.queue_paused(), queued=store.job_counts()[0].get("queued", 0))


def _set_paused(request: Request, identity: Identity, paused: bool) -> QueueState:
    store = _store(request)
    changed = store.set_queue_paused(paused, identity.label)
    word = "paused" if paused else "resumed"
    _act(request, identity, f"queue-{word}", None, lambda: f"queue {word}" if changed else f"queue already {word}")
    return QueueState(paused=store.queue_paused(), queued=store.job_counts()[0].get("queued", 0))


@router.post("/api/queue/pause", response_model=QueueState, tags=["queue"],
             summary="Pause the queue: no job starts; ingest and deliveries carry on")
def pause(request: Request, identity: Operator) -> QueueState:
    return _set_paused(request, identity, True)


@router.post("/api/queue/resume", response_model=QueueState, tags=["queue"], summary="Resume the queue")
def resume(request: Request, identity: Operator) -> QueueState:
    return _set_paused(request, identity, False)
