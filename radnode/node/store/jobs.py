"""Jobs and their scheduling: queueing complete studies with their route, siblings, runs, restarts, failure.

Job states: ``received → queued → running → delivering → done / failed``. Every transition is guarded by
the states it leaves (one ``UPDATE … WHERE state IN (…)``), so calling it twice, or from two processes,
does no harm: exactly one caller wins.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable

from sqlalchemy import (
    ColumnElement, Connection, Row, Select, and_, exists, false, func, insert, or_, select, true, update,
)

from radnode.node.completeness import SeriesProgress
from radnode.node.store.database import Database
from radnode.node.store.events import log_event
from radnode.node.store.policy import not_processed_reason
from radnode.node.store.queries import job_select
from radnode.node.store.records import (
    CANCELLED_BY, FINAL_STATES, UNFINISHED_STATES, Instance, Job, JobState, instance_from_row, job_from_row,
)
from radnode.node.store.schema import attempts, instances, jobs, refusals, series, studies
from radnode.pipelines.routing import Priority, SeriesDecision, StudyRoute, study_route


def transition(conn: Connection, job_id: int, sources: Iterable[JobState], target: JobState,
               only_if: ColumnElement[bool] | None = None) -> bool:
    """Move a job from one of ``sources`` to ``target`` (and only while ``only_if`` holds for its row, when
    given); False (nothing changed) when it is in none of them, or ``only_if`` does not hold."""
    query = update(jobs).where(jobs.c.id == job_id, jobs.c.state.in_([s.value for s in sources]))
    if only_if is not None:
        query = query.where(only_if)
    return conn.execute(query.values(state=target.value, updated_at=time.time())).rowcount == 1


def close_attempt(conn: Connection, job_id: int, outcome: str, reason: str, now: float) -> None:
    """End the job's running attempt (if any) with its outcome and reason."""
    conn.execute(update(attempts).where(attempts.c.job_id == job_id, attempts.c.outcome == "running")
                 .values(outcome=outcome, reason=reason, ended_at=now))


def release(conn: Connection, job_id: int, outcome: str, reason: str, now: float) -> None:
    """The job no longer belongs to its worker (stopped, requeued, restarted): its attempt ends and it will be
    dispatched afresh."""
    close_attempt(conn, job_id, outcome, reason, now)
    conn.execute(update(jobs).where(jobs.c.id == job_id)
                 .values(dispatch_id=None, lease_until=None, outcome=None))


def lock_study(db: Database, conn: Connection, study_uid: str, at: float) -> None:
    """Take the study's row lock for the rest of the transaction (its row is made on first sight): its
    arrivals and its queueing are serialised across processes, so one study becomes one job."""
    conn.execute(db.insert_ignoring_conflicts(studies).values(study_instance_uid=study_uid, first_received_at=at))
    conn.execute(select(studies.c.study_instance_uid).where(studies.c.study_instance_uid == study_uid)
                 .with_for_update())


PRODUCTION_RUN_OVER = (JobState.DELIVERING, *FINAL_STATES)
"""States of a production job whose run is over: its shadow may run, and be compared."""


@functools.cache
def runnable() -> ColumnElement[bool]:
    """A queued job that may start now: any main job; a sibling job only while its main job is not waiting for
    the study again (late instances under ``late_instances: rerun``: the study is not complete, so no pipeline
    runs on it); a shadow job only once its production job's run is over, so a candidate never takes a slot or
    a core from the production run it shadows."""
    main = jobs.alias("production")
    of_main = main.c.id == jobs.c.sibling_of
    waiting = exists(select(main.c.id).where(of_main, main.c.state == JobState.RECEIVED.value))
    busy = exists(select(main.c.id).where(of_main, main.c.state.not_in([s.value for s in PRODUCTION_RUN_OVER])))
    return and_(~waiting, or_(jobs.c.shadow == false(), ~busy))


