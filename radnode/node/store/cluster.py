"""The distributed engine's side of the store: the broker outbox, claims with fencing, leases, the reaper's
records and the workers' heartbeats.

A queued job is *dispatched* by writing a publication (the outbox) in the same transaction that names it the
job's ``dispatch_id``; the leader publishes it to the broker afterwards and marks it, so a broker outage only
delays jobs. A worker *claims* the job named by a message: it wins when the job is queued under that
dispatch, or running under it while its previous worker is gone (the broker redelivered the message, or the
lease lapsed); a stale or duplicate message claims nothing, nor does one of a job held by ``jobs.runnable``
(a shadow job whose production job was retried after its dispatch): its dispatch is dropped, so it is
dispatched again once it may run. Each claim is a new attempt, and its number is the fencing token: a worker
that reports with an older one (it was cut off and the job moved on) changes nothing. A job whose workers were
lost ``engine.max_attempts`` times ends ``failed`` with every attempt's reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, and_, func, insert, select, text, update

from radnode.node.store.database import Database
from radnode.node.store.events import log_event
from radnode.node.store.jobs import close_attempt, lock_main_job, release, run_order, runnable, transition
from radnode.node.store.records import UNFINISHED_STATES, Attempt, JobState, WorkerInfo
from radnode.node.store.schema import attempts, jobs, publications, workers


LEADER_LOCK_KEY = 0x7261646E6F6C64  # "radnold"
"""PostgreSQL advisory lock of the scheduler/egress leader (see :meth:`Cluster.take_leadership`)."""


@dataclass(frozen=True)
class Publication:
    """A broker message to send: run job ``job_id`` under dispatch ``id``."""

    id: int
    job_id: int
    queue: str
    priority: int


@dataclass(frozen=True)
class Claim:
    """What a worker's claim of a message came to: ``attempt`` > 0 when it runs the job; otherwise ``why`` not
    (stale, duplicate, finished) and ``exhausted`` when the job failed for too many lost workers."""

    attempt: int
    why: str = ""
    exhausted: bool = False


class Cluster:
    """The store's side of the distributed engine (see the module docstring)."""

    _db: Database

    # --- the leader: dispatch, outbox, collection, reaper -----------------------------------------

    def undispatched(self, limit: int = 50) -> list[int]:
        """Queued jobs with a pipeline and no publication yet, most urgent first (shadow jobs last, once their
        production job's run is over: ``jobs.runnable``)."""
        query = (select(jobs.c.id).where(jobs.c.state == JobState.QUEUED.value, jobs.c.dispatch_id.is_(None),
                                         jobs.c.pipeline != "", runnable())
                 .order_by(*run_order()).limit(limit))
        with self._db.read() as conn:
            return list(conn.execute(query).scalars())

    def dispatch(self, job_id: int, queue: str, priority: int) -> int | None:
        """Write the job's publication and make it the job's dispatch, in one transaction; None if the job is
        no longer queued or already dispatched."""
        now = time.time()
        with self._db.write() as conn:
            state = conn.execute(select(jobs.c.state, jobs.c.dispatch_id).where(jobs.c.id == job_id)
                                 .with_for_update()).first()
            if state is None or state.state != JobState.QUEUED.value or state.dispatch_id is not None:
                return None
            pub = conn.execute(insert(publications).values(job_id=job_id, queue=queue, priority=priority,
                                                           created_at=now)).inserted_primary_key[0]
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(dispatch_id=pub))
            log_event(conn, job_id, "dispatched", f"to broker queue {queue} (priority {priority}, message {pub})", now)
            return pub

    def unpublished(self, limit: int = 100) -> list[Publication]:
        """Publications not yet acknowledged by the broker, oldest first, of jobs still queued and waiting for
        them (a job that failed meanwhile, e.g. its input unreadable, is not sent)."""
        query = (select(publications.c.id, publications.c.job_id, publications.c.queue, publications.c.priority)
                 .join(jobs, and_(jobs.c.id == publications.c.job_id, jobs.c.dispatch_id == publications.c.id))
                 .where(publications.c.published_at.is_(None), jobs.c.state == JobState.QUEUED.value)
                 .order_by(publications.c.id).limit(limit))
        with self._db.read() as conn:
            return [Publication(*row) for row in conn.execute(query)]

    def published(self, publication_id: int) -> None:
        """The broker confirmed the message."""
        with self._db.write() as conn:
            conn.execute(update(publications).where(publications.c.id == publication_id)
                         .values(published_at=time.time(), tries=publications.c.tries + 1))

    def publish_failed(self, publication_id: int, error: str) -> None:
        """The broker could not take the message; it stays in the outbox for the next round."""
        with self._db.write() as conn:
            conn.execute(update(publications).where(publications.c.id == publication_id)
                         .values(tries=publications.c.tries + 1, last_error=error))

    def completed_remotely(self) -> list[tuple[int, int]]:
        """(job, attempt) of running jobs whose current attempt's outputs are in the storage."""
        query = select(jobs.c.id, jobs.c.attempt).where(jobs.c.state == JobState.RUNNING.value,
                                                        jobs.c.outcome == "ok").order_by(jobs.c.id)
        with self._db.read() as conn:
            return [(job_id, attempt) for job_id, attempt in conn.execute(query)]

    def reap_expired(self, max_attempts: int, now: float | None = None) -> list[tuple[int, str]]:
        """Running jobs whose lease lapsed (their worker vanished without the broker noticing): the attempt is
        recorded lost and the job requeued for a new dispatch, or failed when its workers were lost
        ``max_attempts`` times. Returns (job, what happened)."""
        now = time.time() if now is None else now
        done = []
        with self._db.write() as conn:
            expired = conn.execute(select(jobs.c.id, jobs.c.worker, jobs.c.lease_until)
                                   .where(jobs.c.state == JobState.RUNNING.value, jobs.c.outcome.is_(None),
                                          jobs.c.lease_until < now).with_for_update()).all()
            for job_id, worker, lease_until in expired:
                reason = f"worker {worker} lost: its lease lapsed {now - lease_until:.1f} s ago (no renewal)"
                release(conn, job_id, "lost", reason, now)
                if _lost_attempts(conn, job_id) >= max_attempts:
                    done.append((job_id, self._fail_exhausted(conn, job_id, max_attempts, now)))
                    continue
                transition(conn, job_id, (JobState.RUNNING,), JobState.QUEUED)
                log_event(conn, job_id, "requeued", f"{reason}; it runs again on another worker", now)
                done.append((job_id, reason))
        return done

    # --- workers: claims, leases, reports ------------------------------------------------------------

    def claim(self, job_id: int, dispatch_id: int, worker: str, redelivered: bool, lease_seconds: float,
              max_attempts: int) -> Claim:
        """Take the job a message names for a new attempt on ``worker`` (see the module docstring)."""
        now = time.time()
        with self._db.write() as conn:
            lock_main_job(conn, job_id)
            row = conn.execute(select(jobs.c.state, jobs.c.dispatch_id, jobs.c.attempt, jobs.c.worker,
                                      jobs.c.lease_until, jobs.c.outcome, jobs.c.sibling_of,
                                      runnable().label("runnable"))
                               .where(jobs.c.id == job_id).with_for_update(of=jobs)).first()
            if row is None:
                return Claim(0, "no such job")
            if row.dispatch_id != dispatch_id:
                return Claim(0, f"stale message {dispatch_id} (the job's dispatch is {row.dispatch_id})")
            if row.state == JobState.RUNNING.value and row.outcome is None:
                lapsed = row.lease_until is not None and row.lease_until < now
                if not (redelivered or lapsed):
                    return Claim(0, f"duplicate message: attempt {row.attempt} runs on {row.worker}")
                why = (f"worker {row.worker} lost mid-job: the broker redelivered its job" if redelivered else
                       f"worker {row.worker} lost mid-job: its lease lapsed")
                close_attempt(conn, job_id, "lost", why, now)
            elif row.state != JobState.QUEUED.value:
                return Claim(0, f"the job is {row.state}")
            elif not row.runnable:  # dispatched from an earlier read: its production job was retried since
                why = f"held until job {row.sibling_of}'s run is over; it is dispatched again then"
                release(conn, job_id, "stopped", why, now)
                log_event(conn, job_id, "held", f"message {dispatch_id} not run: {why}", now)
                return Claim(0, why)
            if _lost_attempts(conn, job_id) >= max_attempts:
                return Claim(0, self._fail_exhausted(conn, job_id, max_attempts, now), exhausted=True)
            number = row.attempt + 1
            conn.execute(insert(attempts).values(job_id=job_id, number=number, worker=worker, started_at=now))
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                state=JobState.RUNNING.value, attempt=number, worker=worker, lease_until=now + lease_seconds,
                outcome=None, updated_at=now, runs=jobs.c.runs + 1, needs_review=None, review_reasons=""))
            conn.execute(update(workers).where(workers.c.name == worker).values(current_job=job_id))
            return Claim(number)

    def started_remotely(self, job_id: int, attempt: int, worker: str, command: str) -> None:
        """The attempt's ``running`` event: which worker runs it, and how."""
        with self._db.write() as conn:
            log_event(conn, job_id, "running", f"attempt {attempt} on worker {worker}: {command}")

    def renew_lease(self, job_id: int, attempt: int, lease_seconds: float) -> bool:
        """Extend the running attempt's lease; False when the attempt is no longer the job's (fenced off)."""
        with self._db.write() as conn:
            result = conn.execute(update(jobs).where(*_current(job_id, attempt))
                                  .values(lease_until=time.time() + lease_seconds))
            return result.rowcount == 1

    def report_outputs(self, job_id: int, attempt: int) -> bool:
        """The attempt's outputs are in the storage; the leader stages them. False when fenced off."""
        now = time.time()
        with self._db.write() as conn:
            if conn.execute(update(jobs).where(*_current(job_id, attempt)).values(outcome="ok")).rowcount != 1:
                return False
            conn.execute(update(attempts).where(attempts.c.job_id == job_id, attempts.c.number == attempt)
                         .values(outcome="completed", ended_at=now, reason="outputs written to the storage"))
            return True

    def report_failure(self, job_id: int, attempt: int, reason: str) -> bool:
        """The attempt's pipeline failed: the job ends ``failed`` with the reason. False when fenced off."""
        now = time.time()
        with self._db.write() as conn:
            if conn.execute(update(jobs).where(*_current(job_id, attempt))
                            .values(state=JobState.FAILED.value, reason=reason, updated_at=now,
                                    lease_until=None)).rowcount != 1:
                return False
            close_attempt(conn, job_id, "failed", reason, now)
            log_event(conn, job_id, "failed", f"attempt {attempt}: {reason}", now)
            return True

    # --- one leader among the ingress nodes -----------------------------------------------------------

    def take_leadership(self) -> Connection | None:
        """A connection of its own holding the leader lock (a PostgreSQL session advisory lock, released when
        the connection ends: a node that dies loses it at once), or None when another node holds it."""
        conn = self._db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            if conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": LEADER_LOCK_KEY}).scalar():
                return conn
        except Exception:
            conn.close()
            raise
        conn.close()
        return None

    @staticmethod
    def give_up_leadership(conn: Connection) -> None:
        """End the lock's database session (not back to the pool, where the session and its lock would live on)."""
        conn.invalidate()
        conn.close()

    @staticmethod
    def leadership_held(conn: Connection) -> bool:
        """The lock's connection still answers (a database restart ends it, and the lock with it)."""
        try:
            conn.execute(text("SELECT 1"))
            return True
        except Exception:
            conn.invalidate()
            return False

    # --- workers' heartbeats -------------------------------------------------------------------------

    def worker_heartbeat(self, name: str, host: str, queues: Iterable[str], gpus: str, pid: int,
                         current_job: int | None, started: bool = False) -> None:
        """Record the worker alive now (its row made or replaced when ``started``)."""
        now = time.time()
        with self._db.write() as conn:
            if started:
                conn.execute(workers.delete().where(workers.c.name == name))
                conn.execute(insert(workers).values(name=name, host=host, queues=",".join(queues), gpus=gpus,
                                                    pid=pid, started_at=now, heartbeat_at=now,
                                                    current_job=current_job))
            else:
                conn.execute(update(workers).where(workers.c.name == name)
                             .values(heartbeat_at=now, current_job=current_job, stopped_at=None))

    def worker_stopped(self, name: str) -> None:
        with self._db.write() as conn:
            conn.execute(update(workers).where(workers.c.name == name)
                         .values(stopped_at=time.time(), current_job=None))

    def workers(self) -> list[WorkerInfo]:
        """Every worker that reported, most recent heartbeat first."""
        with self._db.read() as conn:
            rows = conn.execute(select(workers).order_by(workers.c.heartbeat_at.desc())).all()
        return [WorkerInfo(r.name, r.host, tuple(q for q in r.queues.split(",") if q), r.gpus, r.pid, r.started_at,
                           r.heartbeat_at, r.current_job, r.stopped_at) for r in rows]

    def attempts(self, job_id: int) -> list[Attempt]:
        """A job's attempts on workers, in order."""
        with self._db.read() as conn:
            rows = conn.execute(select(attempts).where(attempts.c.job_id == job_id).order_by(attempts.c.number))
            return [Attempt(r.job_id, r.number, r.worker, r.started_at, r.ended_at, r.outcome, r.reason)
                    for r in rows]

    def _fail_exhausted(self, conn: Connection, job_id: int, max_attempts: int, now: float) -> str:
        """Fail a job whose workers were lost ``max_attempts`` times, with every attempt's reason."""
        lost = conn.execute(select(attempts.c.number, attempts.c.worker, attempts.c.reason)
                            .where(attempts.c.job_id == job_id).order_by(attempts.c.number)).all()
        reason = (f"gave up after {max_attempts} lost attempts: "
                  + "; ".join(f"attempt {n} on {w}: {r}" for n, w, r in lost))
        if transition(conn, job_id, UNFINISHED_STATES, JobState.FAILED):
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(reason=reason, lease_until=None))
            log_event(conn, job_id, "failed", reason, now)
        return reason


def _current(job_id: int, attempt: int) -> tuple:
    """The job row while ``attempt`` is its current, running attempt (the fence)."""
    return jobs.c.id == job_id, jobs.c.attempt == attempt, jobs.c.state == JobState.RUNNING.value


def _lost_attempts(conn: Connection, job_id: int) -> int:
    """How many of the job's attempts ended with their worker lost."""
    return conn.execute(select(func.count()).select_from(attempts)
                        .where(attempts.c.job_id == job_id, attempts.c.outcome == "lost")).scalar_one()
