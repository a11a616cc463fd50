"""The job store's policy, as pure functions of what it recorded (the store applies them in its transactions).

- :func:`late_action`: what an instance arriving after its study's job left ``received`` does.
- :func:`not_processed_reason`: the reason a study with nothing to do is recorded with.
- :func:`purge_keeper`: which newer job still needs a purged job's instances (so the purge keeps them).

How a study's series decisions merge into its route is routing vocabulary: ``radnode.pipelines.routing``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from radnode.node.store.records import JobState
from radnode.pipelines.routing import LateInstances, Provenance, SeriesDecision, StudyRoute


class LateAction(StrEnum):
    """What a late instance does to its study's latest job."""

    WAIT_AGAIN = "wait-again"
    """The queued job goes back to ``received``; the instance joins its input (``rerun``)."""
    RESTART = "restart"
    """The running job is stopped and waits for the study again; the instance joins its input (``rerun``)."""
    RERUN_STUDY = "rerun-study"
    """A new job runs the whole study, earlier instances included (``rerun`` after the run)."""
    NEW_JOB = "new-job"
    """A new job for the late instances alone (``new-job``)."""
    KEEP = "keep"
    """Recorded with the job, not part of its input (``ignore``, or a series the rules skip)."""
    OWN_RESULT = "own-result"
    """A result of the node's own: recorded with the job, never processed, whatever the policy."""
    CORRECTION = "correction"
    """A clinician's correction of a segmentation: recorded with the job, matched to it, never processed."""


def late_action(job_state: JobState, decision: SeriesDecision) -> LateAction:
    """What an instance of a series with ``decision`` does when its study's latest job is in ``job_state``
    (past ``received``)."""
    if decision.provenance is Provenance.OWN_RESULT:
        return LateAction.OWN_RESULT
    if decision.provenance is Provenance.CORRECTION:
        return LateAction.CORRECTION
    policy = decision.late_instances
    if policy is LateInstances.RERUN:
        if job_state is JobState.QUEUED:
            return LateAction.WAIT_AGAIN
        if job_state is JobState.RUNNING:
            return LateAction.RESTART
        return LateAction.RERUN_STUDY
    if policy is LateInstances.NEW_JOB:
        return LateAction.NEW_JOB
    return LateAction.KEEP


def not_processed_reason(route: StudyRoute) -> str:
    """``not processed: …`` for a study whose every series is skipped, with each distinct reason."""
    return "not processed: " + ("; ".join(route.skipped) or "no series")


@dataclass(frozen=True)
class StudyJob:
    """A job of a study as the purge policy sees it."""

    id: int
    sibling_of: int | None
    whole_study: bool
    purge_started: bool
    """A purge of it is recorded (unfinished) or it was purged: its input is gone or going."""
    purgeable: bool
    """Final past its state's retention and nothing pending (see ``retention.purgeable``)."""


def purge_keeper(job_id: int, study_jobs: Iterable[StudyJob]) -> int | None:
    """The job that still needs job ``job_id``'s (non-late) instances, or None: the first of its sibling
    jobs, or of the study's later whole-study jobs (and their siblings), that is neither purged nor
    purgeable. A purge of ``job_id`` keeps its instances for that job; the next purge after it takes them."""
    needing = [k.id for k in study_jobs
               if (k.sibling_of == job_id or (k.whole_study and (k.sibling_of or k.id) > job_id))
               and not k.purge_started and not k.purgeable]
    return min(needing, default=None)