def lock_main_job(conn: Connection, job_id: int) -> None:
    """Share-lock the row of the main job of sibling or shadow job ``job_id`` (none for a main job) for the
    rest of the transaction, before the job's own row: a check of :func:`runnable` then sees the main job's
    latest state, which cannot change until the transaction ends. An operator's retry of the main job (it locks
    its row first) either waits for this transaction, and then finds the job started and requeues it, or ends
    before, and the job is seen held. (SQLite: its write transactions run one at a time; nothing to lock.)"""
    main = jobs.alias("production")
    of_job = select(jobs.c.sibling_of).where(jobs.c.id == job_id).scalar_subquery()
    conn.execute(select(main.c.id).where(main.c.id == of_job).with_for_update(read=True))


def cancelled_for_good(row: Row) -> bool:
    """Whether an operator's cancel is the job's latest decision: it is failed with the cancel's reason. A
    ``cancelled`` event alone says nothing of now: a retry or re-send since (each clears the reason) made it run
    or deliver again, and a later failure has its own reason."""
    return row.state == JobState.FAILED.value and (row.reason or "").startswith(CANCELLED_BY)


def reopen_siblings(conn: Connection, job_id: int, why: str, now: float) -> None:
    """Main job ``job_id`` waits for its study again (late instances, ``late_instances: rerun``), so every
    pipeline of the study runs again on the whole input once it is complete: a running sibling or shadow job is
    stopped (restart requested: it goes back to the queue, held by :func:`runnable`), one whose run is over is
    replaced by a queued re-run whose results supersede its own; a queued one simply waits. Safe to repeat: a
    pipeline's latest job is the one considered, and a replacement is queued. A queued one's dispatch to the
    distributed engine is dropped (its message, if out, is stale): it is dispatched afresh, with its input as it is
    then."""
    latest: dict[tuple[str, bool], Row] = {}
    for row in conn.execute(select(jobs).where(jobs.c.sibling_of == job_id).order_by(jobs.c.id)):
        latest[row.pipeline, bool(row.shadow)] = row
    for (pipeline, shadow), row in latest.items():
        kind = "shadow" if shadow else "sibling"
        if row.state == JobState.RUNNING.value:
            if not row.restart_requested:
                conn.execute(update(jobs).where(jobs.c.id == row.id).values(restart_requested=True))
                log_event(conn, row.id, "late", f"{why}: this run stops and runs again once job {job_id}'s study "
                                                "is complete (late_instances: rerun)", now)
            continue
        if row.state == JobState.QUEUED.value:  # it runs on the whole input; a message already out for it is stale
            release(conn, row.id, "stopped", why, now)
            continue
        if cancelled_for_good(row):
            continue  # one an operator cancelled (and did not retry since) stays cancelled
        rerun = conn.execute(insert(jobs).values(
            **{name: row._mapping[name] for name in _SIBLING_COPIED}, state=JobState.QUEUED.value, updated_at=now,
            sibling_of=job_id, shadow=shadow)).inserted_primary_key[0]
        log_event(conn, row.id, "late", f"{why}: this run's input is out of date; {kind} job {rerun} runs "
                                        f"{pipeline} again on the whole study (late_instances: rerun)", now)
        log_event(conn, rerun, "queued", f"re-run of {kind} job {row.id} ({pipeline}) for late instances of job "
                                         f"{job_id}'s study: runs once it is complete; its results supersede job "
                                         f"{row.id}'s", now)


def rerun_shadows(conn: Connection, job_id: int, why: str, now: float) -> None:
    """Main job ``job_id`` runs again (an operator's retry): each shadow pipeline's latest job runs again after
    the new production run, so it is compared with that run, not with the failed one. A queued one's dispatch is
    dropped (it is dispatched afresh); a running or finished one goes back to the queue, held by :func:`runnable`
    until the new production run is over. One an operator cancelled stays cancelled, unless retried since."""
    latest: dict[str, Row] = {}
    for row in conn.execute(select(jobs).where(jobs.c.sibling_of == job_id, jobs.c.shadow == true())
                            .order_by(jobs.c.id)):
        latest[row.pipeline] = row
    for row in latest.values():
        if row.state == JobState.QUEUED.value:
            release(conn, row.id, "stopped", why, now)
            continue
        if cancelled_for_good(row):
            continue
        if not transition(conn, row.id, (JobState.RUNNING, *FINAL_STATES), JobState.QUEUED):
            continue
        release(conn, row.id, "stopped", why, now)
        conn.execute(update(jobs).where(jobs.c.id == row.id).values(reason=None, restart_requested=False))
        log_event(conn, row.id, "requeued", f"{why}: production job {job_id} runs again, so this shadow run "
                                            f"({row.pipeline}) runs again after it and is compared with the new run",
                  now)


