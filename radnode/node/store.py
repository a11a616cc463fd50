"""The node's durable job store: instances, jobs, their event log and deliveries in one SQLite file.

The spool on disk is the source of truth for received data; this store is its index plus the state of
every job. All access goes through one connection under a lock (SQLite in WAL mode), so the SCP's
association threads, the scheduler and egress can share it. Every transition is an explicit method
guarded by the state it leaves, so calling it twice does no harm.

Job states: ``received → queued → running → delivering → done / failed``. A job whose study gets
late instances under the ``rerun`` policy goes back from ``queued``/``running`` to ``received``.

When the rules select several pipelines for a study, its job (the *main* job) runs the first and, when it is
queued, starts one *sibling* job per other pipeline (``sibling_of`` = the main job), queued at once with the
execution of the routes choosing that pipeline and the study's priority. A sibling owns no instances: its
input is the main job's (``job_inputs``). Only the main job delivers to the route's ``forwards``, so the study
is forwarded once. Siblings are invisible to the arrival of later instances: late instances apply to the main
job only (``rerun`` re-runs the main job's pipeline; its siblings are not started again, but a pipeline the
study's routes select anew gets its sibling), and retention keeps the main job's instances while a sibling
still needs them.

A job whose pipeline scores its uncertainty carries a review state (``needs_review``, ``review_reasons``):
set from the run's manifest when the run ends, true when the study is flagged for human review, NULL when
not assessed (no uncertainty, or not run yet).

Each series has a row with its routing decision (taken on its first instance, execution settings
included), its expected instance count and the association that last delivered to it, which the
completeness policy reads. A queued job keeps the execution settings of its route, so a restart runs it
the same way.

Retention (``retention.py``) removes a final job's files once it is due; its rows stay. The purge is recorded
in the database first (the instances get ``purged_at``, the job ``purge_started_at`` with the same value),
then the files go, then the job gets ``purged_at`` and a ``purged`` event: a purge a crash interrupts is
finished by the next one, and a file still on disk whose row says purged is never indexed again.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from radnode.pipelines.rules import Execution, ExecutionMode

if TYPE_CHECKING:
    from radnode.security.privacy import IdentitySeal


class JobState(StrEnum):
    """Where a job is in its life; ``done`` and ``failed`` are final."""

    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    DELIVERING = "delivering"
    DONE = "done"
    FAILED = "failed"


FINAL_STATES = (JobState.DONE, JobState.FAILED)


class InstanceBeingPurged(OSError):
    """An instance arrived again while the retention purge removing its earlier copy is under way (a
    transient refusal: the sender is told to try again later)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EBUSY, message)


class Arrival(StrEnum):
    """What recording an instance meant for its study."""

    NEW = "new"
    """Part of a study still being received."""
    LATE = "late"
    """Its study's job had already started; kept and logged, not part of that job's input."""
    DUPLICATE = "duplicate"
    """The SOP instance was already indexed; the first copy is kept."""


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


@dataclass(frozen=True)
class SeriesRoute:
    """What the routing rules decided for a series (taken on its first instance)."""

    pipelines: tuple[str, ...]
    forwards: tuple[str, ...] = ()
    discard: bool = False
    priority: int = 1
    """Higher runs first: 0 off-peak, 1 routine, 2 stat."""
    study_idle_seconds: float | None = None
    series_grace_seconds: float | None = None
    late_instances: str = "ignore"
    """``rerun``, ``ignore`` or ``new-job``: what instances arriving after the study was queued do."""
    description: str = ""
    execution: Execution = Execution()
    """How the pipeline runs and its timeout; unset parts leave the node's defaults."""


@dataclass(frozen=True)
class SeriesState:
    """One series of a receiving job: its route and what arrived of it (input to the completeness policy)."""

    series_instance_uid: str
    route: SeriesRoute
    received: int
    expected: int | None
    last_instance_at: float
    released_at: float | None
    stable_at: float | None


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
    priority: int = 1
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
    """The main job this job runs another selected pipeline for (its input is that job's; see the module
    docstring); None for a study's own job. A sibling's ``instances`` are the main job's."""


@dataclass(frozen=True)
class Event:
    """One line of a job's append-only log."""

    id: int
    job_id: int
    at: float
    kind: str
    message: str


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


_Record = TypeVar("_Record", "Job", "Instance")


SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL DEFAULT '',
    pipeline TEXT NOT NULL,
    state TEXT NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    peer_address TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    last_instance_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    runs INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    priority INTEGER NOT NULL DEFAULT 1,
    forwards TEXT NOT NULL DEFAULT '',
    whole_study INTEGER NOT NULL DEFAULT 0,
    restart_requested INTEGER NOT NULL DEFAULT 0,
    execution_mode TEXT NOT NULL DEFAULT '',
    timeout_seconds REAL,
    needs_review INTEGER,
    review_reasons TEXT NOT NULL DEFAULT '',
    sibling_of INTEGER REFERENCES jobs (id),
    purge_started_at REAL,
    purged_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_instance_uid);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    modality TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    peer_address TEXT NOT NULL,
    association_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    path TEXT NOT NULL,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    late INTEGER NOT NULL DEFAULT 0,
    purged_at REAL
);
CREATE INDEX IF NOT EXISTS instances_job ON instances (job_id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    destination TEXT NOT NULL,
    object TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    done_at REAL,
    UNIQUE (job_id, destination, object)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    pipelines TEXT NOT NULL,
    forwards TEXT NOT NULL,
    discard INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    study_idle_seconds REAL,
    series_grace_seconds REAL,
    late_instances TEXT NOT NULL,
    description TEXT NOT NULL,
    execution_mode TEXT NOT NULL DEFAULT '',
    timeout_seconds REAL,
    expected INTEGER,
    last_association_id TEXT NOT NULL DEFAULT '',
    released_at REAL,
    stable_at REAL
);
CREATE INDEX IF NOT EXISTS series_study ON series (study_instance_uid);
CREATE INDEX IF NOT EXISTS series_association ON series (last_association_id);
"""

_EXECUTION_COLUMNS = {"execution_mode": "TEXT NOT NULL DEFAULT ''", "timeout_seconds": "REAL"}
_MIGRATIONS = {
    "jobs": {"priority": "INTEGER NOT NULL DEFAULT 1", "forwards": "TEXT NOT NULL DEFAULT ''",
             "whole_study": "INTEGER NOT NULL DEFAULT 0", "restart_requested": "INTEGER NOT NULL DEFAULT 0",
             **_EXECUTION_COLUMNS, "needs_review": "INTEGER", "review_reasons": "TEXT NOT NULL DEFAULT ''",
             "purge_started_at": "REAL", "purged_at": "REAL", "sibling_of": "INTEGER REFERENCES jobs (id)"},
    "series": _EXECUTION_COLUMNS,
    "instances": {"purged_at": "REAL"},
}
"""Columns added after the first release, per table, added to older databases on open."""

_INDEXES_AFTER_MIGRATION = """
CREATE INDEX IF NOT EXISTS instances_kept ON instances (job_id) WHERE purged_at IS NULL;
CREATE INDEX IF NOT EXISTS jobs_purging ON jobs (purge_started_at) WHERE purge_started_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_siblings ON jobs (sibling_of) WHERE sibling_of IS NOT NULL;
"""
"""Indexes on migrated columns: the instances still on disk per job, purges left unfinished (retention's
look for what is due stays a probe per final job however many purged instances the store holds)."""

_JOB_COLUMNS = (
    "j.id, j.study_instance_uid, j.patient_id, j.pipeline, j.state, j.calling_ae, j.peer_address, "
    "(SELECT count(*) FROM instances i WHERE i.job_id = coalesce(j.sibling_of, j.id) AND i.late = 0), "
    "(SELECT count(*) FROM instances i WHERE i.job_id = j.id AND i.late = 1), "
    "j.created_at, j.last_instance_at, j.updated_at, j.runs, j.reason, j.priority, j.forwards,"
    " j.execution_mode, j.timeout_seconds, j.needs_review, j.review_reasons, j.purged_at, j.sibling_of"
)

_INSTANCE_COLUMNS = ("sop_instance_uid, study_instance_uid, series_instance_uid, patient_id, modality, sop_class_uid,"
                     " path, calling_ae, peer_address, association_id, received_at")


def _job(row: tuple) -> Job:
    return Job(*row[:4], JobState(row[4]), *row[5:15], _split(row[15]), _execution(row[16], row[17]),
               None if row[18] is None else bool(row[18]), tuple(json.loads(row[19] or "[]")), row[20], row[21])


def _purgeable(j: str) -> str:
    """SQL: job ``j`` is purgeable: final before its state's cutoff (``:done_before``, ``:failed_before``; NULL
    never) and no delivery of it still pending."""
    return (f"(({j}.state = 'done' AND {j}.updated_at <= :done_before) OR ({j}.state = 'failed'"
            f" AND {j}.updated_at <= :failed_before)) AND NOT EXISTS (SELECT 1 FROM deliveries d"
            f" WHERE d.job_id = {j}.id AND d.state = 'pending')")


def _cutoff(j: str) -> str:
    """SQL: the cutoff time of job ``j``'s state."""
    return f"(CASE {j}.state WHEN 'done' THEN :done_before ELSE :failed_before END)"


def _execution(mode: str, timeout_seconds: float | None) -> Execution:
    """Execution settings from their two columns ('' mode: the node's default)."""
    return Execution(ExecutionMode(mode) if mode else None, timeout_seconds)


def _split(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t)


def _route(row: tuple) -> SeriesRoute:
    """A SeriesRoute from the series row's ``_ROUTE_COLUMNS``."""
    return SeriesRoute(_split(row[0]), _split(row[1]), bool(row[2]), row[3], row[4], row[5], row[6], row[7],
                       _execution(row[8], row[9]))


_ROUTE_COLUMNS = ("pipelines, forwards, discard, priority, study_idle_seconds, series_grace_seconds,"
                  " late_instances, description, execution_mode, timeout_seconds")
_ROUTE_COLUMN_COUNT = len(_ROUTE_COLUMNS.split(","))


