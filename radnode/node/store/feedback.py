"""Clinicians' corrections of the node's segmentations: recorded at arrival, settled by the feedback thread.

A correction candidate (a foreign SEG referencing a source series, ``Provenance.CORRECTION``) gets a
``pending`` row in the transaction that indexes its instance, so none is lost between arrival and matching.
The feedback thread (``radnode/feedback/corrections.py``) settles each once: ``matched`` with the job and
the per-segment agreement, ``unmatched`` (kept and listed: no job's result fits) or ``unreadable``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from sqlalchemy import Connection, and_, false, func, insert, or_, select, update

from radnode.node.store.database import Database
from radnode.node.store.events import log_event
from radnode.node.store.records import (
    Correction, CorrectionState, Instance, JobState, MatchedCorrection, PerformanceRows, ReviewRow,
)
from radnode.node.store.schema import corrections, instances, jobs, reviews, series


def record_correction(conn: Connection, inst: Instance) -> None:
    """A pending correction for a correction candidate just indexed (in the caller's transaction)."""
    if conn.execute(select(corrections.c.sop_instance_uid).where(
            corrections.c.sop_instance_uid == inst.sop_instance_uid)).first() is None:
        conn.execute(insert(corrections).values(sop_instance_uid=inst.sop_instance_uid,
                                                study_instance_uid=inst.study_instance_uid,
                                                received_at=inst.received_at, state=CorrectionState.PENDING.value))


def _correction_select():  # type: ignore[no-untyped-def]
    return (select(corrections, instances.c.path, instances.c.series_instance_uid, instances.c.calling_ae)
            .join(instances, instances.c.sop_instance_uid == corrections.c.sop_instance_uid))


def _correction(row) -> Correction:  # type: ignore[no-untyped-def]
    m = row._mapping
    return Correction(sop_instance_uid=m["sop_instance_uid"], study_instance_uid=m["study_instance_uid"],
                      series_instance_uid=m["series_instance_uid"], path=m["path"], calling_ae=m["calling_ae"],
                      received_at=m["received_at"], state=CorrectionState(m["state"]), job_id=m["job_id"],
                      result_sop_instance_uid=m["result_sop_instance_uid"], model_version=m["model_version"],
                      agreement=m["agreement"] or [],
                      message=m["message"], settled_at=m["settled_at"])


class Feedback:
    """The store's side of the feedback loop."""

    _db: Database

    def pending_corrections(self, limit: int = 20) -> list[Correction]:
        """Corrections not yet settled, oldest first."""
        query = (_correction_select().where(corrections.c.state == CorrectionState.PENDING.value)
                 .order_by(corrections.c.received_at).limit(limit))
        with self._db.read() as conn:
            return [_correction(row) for row in conn.execute(query)]

    def corrections(self, job_id: int | None = None, state: CorrectionState | None = None) -> list[Correction]:
        """Every correction (of one job, or in one state), oldest first."""
        query = _correction_select().order_by(corrections.c.received_at)
        if job_id is not None:
            query = query.where(corrections.c.job_id == job_id)
        if state is not None:
            query = query.where(corrections.c.state == state.value)
        with self._db.read() as conn:
            return [_correction(row) for row in conn.execute(query)]

    def jobs_with_series(self, series_uids: Iterable[str]) -> list[tuple[int, str, JobState]]:
        """(job id, pipeline, state) of the jobs whose input held any of these series, newest first: the main
        jobs that received them and their siblings (which ran on the same input); not shadow runs, whose results
        no clinician saw (a correction waits for none of them)."""
        uids = list(series_uids)
        main = (select(instances.c.job_id).where(instances.c.series_instance_uid.in_(uids),
                                                 instances.c.late == false())
                .join(series, series.c.series_instance_uid == instances.c.series_instance_uid)
                .where(series.c.skipped == false()).distinct())
        query = (select(jobs.c.id, jobs.c.pipeline, jobs.c.state)
                 .where(jobs.c.id.in_(main) | jobs.c.sibling_of.in_(main), jobs.c.shadow == false())
                 .order_by(jobs.c.id.desc()))
        with self._db.read() as conn:
            return [(row.id, row.pipeline, JobState(row.state)) for row in conn.execute(query)]

    def settle_correction(self, sop_instance_uid: str, state: CorrectionState, message: str, *,
                          job_id: int | None = None, result_sop_instance_uid: str | None = None,
                          model_version: str = "", agreement: list[dict] | None = None) -> bool:
        """Record how a pending correction was settled (once: False when it was settled already); a match is
        also a ``correction`` event in the job's log."""
        with self._db.write() as conn:
            done = conn.execute(update(corrections).where(and_(
                corrections.c.sop_instance_uid == sop_instance_uid,
                corrections.c.state == CorrectionState.PENDING.value)).values(
                state=state.value, message=message, job_id=job_id, result_sop_instance_uid=result_sop_instance_uid,
                model_version=model_version, agreement=agreement, settled_at=time.time())).rowcount
            if done and job_id is not None:
                log_event(conn, job_id, "correction", f"correction {sop_instance_uid}: {message}")
            return bool(done)

    def review_rows(self, pipeline: str | None = None, since: float | None = None) -> list[ReviewRow]:
        """Every decision on a job's results (not the ``reviewed`` marks of flagged jobs), recorded since
        ``since`` (epoch seconds), of one pipeline's jobs or all, oldest first."""
        query = (select(reviews.c.id, reviews.c.job_id, jobs.c.pipeline, reviews.c.decision, reviews.c.reviewer,
                        reviews.c.note, reviews.c.at).join(jobs, jobs.c.id == reviews.c.job_id)
                 .where(reviews.c.decision != "reviewed").order_by(reviews.c.id))
        if pipeline is not None:
            query = query.where(jobs.c.pipeline == pipeline)
        if since is not None:
            query = query.where(reviews.c.at >= since)
        with self._db.read() as conn:
            return [ReviewRow(*row) for row in conn.execute(query)]

    def performance_rows(self, pipeline: str | None = None, since: float | None = None) -> PerformanceRows:
        """What local performance is computed from, for jobs created since ``since`` (epoch seconds): each
        pipeline's processed jobs (done, or decided on: a decision's re-issue takes the job back to delivering),
        each job's latest review decision, and the matched corrections. Shadow runs are not counted: clinicians
        never saw their results (their figures are the shadow comparisons)."""
        conditions = [jobs.c.pipeline != "", jobs.c.shadow == false()]
        if pipeline is not None:
            conditions.append(jobs.c.pipeline == pipeline)
        if since is not None:
            conditions.append(jobs.c.created_at >= since)
        latest = (select(reviews.c.job_id, func.max(reviews.c.id).label("id")).group_by(reviews.c.job_id)
                  .subquery())
        with self._db.read() as conn:
            decided = select(reviews.c.job_id).where(reviews.c.decision != "reviewed")  # re-issuing: delivering
            processed = {p: n for p, n in conn.execute(
                select(jobs.c.pipeline, func.count()).where(*conditions, or_(jobs.c.state == JobState.DONE.value,
                                                                             jobs.c.id.in_(decided)))
                .group_by(jobs.c.pipeline))}
            decisions = [(row.id, row.pipeline, row.decision) for row in conn.execute(
                select(jobs.c.id, jobs.c.pipeline, reviews.c.decision)
                .join(latest, latest.c.job_id == jobs.c.id).join(reviews, reviews.c.id == latest.c.id)
                .where(*conditions))]
            matched = [MatchedCorrection(row.job_id, row.pipeline, row.model_version, row.needs_review,
                                         row.agreement or []) for row in conn.execute(
                select(corrections.c.job_id, jobs.c.pipeline, corrections.c.model_version, jobs.c.needs_review,
                       corrections.c.agreement).join(jobs, jobs.c.id == corrections.c.job_id)
                .where(*conditions, corrections.c.state == CorrectionState.MATCHED.value)
                .order_by(corrections.c.received_at))]
        return PerformanceRows(processed, decisions, matched)