_SIBLING_COPIED = ("study_instance_uid", "sealed_patient_id", "pipeline", "calling_ae", "peer_address", "created_at",
                   "last_instance_at", "priority", "whole_study", "execution_mode", "timeout_seconds", "queue")
"""What a sibling's re-run takes from the job it replaces (its route is the same; only the input grew)."""


def run_order() -> tuple[ColumnElement, ...]:
    """The queue's order: production jobs before shadow jobs, then most urgent, then earliest arrival."""
    return jobs.c.shadow, jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id


@functools.cache
def _next_queued(forward_only: bool) -> Select:
    """:meth:`Scheduling.next_queued`'s query (built once: the scheduler runs it five times a second)."""
    query = job_select().where(jobs.c.state == JobState.QUEUED.value, runnable()).order_by(*run_order()).limit(1)
    return query.where(jobs.c.pipeline == "") if forward_only else query


@functools.cache
def _receiving() -> Select:
    """:meth:`Scheduling.receiving`'s query: per received job and series, what arrived (built once)."""
    return (select(instances.c.job_id, series.c.series_instance_uid, series.c.decision,
                   func.count().label("received"), series.c.expected,
                   func.max(instances.c.received_at).label("last_instance_at"), series.c.released_at,
                   series.c.stable_at, func.max(jobs.c.calling_ae).label("calling_ae"),
                   func.max(studies.c.expected_instances).label("expected_instances"))
            .select_from(jobs.join(instances, and_(instances.c.job_id == jobs.c.id, instances.c.late == false()))
                         .join(series, series.c.series_instance_uid == instances.c.series_instance_uid)
                         .join(studies, studies.c.study_instance_uid == jobs.c.study_instance_uid))
            .where(jobs.c.state == JobState.RECEIVED.value)
            .group_by(instances.c.job_id, series.c.series_instance_uid)
            .order_by(instances.c.job_id))