class JobStore:
    """Thread-safe access to the node's SQLite database (``data_dir/radnode.db``)."""

    def __init__(self, path: Path, seal: "IdentitySeal | None" = None) -> None:
        """``seal``: patient identifiers are stored encrypted with it and opened on reading (the node passes
        its site key's; a store opened without one returns them as stored)."""
        self._seal = seal
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        for table, added in _MIGRATIONS.items():
            columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, definition in added.items():
                if name not in columns:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")
        self._db.executescript(_INDEXES_AFTER_MIGRATION)

    def _sealed(self, patient_id: str) -> str:
        return self._seal.seal(patient_id) if self._seal is not None else patient_id

    def _opened(self, record: _Record) -> _Record:
        """A job or instance with its patient identifier opened (see ``seal``)."""
        if self._seal is None or not record.patient_id:
            return record
        return replace(record, patient_id=self._seal.open(record.patient_id))

    def close(self) -> None:
        """Close the connection; the store cannot be used afterwards."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self, commit: bool = True) -> Iterator[sqlite3.Connection]:
        """One serialized write transaction, rolled back on any error (and at the end unless ``commit``)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT" if commit else "ROLLBACK")

    def _query(self, sql: str, params: Iterable | dict = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params if isinstance(params, dict) else tuple(params)).fetchall()

    @staticmethod
    def _log(db: sqlite3.Connection, job_id: int, kind: str, message: str, at: float | None = None) -> None:
        db.execute("INSERT INTO events (job_id, at, kind, message) VALUES (?, ?, ?, ?)",
                   (job_id, time.time() if at is None else at, kind, message))

    # --- ingress ---------------------------------------------------------------------------------

    def has_instance(self, sop_instance_uid: str) -> bool:
        """Whether this SOP instance is indexed and its file kept (one retention removed is received anew)."""
        return bool(self._query("SELECT 1 FROM instances WHERE sop_instance_uid = ? AND purged_at IS NULL",
                                (sop_instance_uid,)))

    def being_purged(self, sop_instance_uid: str) -> bool:
        """Whether a retention purge that removes this instance's file is under way (not finished)."""
        return bool(self._query(
            "SELECT 1 FROM instances i JOIN jobs j ON j.id = i.job_id WHERE i.sop_instance_uid = ?"
            " AND i.purged_at IS NOT NULL AND i.purged_at = j.purge_started_at", (sop_instance_uid,)))

    def indexed_paths(self) -> set[str]:
        """The spool paths of every indexed instance, purged ones included (for re-indexing after a crash: a
        file an interrupted purge left behind is not indexed again)."""
        return {row[0] for row in self._query("SELECT path FROM instances")}

    def record_instance(self, inst: Instance, pipeline: str, route: SeriesRoute | None = None,
                        expected: int | None = None) -> tuple[Arrival, int]:
        """Index a received instance under its study's job (created on the first one); idempotent.

        ``route`` is the series' routing decision (used on its first instance; without one the series goes
        to ``pipeline`` and late instances are only recorded); ``expected`` its expected instance count.
        Returns what the arrival meant and the job it belongs to. An instance whose file retention removed
        is indexed anew (its old row leaves its old job, whose log says so); ``InstanceBeingPurged`` while
        that removal is still under way.
        """
        route = route or SeriesRoute((pipeline,))
        with self._tx() as db:
            row = db.execute("SELECT i.job_id, i.purged_at, j.purge_started_at FROM instances i"
                             " JOIN jobs j ON j.id = i.job_id WHERE i.sop_instance_uid = ?",
                             (inst.sop_instance_uid,)).fetchone()
            if row and row[1] is not None:
                if row[1] == row[2]:
                    raise InstanceBeingPurged(f"{inst.sop_instance_uid} is being removed by the retention purge "
                                              f"of job {row[0]}; send it again later")
                db.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (inst.sop_instance_uid,))
                self._log(db, row[0], "re-received",
                          f"{inst.sop_instance_uid}, purged by retention, received again from "
                          f"{inst.calling_ae or '?'} ({inst.peer_address or '?'}); indexed anew", inst.received_at)
                row = None
            if row:
                self._log(db, row[0], "duplicate",
                          f"{inst.sop_instance_uid} received again from {inst.calling_ae or '?'} "
                          f"({inst.peer_address or '?'}); first copy kept", inst.received_at)
                return Arrival.DUPLICATE, row[0]
            route = self._series_arrival(db, inst, route, expected)
            job = db.execute("SELECT id, state FROM jobs WHERE study_instance_uid = ? AND sibling_of IS NULL"
                             " ORDER BY id DESC LIMIT 1", (inst.study_instance_uid,)).fetchone()
            arrival = Arrival.NEW
            if job is None:
                job_id = self._new_job(db, inst, route, whole_study=False)
            elif job[1] == JobState.RECEIVED:
                job_id = job[0]
            else:
                arrival, job_id = self._late(db, inst, route, *job)
            if arrival is Arrival.NEW:
                db.execute("UPDATE jobs SET last_instance_at = max(last_instance_at, ?) WHERE id = ?",
                           (inst.received_at, job_id))
            db.execute(
                "INSERT INTO instances (sop_instance_uid, study_instance_uid, series_instance_uid, patient_id,"
                " modality, sop_class_uid, calling_ae, peer_address, association_id, received_at, path, job_id,"
                " late) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (inst.sop_instance_uid, inst.study_instance_uid, inst.series_instance_uid, self._sealed(inst.patient_id),
                 inst.modality, inst.sop_class_uid, inst.calling_ae, inst.peer_address, inst.association_id,
                 inst.received_at, inst.path, job_id, int(arrival is Arrival.LATE)))
            return arrival, job_id

    def _series_arrival(self, db: sqlite3.Connection, inst: Instance, route: SeriesRoute,
                        expected: int | None) -> SeriesRoute:
        """Record the series' route on its first instance and the association now delivering to it."""
        db.execute(
            f"INSERT OR IGNORE INTO series (series_instance_uid, study_instance_uid, {_ROUTE_COLUMNS}, expected)"
            f" VALUES ({', '.join('?' * (_ROUTE_COLUMN_COUNT + 3))})",
            (inst.series_instance_uid, inst.study_instance_uid, ",".join(route.pipelines), ",".join(route.forwards),
             int(route.discard), route.priority, route.study_idle_seconds, route.series_grace_seconds,
             route.late_instances, route.description, route.execution.mode or "", route.execution.timeout_seconds,
             expected))
        db.execute("UPDATE series SET last_association_id = ?, released_at = NULL, stable_at = NULL,"
                   " expected = coalesce(expected, ?) WHERE series_instance_uid = ?",
                   (inst.association_id, expected, inst.series_instance_uid))
        row = db.execute(f"SELECT {_ROUTE_COLUMNS} FROM series WHERE series_instance_uid = ?",
                         (inst.series_instance_uid,)).fetchone()
        return _route(row)

    def _new_job(self, db: sqlite3.Connection, inst: Instance, route: SeriesRoute, whole_study: bool) -> int:
        job_id = db.execute(
            "INSERT INTO jobs (study_instance_uid, patient_id, pipeline, state, calling_ae, peer_address,"
            " created_at, last_instance_at, updated_at, priority, whole_study) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (inst.study_instance_uid, self._sealed(inst.patient_id), route.pipelines[0] if route.pipelines else "",
             JobState.RECEIVED, inst.calling_ae, inst.peer_address, inst.received_at, inst.received_at,
             inst.received_at, route.priority, int(whole_study))).lastrowid
        self._log(db, job_id, "received",
                  f"study {inst.study_instance_uid} arriving from {inst.calling_ae or '?'} "
                  f"({inst.peer_address or '?'}), association {inst.association_id or '?'}", inst.received_at)
        return job_id

    def _late(self, db: sqlite3.Connection, inst: Instance, route: SeriesRoute, job_id: int,
              state: str) -> tuple[Arrival, int]:
        """An instance of a study whose latest job is past ``received``: apply the series' late policy."""
        what = (f"{inst.modality} {inst.sop_instance_uid} (series {inst.series_instance_uid}) arrived from "
                f"{inst.calling_ae or '?'} after the job was {state}")
        policy = "ignore" if route.discard else route.late_instances
        if policy == "rerun" and state in (JobState.QUEUED, JobState.RUNNING):
            if state == JobState.QUEUED:
                self._transition(db, job_id, (JobState.QUEUED,), JobState.RECEIVED)
            else:
                db.execute("UPDATE jobs SET restart_requested = 1 WHERE id = ?", (job_id,))
            self._log(db, job_id, "late", f"{what}; added to the input, the job waits for the study again "
                                          "and runs from scratch (late_instances: rerun)", inst.received_at)
            return Arrival.NEW, job_id
        if policy in ("rerun", "new-job"):
            new_id = self._new_job(db, inst, route, whole_study=policy == "rerun")
            scope = "the whole study" if policy == "rerun" else "the late instances"
            purged = db.execute("SELECT count(*) FROM instances WHERE study_instance_uid = ? AND purged_at IS NOT"
                                " NULL AND late = 0", (inst.study_instance_uid,)).fetchone()[0]
            if policy == "rerun" and purged:
                scope += f" (less {purged} earlier instance(s) retention already removed)"
            self._log(db, job_id, "late", f"{what}; job {new_id} processes {scope} (late_instances: {policy})",
                      inst.received_at)
            return Arrival.NEW, new_id
        reason = "its series is discarded by the routing rules" if route.discard else "late_instances: ignore"
        self._log(db, job_id, "late", f"{what}; kept in the spool, not part of this job's input ({reason})",
                  inst.received_at)
        return Arrival.LATE, job_id

    def association_released(self, association_id: str, at: float | None = None) -> int:
        """The association that last delivered to some series was released; returns how many series."""
        with self._tx() as db:
            return db.execute("UPDATE series SET released_at = ? WHERE last_association_id = ? AND released_at IS NULL",
                              (time.time() if at is None else at, association_id)).rowcount

    def study_stable(self, study_instance_uid: str, at: float | None = None) -> int:
        """Orthanc reported the study stable: its series are complete; returns how many series."""
        with self._tx() as db:
            return db.execute("UPDATE series SET stable_at = ? WHERE study_instance_uid = ?",
                              (time.time() if at is None else at, study_instance_uid)).rowcount

    # --- scheduling ------------------------------------------------------------------------------

    def receiving(self) -> dict[int, list[SeriesState]]:
        """The series of every ``received`` job with what arrived of each, for the completeness policy."""
        rows = self._query(
            f"SELECT i.job_id, s.series_instance_uid, {', '.join('s.' + c.strip() for c in _ROUTE_COLUMNS.split(','))},"
            " count(*), s.expected, max(i.received_at), s.released_at, s.stable_at"
            " FROM jobs j JOIN instances i ON i.job_id = j.id AND i.late = 0"
            " JOIN series s ON s.series_instance_uid = i.series_instance_uid"
            " WHERE j.state = ? GROUP BY i.job_id, s.series_instance_uid ORDER BY i.job_id", (JobState.RECEIVED,))
        studies: dict[int, list[SeriesState]] = {}
        for row in rows:
            end = 2 + _ROUTE_COLUMN_COUNT
            studies.setdefault(row[0], []).append(SeriesState(row[1], _route(row[2:end]), *row[end:]))
        return studies

    def queue_job(self, job_id: int, why: str, now: float | None = None) -> JobState | None:
        """``received → queued`` with the study's route (first pipeline, most urgent priority, forwards, the
        execution of the routes choosing that pipeline merged); ``→ done`` at once when the rules discard every
        series. Every further pipeline the routes select gets a sibling job, queued at once with the same
        priority and its own merged execution, no forwards (the study is forwarded once, by this job); one that
        already has a sibling (this job re-queued after a ``rerun``) gets none again. Returns the new state,
        None if not received."""
        now = time.time() if now is None else now
        with self._tx() as db:
            routes = [_route(r) for r in db.execute(
                f"SELECT DISTINCT {_ROUTE_COLUMNS} FROM series WHERE series_instance_uid IN"
                " (SELECT series_instance_uid FROM instances WHERE job_id = ? AND late = 0)", (job_id,))]
            kept = [r for r in routes if not r.discard]
            if not kept:
                if not self._transition(db, job_id, (JobState.RECEIVED,), JobState.DONE):
                    return None
                self._log(db, job_id, "done", f"study complete ({why}); every series is discarded by the "
                                              f"routing rules: {'; '.join(sorted({r.description for r in routes}))}")
                return JobState.DONE
            pipelines = list(dict.fromkeys(p for r in kept for p in r.pipelines))
            forwards = list(dict.fromkeys(f for r in kept for f in r.forwards))
            priority = max(r.priority for r in kept)
            execution = self._pipeline_execution(kept, pipelines[0]) if pipelines else Execution()
            db.execute("UPDATE jobs SET pipeline = ?, priority = ?, forwards = ?, restart_requested = 0,"
                       " execution_mode = ?, timeout_seconds = ? WHERE id = ?",
                       (pipelines[0] if pipelines else "", priority, ",".join(forwards),
                        execution.mode or "", execution.timeout_seconds, job_id))
            if not self._queue(db, job_id, now, why):
                return None
            if len(pipelines) > 1:
                self._start_siblings(db, job_id, kept, pipelines, priority, now)
            return JobState.QUEUED

    @staticmethod
    def _pipeline_execution(routes: list[SeriesRoute], pipeline: str) -> Execution:
        """The execution settings of the routes choosing ``pipeline``, merged."""
        execution = Execution()
        for route in routes:
            if pipeline in route.pipelines:
                execution = execution.merged(route.execution)
        return execution

    def _start_siblings(self, db: sqlite3.Connection, job_id: int, routes: list[SeriesRoute],
                        pipelines: list[str], priority: int, now: float) -> None:
        """A queued sibling job of the main job ``job_id`` for each of ``pipelines[1:]`` without one yet."""
        existing = dict(db.execute("SELECT pipeline, id FROM jobs WHERE sibling_of = ? ORDER BY id",
                                   (job_id,)).fetchall())
        main = db.execute("SELECT study_instance_uid, patient_id, calling_ae, peer_address, created_at,"
                          " last_instance_at, whole_study FROM jobs WHERE id = ?", (job_id,)).fetchone()
        started, earlier = [], []
        for pipeline in pipelines[1:]:
            if pipeline in existing:
                earlier.append(f"job {existing[pipeline]} ({pipeline})")
                continue
            execution = self._pipeline_execution(routes, pipeline)
            sibling = db.execute(
                "INSERT INTO jobs (study_instance_uid, patient_id, pipeline, state, calling_ae, peer_address,"
                " created_at, last_instance_at, updated_at, priority, whole_study, execution_mode, timeout_seconds,"
                " sibling_of) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (main[0], main[1], pipeline, JobState.QUEUED, main[2], main[3], main[4], main[5], now, priority,
                 main[6], execution.mode or "", execution.timeout_seconds, job_id)).lastrowid
            self._log(db, sibling, "queued",
                      f"sibling of job {job_id}: the rules select {', '.join(pipelines)} for study {main[0]}; "
                      f"this job runs {pipeline} on job {job_id}'s input (forwards are sent by job {job_id})", now)
            started.append(f"job {sibling} ({pipeline})")
        message = f"rules select {', '.join(pipelines)}; this job runs {pipelines[0]}"
        if started:
            message += f"; started sibling {', '.join(started)}"
        if earlier:
            message += (f"; already run by sibling {', '.join(earlier)}, not started again"
                        " (late instances re-run this job only)")
        self._log(db, job_id, "route", message, now)

    def _queue(self, db: sqlite3.Connection, job_id: int, now: float, why: str) -> bool:
        summary = db.execute(
            "SELECT count(*), count(DISTINCT series_instance_uid), group_concat(DISTINCT modality),"
            " group_concat(DISTINCT calling_ae || ' (' || peer_address || ')'),"
            " count(DISTINCT association_id) FROM instances WHERE job_id = ? AND late = 0",
            (job_id,)).fetchone()
        if not self._transition(db, job_id, (JobState.RECEIVED,), JobState.QUEUED):
            return False
        self._log(db, job_id, "queued",
                  f"study complete: {summary[0]} instances in {summary[1]} series ({summary[2]}) from "
                  f"{summary[3]} over {summary[4]} association(s)" + (f"; {why}" if why else ""), now)
        return True

    def queue_complete_studies(self, idle_seconds: float, now: float | None = None) -> list[int]:
        """Move ``received`` jobs whose study had no new instance for ``idle_seconds`` to ``queued``."""
        now = time.time() if now is None else now
        queued = []
        with self._tx() as db:
            rows = db.execute("SELECT id FROM jobs WHERE state = ? AND last_instance_at <= ? ORDER BY id",
                              (JobState.RECEIVED, now - idle_seconds)).fetchall()
            for (job_id,) in rows:
                if self._queue(db, job_id, now, ""):
                    queued.append(job_id)
        return queued

    def restart_requested(self) -> list[int]:
        """Running jobs whose study got late instances under ``late_instances: rerun``."""
        return [row[0] for row in self._query("SELECT id FROM jobs WHERE state = ? AND restart_requested = 1",
                                              (JobState.RUNNING,))]

    def restart(self, job_id: int) -> bool:
        """``running → received``: the run was stopped for late instances; the job waits for its study again."""
        with self._tx() as db:
            if not self._transition(db, job_id, (JobState.RUNNING,), JobState.RECEIVED):
                return False
            db.execute("UPDATE jobs SET restart_requested = 0 WHERE id = ?", (job_id,))
            self._log(db, job_id, "restarted", "run stopped for late instances; partial output discarded")
            return True

    def next_queued(self) -> Job | None:
        """The queued job to run next: most urgent priority first, then the earliest arrival."""
        rows = self._query(f"SELECT {_JOB_COLUMNS} FROM jobs j WHERE j.state = ?"
                           " ORDER BY j.priority DESC, j.created_at, j.id LIMIT 1", (JobState.QUEUED,))
        return self._opened(_job(rows[0])) if rows else None

    def start_job(self, job_id: int, command: str) -> bool:
        """``queued → running``; counts the run and logs the command; a previous run's review state is cleared.
        False if the job was not queued."""
        with self._tx() as db:
            if not self._transition(db, job_id, (JobState.QUEUED,), JobState.RUNNING):
                return False
            db.execute("UPDATE jobs SET runs = runs + 1, needs_review = NULL, review_reasons = '' WHERE id = ?",
                       (job_id,))
            self._log(db, job_id, "running", command)
            return True

    def job_inputs(self, job_id: int) -> list[Instance]:
        """The instances a job covers: those received before it was queued (late ones and series the rules
        discard excluded); a re-run of a finished study covers the study's earlier jobs' instances too (those
        retention removed excepted); a sibling job covers its main job's."""
        rows = self._query(
            f"SELECT {', '.join('i.' + c.strip() for c in _INSTANCE_COLUMNS.split(','))}"
            " FROM instances i JOIN jobs j ON j.id = (SELECT coalesce(sibling_of, id) FROM jobs WHERE id = ?)"
            " WHERE i.late = 0 AND i.purged_at IS NULL AND (i.job_id = j.id OR (j.whole_study = 1 AND"
            " i.study_instance_uid = j.study_instance_uid AND i.job_id < j.id))"
            " AND i.series_instance_uid NOT IN (SELECT series_instance_uid FROM series WHERE discard = 1)"
            " ORDER BY i.received_at", (job_id,))
        return [self._opened(Instance(*row)) for row in rows]

    def requeue(self, job_id: int, why: str) -> bool:
        """``running → queued`` (interrupted by shutdown or crash); the run will start again from scratch."""
        with self._tx() as db:
            if not self._transition(db, job_id, (JobState.RUNNING,), JobState.QUEUED):
                return False
            self._log(db, job_id, "requeued", why)
            return True

    def running_jobs(self) -> list[int]:
        """Ids of the jobs recorded as running."""
        return [row[0] for row in self._query("SELECT id FROM jobs WHERE state = ?", (JobState.RUNNING,))]

    def record_review(self, job_id: int, needs_review: bool, reasons: Iterable[str]) -> bool:
        """The finished run's review decision (from its manifest), for a running job; logged as a ``review``
        event. False if the job is not running."""
        reasons = [str(r) for r in reasons]
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET needs_review = ?, review_reasons = ? WHERE id = ? AND state = ?",
                             (int(needs_review), json.dumps(reasons), job_id, JobState.RUNNING))
            if cur.rowcount != 1:
                return False
            self._log(db, job_id, "review", f"flagged for human review: {'; '.join(reasons) or 'no reason given'}"
                      if needs_review else "within the uncertainty limits: no review needed")
            return True

    def begin_delivery(self, job_id: int, summary: str, deliveries: list[tuple[str, str]]) -> bool:
        """``running → delivering`` with its (destination, object) deliveries; straight to ``done`` if none."""
        now = time.time()
        with self._tx() as db:
            target = JobState.DELIVERING if deliveries else JobState.DONE
            if not self._transition(db, job_id, (JobState.RUNNING,), target):
                return False
            self._log(db, job_id, "finished", summary)
            db.executemany("INSERT OR IGNORE INTO deliveries (job_id, destination, object, next_attempt_at)"
                           " VALUES (?, ?, ?, ?)", [(job_id, d, o, now) for d, o in deliveries])
            if not deliveries:
                self._log(db, job_id, "done", "nothing to deliver beyond the outbox")
            return True

    def fail_job(self, job_id: int, reason: str) -> bool:
        """Any unfinished state → ``failed`` with the reason; False if the job was already final."""
        with self._tx() as db:
            unfinished = tuple(s for s in JobState if s not in FINAL_STATES)
            if not self._transition(db, job_id, unfinished, JobState.FAILED):
                return False
            db.execute("UPDATE jobs SET reason = ? WHERE id = ?", (reason, job_id))
            self._log(db, job_id, "failed", reason)
            return True

    # --- egress ----------------------------------------------------------------------------------

    def due_deliveries(self, now: float | None = None) -> list[Delivery]:
        """Pending deliveries whose next attempt is due, of jobs that are delivering."""
        rows = self._query(
            "SELECT d.id, d.job_id, d.destination, d.object, d.state, d.attempts, d.next_attempt_at, d.last_error"
            " FROM deliveries d JOIN jobs j ON j.id = d.job_id WHERE j.state = ? AND d.state = 'pending'"
            " AND d.next_attempt_at <= ? ORDER BY d.job_id, d.destination, d.id",
            (JobState.DELIVERING, time.time() if now is None else now))
        return [Delivery(*row) for row in rows]

    def deliveries(self, job_id: int) -> list[Delivery]:
        """Every delivery of a job."""
        rows = self._query(
            "SELECT id, job_id, destination, object, state, attempts, next_attempt_at, last_error"
            " FROM deliveries WHERE job_id = ? ORDER BY destination, object", (job_id,))
        return [Delivery(*row) for row in rows]

    def delivery_done(self, delivery_id: int, message: str) -> None:
        """Record a delivery as done: it will never be attempted again."""
        with self._tx() as db:
            row = db.execute("UPDATE deliveries SET state = 'done', attempts = attempts + 1, done_at = ?,"
                             " last_error = NULL WHERE id = ? AND state = 'pending' RETURNING job_id",
                             (time.time(), delivery_id)).fetchone()
            if row:
                self._log(db, row[0], "delivered", message)

    def delivery_failed(self, delivery_id: int, error: str, max_attempts: int, backoff: tuple[float, float]) -> None:
        """Count a failed attempt: retry after exponential back-off, or give up after ``max_attempts``."""
        initial, ceiling = backoff
        with self._tx() as db:
            row = db.execute("SELECT job_id, attempts, destination, object FROM deliveries"
                             " WHERE id = ? AND state = 'pending'", (delivery_id,)).fetchone()
            if row is None:
                return
            job_id, attempts, destination, obj = row
            attempts += 1
            exhausted = attempts >= max_attempts
            delay = min(initial * 2 ** (attempts - 1), ceiling)
            db.execute("UPDATE deliveries SET attempts = ?, last_error = ?, next_attempt_at = ?, state = ?"
                       " WHERE id = ?", (attempts, error, time.time() + delay,
                                         "failed" if exhausted else "pending", delivery_id))
            retry = "giving up" if exhausted else f"retry in {delay:g} s"
            self._log(db, job_id, "delivery-error", f"{obj} → {destination}: attempt {attempts}: {error}; {retry}")

    def settle_job(self, job_id: int) -> JobState | None:
        """``delivering → done`` when every delivery is done, ``→ failed`` when the rest gave up."""
        with self._tx() as db:
            counts = dict(db.execute("SELECT state, count(*) FROM deliveries WHERE job_id = ? GROUP BY state",
                                     (job_id,)).fetchall())
            if counts.get("pending"):
                return None
            if not counts.get("failed"):
                if self._transition(db, job_id, (JobState.DELIVERING,), JobState.DONE):
                    self._log(db, job_id, "done", f"{counts.get('done', 0)} deliveries done")
                    return JobState.DONE
                return None
            failed = db.execute("SELECT destination, object, attempts, last_error FROM deliveries WHERE job_id = ?"
                                " AND state = 'failed' ORDER BY id LIMIT 1", (job_id,)).fetchone()
            reason = (f"delivery of {failed[1]} to {failed[0]} failed after {failed[2]} attempts: {failed[3]}"
                      f" ({counts['failed']} undelivered; results remain in the outbox)")
            if self._transition(db, job_id, (JobState.DELIVERING,), JobState.FAILED):
                db.execute("UPDATE jobs SET reason = ? WHERE id = ?", (reason, job_id))
                self._log(db, job_id, "failed", reason)
                return JobState.FAILED
            return None

    # --- retention -------------------------------------------------------------------------------

    def purge_due(self, done_before: float | None, failed_before: float | None) -> list[int]:
        """Jobs with files for retention to remove, oldest first: purges left unfinished, then purgeable jobs
        (see :func:`_purgeable`; ``done_before``/``failed_before``: final before this time, None: kept forever)
        never purged yet, or with an instance received before that time still on disk (a late instance, or
        one kept for a newer job). One indexed query; nothing due is cheap."""
        params = {"done_before": done_before, "failed_before": failed_before}
        rows = self._query(
            "SELECT id FROM jobs WHERE purge_started_at IS NOT NULL UNION"
            f" SELECT j.id FROM jobs j WHERE j.state IN ('done', 'failed') AND {_purgeable('j')}"
            " AND (j.purged_at IS NULL OR EXISTS (SELECT 1 FROM instances i WHERE i.job_id = j.id"
            f" AND i.purged_at IS NULL AND i.received_at <= {_cutoff('j')})) ORDER BY 1", params)
        return [row[0] for row in rows]

    def begin_purge(self, job_id: int, done_before: float | None, failed_before: float | None,
                    dry_run: bool = False) -> PurgePlan | None:
        """Record a purge of the job's files before any is removed: its instances received before the cutoff
        get ``purged_at`` (except those a newer, not purgeable whole-study job of the study or a sibling job
        still needs), the
        job ``purge_started_at``. A purge left unfinished is returned as it was recorded (``resumed``). None
        when the job is not purgeable, or was purged and nothing new is due. ``dry_run``: the same decision,
        rolled back."""
        params = {"job": job_id, "done_before": done_before, "failed_before": failed_before}
        with self._tx(commit=not dry_run) as db:
            row = db.execute(f"SELECT j.state, j.updated_at, j.purge_started_at, j.purged_at, {_purgeable('j')}"
                             " FROM jobs j WHERE j.id = :job", params).fetchone()
            if row is None:
                return None
            state, final_at, started, purged_at, purgeable = row
            kept: dict[int, int] = {}
            if started is None:
                if state not in FINAL_STATES or not purgeable:
                    return None
                marker = time.time()
                fresh = []
                keeper_sql = ("SELECT min(k.id) FROM jobs k WHERE i.late = 0 AND (k.sibling_of = i.job_id"
                              " OR (k.whole_study = 1 AND k.study_instance_uid = i.study_instance_uid"
                              " AND coalesce(k.sibling_of, k.id) > i.job_id))"
                              f" AND k.purged_at IS NULL AND k.purge_started_at IS NULL AND NOT ({_purgeable('k')})")
                for sop, keeper in db.execute(
                        f"SELECT i.sop_instance_uid, ({keeper_sql}) FROM instances i JOIN jobs j ON j.id = i.job_id"
                        f" WHERE i.job_id = :job AND i.purged_at IS NULL AND i.received_at <= {_cutoff('j')}"
                        " ORDER BY i.received_at", params).fetchall():
                    if keeper is None:
                        fresh.append(sop)
                    else:
                        kept[keeper] = kept.get(keeper, 0) + 1
                if not fresh and purged_at is not None:
                    return None
                db.executemany("UPDATE instances SET purged_at = ? WHERE sop_instance_uid = ?",
                               [(marker, sop) for sop in fresh])
                db.execute("UPDATE jobs SET purge_started_at = ? WHERE id = ?", (marker, job_id))
            else:
                marker = started
            paths = tuple(r[0] for r in db.execute("SELECT path FROM instances WHERE job_id = ? AND purged_at = ?"
                                                   " ORDER BY received_at", (job_id, marker)))
            return PurgePlan(job_id, JobState(state), final_at, marker, paths, tuple(sorted(kept.items())),
                             resumed=started is not None)

    def finish_purge(self, job_id: int, marker: float, message: str) -> bool:
        """The purge's files are gone: the job gets ``purged_at`` and a ``purged`` event with ``message``.
        False if that purge was already finished (by another process, say)."""
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET purge_started_at = NULL, purged_at = ? WHERE id = ?"
                             " AND purge_started_at = ?", (time.time(), job_id, marker))
            if cur.rowcount != 1:
                return False
            self._log(db, job_id, "purged", message)
            return True

    # --- introspection ---------------------------------------------------------------------------

    def job(self, job_id: int) -> Job | None:
        """One job with its instance counts, or None."""
        rows = self._query(f"SELECT {_JOB_COLUMNS} FROM jobs j WHERE j.id = ?", (job_id,))
        return self._opened(_job(rows[0])) if rows else None

    def jobs(self, state: JobState | None = None, needs_review: bool | None = None) -> list[Job]:
        """All jobs, oldest first; or those in one ``state``, those flagged for review (``needs_review=True``)
        or those assessed and not flagged (``False``; jobs not assessed are neither)."""
        conditions, params = [], []
        if state:
            conditions.append("j.state = ?")
            params.append(state)
        if needs_review is not None:
            conditions.append("j.needs_review = ?")
            params.append(int(needs_review))
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        return [self._opened(_job(row))
                for row in self._query(f"SELECT {_JOB_COLUMNS} FROM jobs j {where} ORDER BY j.id", params)]

    def job_counts(self) -> tuple[dict[str, int], int]:
        """Jobs per state and how many are flagged for review, counted in SQL (cheap for a health probe)."""
        counts = {state.value: 0 for state in JobState}
        counts.update({state: n for state, n in self._query("SELECT state, COUNT(*) FROM jobs GROUP BY state")})
        flagged = self._query("SELECT COUNT(*) FROM jobs WHERE needs_review = 1")[0][0]
        return counts, int(flagged)

    def events(self, job_id: int, after_id: int = 0) -> list[Event]:
        """A job's event log in order (``after_id`` for polling only what is new)."""
        rows = self._query("SELECT id, job_id, at, kind, message FROM events WHERE job_id = ? AND id > ? ORDER BY id",
                           (job_id, after_id))
        return [Event(*row) for row in rows]

    def instances(self, job_id: int) -> list[Instance]:
        """Every instance recorded for a job, late ones included."""
        rows = self._query(
            "SELECT sop_instance_uid, study_instance_uid, series_instance_uid, patient_id, modality, sop_class_uid,"
            " path, calling_ae, peer_address, association_id, received_at FROM instances WHERE job_id = ?"
            " ORDER BY received_at", (job_id,))
        return [self._opened(Instance(*row)) for row in rows]

    # --- helpers ---------------------------------------------------------------------------------

    def _transition(self, db: sqlite3.Connection, job_id: int, sources: tuple[JobState, ...],
                    target: JobState) -> bool:
        marks = ", ".join("?" * len(sources))
        cur = db.execute(f"UPDATE jobs SET state = ?, updated_at = ? WHERE id = ? AND state IN ({marks})",
                         (target, time.time(), job_id, *sources))
        return cur.rowcount == 1
