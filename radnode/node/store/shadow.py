"""Shadow runs: a candidate pipeline's job beside the production job, finished without delivery, compared.

A shadow job is a sibling of the study's main job (``sibling_of``, same input) with ``shadow`` set: it runs
after its production job has run (``jobs.runnable``), ends ``done`` with its outputs kept under the job
(:meth:`Shadows.finish_shadow`), and the store refuses to plan deliveries or re-sends for it
(``deliveries.py``). Once both are final the shadow thread records their comparison here, once per run of
the shadow job (an operator's retry of a failed one is compared again).
"""

from __future__ import annotations

import functools

from sqlalchemy import Select, and_, delete, exists, insert, or_, select

from radnode.node.store.database import Database
from radnode.node.store.events import log_event
from radnode.node.store.jobs import PRODUCTION_RUN_OVER, transition
from radnode.node.store.queries import job_select
from radnode.node.store.records import FINAL_STATES, Job, JobState, ShadowComparison, job_from_row
from radnode.node.store.schema import jobs, shadow_comparisons


@functools.cache
def _to_compare(limit: int) -> Select:
    """:meth:`Shadows.shadows_to_compare`'s query, built once (the node's shadow loop runs it five times a second)."""
    production = jobs.alias("p")
    return (job_select().where(
        jobs.c.shadow.is_(True), jobs.c.state.in_([s.value for s in FINAL_STATES]),
        exists(select(production.c.id).where(production.c.id == jobs.c.sibling_of, production.c.state.in_(
            [s.value for s in PRODUCTION_RUN_OVER]))),
        ~exists(select(shadow_comparisons.c.shadow_job_id).where(
            shadow_comparisons.c.shadow_job_id == jobs.c.id, shadow_comparisons.c.compared_at >= jobs.c.updated_at)))
        .order_by(jobs.c.id).limit(limit))


class Shadows:
    """The shadow runs' side of the store."""

    _db: Database

    def finish_shadow(self, job_id: int, summary: str) -> bool:
        """``running → done`` for a shadow run that ended well: its outputs stay in the job's folder, nothing is
        delivered. False if the job is not a running shadow job, or when late instances asked for its restart
        meanwhile (its input has grown since the run, as for a production run's delivery: the scheduler restarts
        it, so it is compared only once it ran on the whole study)."""
        with self._db.write() as conn:
            shadow = conn.execute(select(jobs.c.shadow, jobs.c.sibling_of, jobs.c.state, jobs.c.restart_requested)
                                  .where(jobs.c.id == job_id).with_for_update()).first()
            if shadow is None or not shadow.shadow or shadow.state != JobState.RUNNING.value:
                return False
            if shadow.restart_requested:
                log_event(conn, job_id, "late", "run finished, but late instances arrived during it: not kept as "
                                                "the shadow run, it runs again")
                return False
            if not transition(conn, job_id, (JobState.RUNNING,), JobState.DONE):
                return False
            log_event(conn, job_id, "finished", f"{summary}; shadow run of job {shadow.sibling_of}: kept under the "
                                                "job, never delivered")
            log_event(conn, job_id, "done", "shadow run: compared with the production run once both are final")
            return True

    def shadows_to_compare(self, limit: int = 20) -> list[tuple[Job, Job]]:
        """(shadow job, production job) pairs, both final (the production job delivering or final), not compared
        since the shadow job last ended (a retried shadow run is compared again); oldest first."""
        with self._db.read() as conn:
            shadows = [job_from_row(r._mapping, self._db.opened_identity) for r in conn.execute(_to_compare(limit))]
            pairs = []
            for shadow in shadows:
                row = conn.execute(job_select().where(jobs.c.id == shadow.sibling_of)).first()
                if row is not None:
                    pairs.append((shadow, job_from_row(row._mapping, self._db.opened_identity)))
        return pairs

    def record_shadow_comparison(self, comparison: ShadowComparison) -> bool:
        """Keep a shadow job's comparison (replacing one of an earlier run of it) and say so in both jobs' events;
        False if one at least as recent is kept already."""
        values = comparison.to_record()
        c = shadow_comparisons.c
        with self._db.write() as conn:
            newer = conn.execute(select(c.compared_at).where(c.shadow_job_id == comparison.shadow_job_id,
                                                             c.compared_at >= comparison.compared_at)).first()
            if newer is not None:
                return False
            conn.execute(delete(shadow_comparisons).where(c.shadow_job_id == comparison.shadow_job_id))
            conn.execute(insert(shadow_comparisons).values(**values))
            line = f"shadow comparison of {comparison.candidate_pipeline} (job {comparison.shadow_job_id}) with " \
                   f"{comparison.production_pipeline} (job {comparison.production_job_id}): {comparison.message}"
            for job_id in (comparison.production_job_id, comparison.shadow_job_id):
                log_event(conn, job_id, "shadow", line)
            return True

    def shadow_comparisons(self, job_id: int | None = None, production: str | None = None,
                           candidate: str | None = None, since: float | None = None) -> list[ShadowComparison]:
        """Kept comparisons, oldest first: of one job (as production or shadow), of a production/candidate pair
        of pipelines, compared since a time."""
        c = shadow_comparisons.c
        conditions = []
        if job_id is not None:
            conditions.append(or_(c.production_job_id == job_id, c.shadow_job_id == job_id))
        if production is not None:
            conditions.append(c.production_pipeline == production)
        if candidate is not None:
            conditions.append(c.candidate_pipeline == candidate)
        if since is not None:
            conditions.append(c.compared_at >= since)
        query = select(shadow_comparisons).where(and_(True, *conditions)).order_by(c.compared_at, c.shadow_job_id)
        with self._db.read() as conn:
            return [ShadowComparison(**{**row._mapping, "segments": row.segments or [],
                                        "measurements": row.measurements or []}) for row in conn.execute(query)]

    def shadow_pairs(self) -> list[tuple[str, str]]:
        """The (production, candidate) pipeline pairs with kept comparisons."""
        with self._db.read() as conn:
            return [tuple(r) for r in conn.execute(select(shadow_comparisons.c.production_pipeline,
                                                          shadow_comparisons.c.candidate_pipeline).distinct()
                                                   .order_by(shadow_comparisons.c.production_pipeline,
                                                             shadow_comparisons.c.candidate_pipeline))]