class Scheduling:
    """The scheduler's side of the store."""

    _db: Database

    def receiving(self) -> dict[int, list[SeriesProgress]]:
        """The series of every ``received`` job with what arrived of each, for the completeness policy."""
        studies_: dict[int, list[SeriesProgress]] = {}
        with self._db.read() as conn:
            for row in conn.execute(_receiving()):
                r = row._mapping
                studies_.setdefault(r["job_id"], []).append(SeriesProgress(
                    r["series_instance_uid"], SeriesDecision.from_record(r["decision"]), r["received"], r["expected"],
                    r["last_instance_at"], r["released_at"], r["stable_at"], r["calling_ae"] or "",
                    r["expected_instances"]))
        return studies_

    def queue_job(self, job_id: int, why: str, now: float | None = None) -> JobState | None:
        """``received → queued`` with the study's route (:func:`~radnode.pipelines.routing.study_route`: first
        pipeline, most urgent priority, forwards, the execution of the routes choosing that pipeline merged);
        ``→ done`` at once when every series is skipped (its reason: ``not processed: …``); ``→ failed`` when
        instances of the study were refused at ingest (it is incomplete: never processed so). Every further
        pipeline gets a sibling job, queued at once with the same priority and its own merged execution, no
        forwards (the study is forwarded once, by this job); one that already has a sibling (this job
        re-queued after a ``rerun``) gets none again. Returns the new state, None if not received."""
        now = time.time() if now is None else now
        with self._db.write() as conn:
            study = conn.execute(select(jobs.c.study_instance_uid).where(jobs.c.id == job_id)).scalar()
            if study is None:
                return None
            lock_study(self._db, conn, study, now)
            if (refused := self._refused(conn, study)) is not None:
                if not transition(conn, job_id, (JobState.RECEIVED,), JobState.FAILED):
                    return None
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(reason=refused))
                log_event(conn, job_id, "failed", f"study complete ({why}); {refused}", now)
                return JobState.FAILED
            own_series = select(instances.c.series_instance_uid).where(instances.c.job_id == job_id,
                                                                        instances.c.late == false())
            route = study_route(SeriesDecision.from_record(d) for d in conn.execute(
                select(series.c.decision).where(series.c.series_instance_uid.in_(own_series))).scalars())
            if route.nothing_to_do:
                if not transition(conn, job_id, (JobState.RECEIVED,), JobState.DONE):
                    return None
                reason = not_processed_reason(route)
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(reason=reason))
                log_event(conn, job_id, "done", f"study complete ({why}); {reason}")
                return JobState.DONE
            main = route.execution(route.main_pipeline)
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                pipeline=route.main_pipeline, priority=route.priority.rank, forwards=",".join(route.forwards),
                restart_requested=False, execution_mode=main.mode or "", timeout_seconds=main.timeout_seconds,
                queue=route.queue))
            if not self._queue(conn, job_id, now, why):
                return None
            if route.sibling_pipelines or route.shadow:
                self._start_siblings(conn, job_id, route, now)
            return JobState.QUEUED

    @staticmethod
    def _refused(conn: Connection, study: str) -> str | None:
        """Why a study with refused instances is not processed (it is incomplete), or None when it has none."""
        rows = conn.execute(select(refusals.c.sop_instance_uid, refusals.c.reason)
                            .where(refusals.c.study_instance_uid == study).order_by(refusals.c.at)).all()
        if not rows:
            return None
        return (f"not processed: {len(rows)} instance(s) of the study were refused at ingest, so it is incomplete "
                f"(first: {rows[0].sop_instance_uid}: {rows[0].reason}); re-send them corrected to process it, or "
                "retry the job without them (jobs retry --without-refused, with a note saying why)")

    @staticmethod
    def _start_siblings(conn: Connection, job_id: int, route: StudyRoute, now: float) -> None:
        """A queued sibling job of the main job ``job_id`` for each further pipeline, and a shadow job for each
        shadow pipeline, without one yet. A shadow job is queued at the lowest priority and runs once the main
        job's run is over (:func:`runnable`)."""
        existing = {(pipeline, bool(shadow)): sibling for pipeline, shadow, sibling in conn.execute(
            select(jobs.c.pipeline, jobs.c.shadow, jobs.c.id).where(jobs.c.sibling_of == job_id).order_by(jobs.c.id))}
        main = conn.execute(select(jobs).where(jobs.c.id == job_id)).one()._mapping
        started: dict[str, list[str]] = {"sibling": [], "shadow": []}
        earlier: dict[str, list[str]] = {"sibling": [], "shadow": []}
        pipelines = ", ".join(route.pipelines)
        for pipeline, shadow in [*((p, False) for p in route.sibling_pipelines), *((p, True) for p in route.shadow)]:
            kind = "shadow" if shadow else "sibling"
            if (pipeline, shadow) in existing:
                earlier[kind].append(f"job {existing[pipeline, shadow]} ({pipeline})")
                continue
            execution = route.execution(pipeline)
            sibling = conn.execute(insert(jobs).values(
                study_instance_uid=main["study_instance_uid"], sealed_patient_id=main["sealed_patient_id"], pipeline=pipeline,
                state=JobState.QUEUED.value, calling_ae=main["calling_ae"], peer_address=main["peer_address"],
                created_at=main["created_at"], last_instance_at=main["last_instance_at"], updated_at=now,
                priority=Priority.OFF_PEAK.rank if shadow else route.priority.rank, whole_study=main["whole_study"],
                execution_mode=execution.mode or "", timeout_seconds=execution.timeout_seconds, sibling_of=job_id,
                queue=route.queue, shadow=shadow)).inserted_primary_key[0]
            if shadow:
                log_event(conn, sibling, "queued",
                          f"shadow of job {job_id}: the rules compare candidate {pipeline} with {route.main_pipeline} "
                          f"for study {main['study_instance_uid']}; runs on job {job_id}'s input after its run, "
                          "results kept and compared, never delivered", now)
            else:
                log_event(conn, sibling, "queued",
                          f"sibling of job {job_id}: the rules select {pipelines} for study {main['study_instance_uid']}; "
                          f"this job runs {pipeline} on job {job_id}'s input (forwards are sent by job {job_id})", now)
            started[kind].append(f"job {sibling} ({pipeline})")
        message = f"rules select {pipelines}; this job runs {route.main_pipeline}"
        for kind, jobs_ in started.items():
            message += f"; started {kind} {', '.join(jobs_)}" if jobs_ else ""
        for kind, jobs_ in earlier.items():
            message += f"; {kind} {', '.join(jobs_)} exist already, not started again" if jobs_ else ""
        log_event(conn, job_id, "route", message, now)

    @staticmethod
    def _queue(conn: Connection, job_id: int, now: float, why: str) -> bool:
        own = and_(instances.c.job_id == job_id, instances.c.late == false())
        count, n_series, n_associations = conn.execute(
            select(func.count(), func.count(instances.c.series_instance_uid.distinct()),
                   func.count(instances.c.association_id.distinct())).where(own)).one()
        modalities = sorted(conn.execute(select(instances.c.modality).where(own).distinct()).scalars())
        senders = sorted(f"{ae} ({peer})" for ae, peer in conn.execute(
            select(instances.c.calling_ae, instances.c.peer_address).where(own).distinct()))
        if not transition(conn, job_id, (JobState.RECEIVED,), JobState.QUEUED):
            return False
        log_event(conn, job_id, "queued",
                  f"study complete: {count} instances in {n_series} series ({','.join(modalities)}) from "
                  f"{','.join(senders)} over {n_associations} association(s)" + (f"; {why}" if why else ""), now)
        return True

    def queue_complete_studies(self, idle_seconds: float, now: float | None = None) -> list[int]:
        """Move ``received`` jobs whose study had no new instance for ``idle_seconds`` to ``queued`` (their
        pipeline as created; the node's scheduler queues with :meth:`queue_job` instead)."""
        now = time.time() if now is None else now
        queued = []
        with self._db.write() as conn:
            rows = conn.execute(select(jobs.c.id).where(jobs.c.state == JobState.RECEIVED.value,
                                                        jobs.c.last_instance_at <= now - idle_seconds)
                                .order_by(jobs.c.id)).scalars().all()
            for job_id in rows:
                if self._queue(conn, job_id, now, ""):
                    queued.append(job_id)
        return queued

    def restart_requested(self) -> list[int]:
        """Running jobs whose study got late instances under ``late_instances: rerun``."""
        with self._db.read() as conn:
            return list(conn.execute(select(jobs.c.id).where(jobs.c.state == JobState.RUNNING.value,
                                                             jobs.c.restart_requested == true())).scalars())

    def restart(self, job_id: int) -> bool:
        """The run was stopped for late instances: a main job ``running → received`` (it waits for its study
        again), a sibling or shadow job ``running → queued`` (it starts again once its main job is queued)."""
        with self._db.write() as conn:
            main = conn.execute(select(jobs.c.sibling_of).where(jobs.c.id == job_id)).scalar()
            back_to = JobState.RECEIVED if main is None else JobState.QUEUED
            if not transition(conn, job_id, (JobState.RUNNING,), back_to):
                return False
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(restart_requested=False))
            release(conn, job_id, "stopped", "stopped for late instances", time.time())
            log_event(conn, job_id, "restarted", "run stopped for late instances; partial output discarded" + (
                f"; runs again once job {main}'s study is complete" if main is not None else ""))
            return True

    def next_queued(self, forward_only: bool = False) -> Job | None:
        """The queued job to run next: production jobs before shadow jobs (a shadow one only once its production
        job's run is over), most urgent priority first, then the earliest arrival (``forward_only``: of those
        without a pipeline, which the distributed engine leaves to the node)."""
        with self._db.read() as conn:
            row = conn.execute(_next_queued(forward_only)).first()
        return job_from_row(row._mapping, self._db.opened_identity) if row else None

    def start_job(self, job_id: int, command: str) -> bool:
        """``queued → running``; counts the run and logs the command; a previous run's review state is cleared.
        False if the job was not queued, or is held (:func:`runnable`, checked again here: the job was picked
        from an earlier read, and an operator may have retried its production job since; a shadow started then
        would run beside the new production run and be compared with a stale or unfinished one). A held job
        stays queued and starts once it is runnable."""
        with self._db.write() as conn:
            lock_main_job(conn, job_id)
            if not transition(conn, job_id, (JobState.QUEUED,), JobState.RUNNING, runnable()):
                return False
            conn.execute(update(jobs).where(jobs.c.id == job_id)
                         .values(runs=jobs.c.runs + 1, needs_review=None, review_reasons=""))
            log_event(conn, job_id, "running", command)
            return True

    def job_inputs(self, job_id: int) -> list[Instance]:
        """The instances a job covers: those received before it was queued (late ones and skipped series
        excluded); a re-run of a finished study covers the study's earlier jobs' instances too (those
        retention removed excepted); a sibling job covers its main job's."""
        main_id = select(func.coalesce(jobs.c.sibling_of, jobs.c.id)).where(jobs.c.id == job_id).scalar_subquery()
        j = jobs.alias("j")
        skipped = select(series.c.series_instance_uid).where(series.c.skipped == true())
        query = (select(instances).select_from(instances.join(j, j.c.id == main_id))
                 .where(instances.c.late == false(), instances.c.purged_at.is_(None),
                        or_(instances.c.job_id == j.c.id,
                            and_(j.c.whole_study == true(), instances.c.study_instance_uid == j.c.study_instance_uid,
                                 instances.c.job_id < j.c.id)),
                        instances.c.series_instance_uid.not_in(skipped))
                 .order_by(instances.c.received_at))
        with self._db.read() as conn:
            return [instance_from_row(row._mapping, self._db.opened_identity) for row in conn.execute(query)]

    def requeue(self, job_id: int, why: str, kind: str = "requeued") -> bool:
        """``running → queued`` (interrupted by shutdown or crash, or ``kind`` ``retry``: its process ended by a
        signal); the run will start again from scratch."""
        with self._db.write() as conn:
            if not transition(conn, job_id, (JobState.RUNNING,), JobState.QUEUED):
                return False
            release(conn, job_id, "stopped", why, time.time())
            log_event(conn, job_id, kind, why)
            return True

    def requeue_forwarding(self, why: str) -> list[int]:
        """Forward-only jobs left ``running`` (no pipeline: the leader forwarding them stopped between starting
        them and recording their deliveries) back to the queue, for the leader taking over to forward; returns
        them. Safe beside a forward still under way: its deliveries are then refused (the job is not running)."""
        with self._db.read() as conn:
            ids = list(conn.execute(select(jobs.c.id).where(jobs.c.state == JobState.RUNNING.value,
                                                            jobs.c.pipeline == "")).scalars())
        return [job_id for job_id in ids if self.requeue(job_id, why)]

    def running_jobs(self) -> list[int]:
        """Ids of the jobs recorded as running."""
        with self._db.read() as conn:
            return list(conn.execute(select(jobs.c.id).where(jobs.c.state == JobState.RUNNING.value)).scalars())

    def record_review(self, job_id: int, needs_review: bool, reasons: Iterable[str]) -> bool:
        """The finished run's review decision (from its manifest), for a running job; logged as a ``review``
        event. False if the job is not running."""
        reasons = [str(r) for r in reasons]
        with self._db.write() as conn:
            result = conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == JobState.RUNNING.value)
                                  .values(needs_review=needs_review, review_reasons=json.dumps(reasons)))
            if result.rowcount != 1:
                return False
            log_event(conn, job_id, "review", f"flagged for human review: {'; '.join(reasons) or 'no reason given'}"
                      if needs_review else "within the uncertainty limits: no review needed")
            return True

    def record_warnings(self, job_id: int, warnings: Iterable[str]) -> None:
        """What a finished run's outputs had to do without (its manifest's ``warnings``: an empty Patient ID, no
        FHIR identifier system), one ``warning`` event each; the job goes on to delivery."""
        with self._db.write() as conn:
            for warning in warnings:
                log_event(conn, job_id, "warning", str(warning))

    def fail_job(self, job_id: int, reason: str) -> bool:
        """Any unfinished state → ``failed`` with the reason; False if the job was already final."""
        with self._db.write() as conn:
            if not transition(conn, job_id, UNFINISHED_STATES, JobState.FAILED):
                return False
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(reason=reason, lease_until=None))
            close_attempt(conn, job_id, "failed", reason, time.time())
            log_event(conn, job_id, "failed", reason)
            return True
