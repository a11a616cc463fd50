"""Retention's side of the store: which jobs' files are due for removal, and the purge's three records.

A purge is recorded first (the instances get ``purged_at``, the job ``purge_started_at`` with the same
value), then the files go, then the job gets ``purged_at`` and a ``purged`` event: a purge a crash
interrupts is finished by the next one, and a file still on disk whose row says purged is never indexed
again. Which instances a purge keeps for a newer job is :func:`~radnode.node.store.policy.purge_keeper`.
"""

from __future__ import annotations

import time

from sqlalchemy import ColumnElement, Double, FromClause, and_, bindparam, case, exists, false, or_, select, union, update

from radnode.node.store.database import Database
from radnode.node.store.events import log_event
from radnode.node.store.jobs import lock_study
from radnode.node.store.policy import StudyJob, purge_keeper
from radnode.node.store.records import FINAL_STATES, JobState, PurgePlan
from radnode.node.store.schema import deliveries, instances, jobs

_NOT_STAGED = (JobState.RECEIVED.value, JobState.QUEUED.value, JobState.RUNNING.value)
"""States of a job whose results are not in its outbox yet."""


def purgeable(j: FromClause, done_before: float | None, failed_before: float | None) -> ColumnElement[bool]:
    """SQL: job ``j`` is final before its state's cutoff (None: kept forever) and no delivery of it is pending."""
    def final_before(state: JobState, cutoff: float | None) -> ColumnElement[bool]:
        return false() if cutoff is None else and_(j.c.state == state.value, j.c.updated_at <= cutoff)

    pending = exists().where(deliveries.c.job_id == j.c.id, deliveries.c.state == "pending")
    return and_(or_(final_before(JobState.DONE, done_before), final_before(JobState.FAILED, failed_before)), ~pending)


def _cutoff(j: FromClause, done_before: float | None, failed_before: float | None) -> ColumnElement[float]:
    """SQL: the cutoff time of job ``j``'s state (NULL: none)."""
    return case((j.c.state == JobState.DONE.value, bindparam("done_cut", done_before, type_=Double)),
                else_=bindparam("failed_cut", failed_before, type_=Double))


class Purges:
    """The retention purge's records."""

    _db: Database

    def purge_due(self, done_before: float | None, failed_before: float | None) -> list[int]:
        """Jobs with files for retention to remove, oldest first: purges left unfinished, then purgeable jobs
        (see :func:`purgeable`) never purged yet, or with an instance received before the cutoff still on
        disk (a late instance, or one kept for a newer job). One indexed query; nothing due is cheap."""
        j = jobs.alias("j")
        on_disk = exists().where(instances.c.job_id == j.c.id, instances.c.purged_at.is_(None),
                                 instances.c.received_at <= _cutoff(j, done_before, failed_before))
        query = union(
            select(jobs.c.id).where(jobs.c.purge_started_at.is_not(None)),
            select(j.c.id).where(j.c.state.in_([s.value for s in FINAL_STATES]),
                                 purgeable(j, done_before, failed_before), or_(j.c.purged_at.is_(None), on_disk)),
        ).order_by("id")
        with self._db.read() as conn:
            return list(conn.execute(query).scalars())

    def begin_purge(self, job_id: int, done_before: float | None, failed_before: float | None,
                    dry_run: bool = False) -> PurgePlan | None:
        """Record a purge of the job's files before any is removed: its instances received before the cutoff
        get ``purged_at`` (except those :func:`~radnode.node.store.policy.purge_keeper` keeps for a newer job),
        the job ``purge_started_at``. A purge left unfinished is returned as it was recorded (``resumed``).
        None when the job is not purgeable, or was purged and nothing new is due. ``dry_run``: the same
        decision, rolled back."""
        with self._db.write(commit=not dry_run) as conn:
            study = conn.execute(select(jobs.c.study_instance_uid).where(jobs.c.id == job_id)).scalar()
            if study is None:
                return None
            # the study's lock first, as ingest takes it: a late instance re-running the study and this purge take
            # turns (the instance sees the purge recorded, or the purge sees the study reopened), never a deadlock
            lock_study(self._db, conn, study, time.time())
            j = jobs.alias("j")
            row = conn.execute(select(j.c.state, j.c.study_instance_uid, j.c.updated_at, j.c.purge_started_at,
                                      j.c.purged_at, purgeable(j, done_before, failed_before).label("purgeable"))
                               .where(j.c.id == job_id).with_for_update(of=j)).first()
            if row is None:
                return None
            state = JobState(row.state)
            kept: dict[int, int] = {}
            k = jobs.alias("k")
            study_jobs = [StudyJob(r.id, r.sibling_of, bool(r.whole_study),
                                   r.purged_at is not None or r.purge_started_at is not None, bool(r.purgeable))
                          for r in conn.execute(select(k.c.id, k.c.sibling_of, k.c.whole_study, k.c.purged_at,
                                                       k.c.purge_started_at,
                                                       purgeable(k, done_before, failed_before).label("purgeable"))
                                                .where(k.c.study_instance_uid == row.study_instance_uid))]
            keeper = purge_keeper(job_id, study_jobs)
            if row.purge_started_at is None:
                if state not in FINAL_STATES or not row.purgeable:
                    return None
                marker = time.time()
                cutoff = done_before if state is JobState.DONE else failed_before
                fresh = []
                for sop, late in conn.execute(
                        select(instances.c.sop_instance_uid, instances.c.late)
                        .where(instances.c.job_id == job_id, instances.c.purged_at.is_(None),
                               instances.c.received_at <= cutoff).order_by(instances.c.received_at)):
                    if late or keeper is None:
                        fresh.append(sop)
                    else:
                        kept[keeper] = kept.get(keeper, 0) + 1
                if not fresh and row.purged_at is not None:
                    return None
                if fresh:
                    conn.execute(update(instances).where(instances.c.sop_instance_uid == bindparam("sop"))
                                 .values(purged_at=marker), [{"sop": sop} for sop in fresh])
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(purge_started_at=marker))
            else:
                marker = row.purge_started_at
            paths = tuple(conn.execute(select(instances.c.path).where(instances.c.job_id == job_id,
                                                                      instances.c.purged_at == marker)
                                       .order_by(instances.c.received_at)).scalars())
            # a keeper that has not staged its results yet reads this job's folders too (a re-run's rejection note
            # is made of the objects in its outbox): they stay while instances do, which bring the job back to a purge
            keeper_state = None if keeper is None else conn.execute(
                select(jobs.c.state).where(jobs.c.id == keeper)).scalar()
            keep_folders = keeper_state in _NOT_STAGED and conn.execute(select(instances.c.sop_instance_uid).where(
                instances.c.job_id == job_id, instances.c.purged_at.is_(None)).limit(1)).first() is not None
            return PurgePlan(job_id, state, row.updated_at, marker, paths, tuple(sorted(kept.items())),
                             resumed=row.purge_started_at is not None,
                             folders_kept_for=keeper if keep_folders else None)

    def finish_purge(self, job_id: int, marker: float, message: str) -> bool:
        """The purge's files are gone: the job gets ``purged_at`` and a ``purged`` event with ``message``.
        False if that purge was already finished (by another process, say)."""
        with self._db.write() as conn:
            result = conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.purge_started_at == marker)
                                  .values(purge_started_at=None, purged_at=time.time()))
            if result.rowcount != 1:
                return False
            log_event(conn, job_id, "purged", message)
            return True
