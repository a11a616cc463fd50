"""Reading jobs and instances: the job list, one job, counts for the health probe (no writes here)."""

from __future__ import annotations

import functools

from sqlalchemy import Select, false, func, select, text, true

from radnode.node.store.database import Database
from radnode.node.store.records import Instance, Job, JobState, instance_from_row, job_from_row
from radnode.node.store.schema import instances, jobs
from radnode.pipelines.routing import Provenance


@functools.cache
def job_select() -> Select:
    """Every ``jobs`` column plus the job's instance counts, as :func:`~records.job_from_row` reads them:
    ``instances`` (its input's: a sibling's are its main job's), ``late_instances``, ``own_results``.
    Built once (statements are immutable; building the alias's columns on every call was most of an idle
    node's CPU)."""
    i = instances.alias("i")
    main = func.coalesce(jobs.c.sibling_of, jobs.c.id)

    def count(*conditions) -> object:
        return select(func.count()).select_from(i).where(*conditions).scalar_subquery()

    return select(
        jobs,
        count(i.c.job_id == main, i.c.late == false()).label("instances"),
        count(i.c.job_id == jobs.c.id, i.c.late == true()).label("late_instances"),
        count(i.c.job_id == jobs.c.id, i.c.provenance == Provenance.OWN_RESULT.value).label("own_results"),
    )


class Queries:
    """The store's read side used by the API, the CLI and tests."""

    _db: Database

    def job(self, job_id: int) -> Job | None:
        """One job with its instance counts, or None."""
        with self._db.read() as conn:
            row = conn.execute(job_select().where(jobs.c.id == job_id)).first()
        return job_from_row(row._mapping, self._db.opened_identity) if row else None

    def jobs(self, state: JobState | None = None, needs_review: bool | None = None) -> list[Job]:
        """All jobs, oldest first; or those in one ``state``, those flagged for review (``needs_review=True``)
        or those assessed and not flagged (``False``; jobs not assessed are neither)."""
        query = job_select().order_by(jobs.c.id)
        if state:
            query = query.where(jobs.c.state == state.value)
        if needs_review is not None:
            query = query.where(jobs.c.needs_review == (true() if needs_review else false()))
        with self._db.read() as conn:
            return [job_from_row(row._mapping, self._db.opened_identity) for row in conn.execute(query)]

    def job_counts(self) -> tuple[dict[str, int], int]:
        """Jobs per state and how many are flagged for review, counted in SQL (cheap for a health probe)."""
        counts = {state.value: 0 for state in JobState}
        with self._db.read() as conn:
            counts.update({s: n for s, n in conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state))})
            flagged = conn.execute(select(func.count()).select_from(jobs).where(jobs.c.needs_review == true())).scalar()
        return counts, int(flagged or 0)

    def instances(self, job_id: int) -> list[Instance]:
        """Every instance recorded for a job, late ones and the node's own results included."""
        query = select(instances).where(instances.c.job_id == job_id).order_by(instances.c.received_at)
        with self._db.read() as conn:
            return [instance_from_row(row._mapping, self._db.opened_identity) for row in conn.execute(query)]

    def read_rows(self, sql: str, params: dict[str, object]) -> list[tuple]:
        """Rows of a read-only SQL query with ``:named`` parameters, the same text on SQLite and PostgreSQL
        (the console's metrics and the activity log read the store's tables this way)."""
        with self._db.read() as conn:
            return [tuple(row) for row in conn.execute(text(sql), params)]
