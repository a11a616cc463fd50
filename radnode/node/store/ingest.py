"""Recording arrivals: instances under their study's job, each series with its routing decision.

A series is routed once: its decision is taken on its first instance (the caller passes it, or a function
that takes it, called only then) and kept in its row; later instances and duplicates read it back. A
study's arrivals hold its row lock (``jobs.lock_study``), so instances of one study arriving at two ingress
processes make one job, and one SOP instance recorded twice is one row (its primary key) and a
``duplicate`` event. A SOP Instance UID already recorded under another study is refused
(:class:`ForeignInstance`), never merged into the first study; refusals of a study's instances are recorded
(``refusals``) so the study is not processed incomplete. A correction candidate (``Provenance.CORRECTION``) is
also recorded as a pending correction in the same transaction (``feedback.py``), so none is lost between
arrival and matching.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from sqlalchemy import Connection, Executable, bindparam, case, false, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from radnode.node.store.database import Database
from radnode.node.store.events import log_event
from radnode.node.store.feedback import record_correction
from radnode.node.store.jobs import lock_study, release, reopen_siblings, transition
from radnode.node.store.policy import LateAction, late_action
from radnode.node.store.records import (
    Arrival, ForeignInstance, Instance, InstanceBeingPurged, InstanceFileGone, JobState,
)
from radnode.node.store.schema import instances, jobs, refusals, series, studies
from radnode.pipelines.routing import LateInstances, Provenance, SeriesDecision

Decide = SeriesDecision | Callable[[], SeriesDecision]
"""A series' decision, or the function that takes it (called on the series' first instance only)."""


class _Raced(Exception):
    """Another process recorded the same SOP instance between our look and our insert: try again."""


@dataclass(frozen=True)
class Prior:
    """What the store already holds of a SOP Instance UID, looked up before its file is written."""

    study_instance_uid: str
    """The study it is recorded under (purged or not)."""
    kept: bool
    """Indexed and its file kept (not removed by retention)."""
    being_purged: bool
    """A retention purge removing its file is under way."""


@dataclass(frozen=True)
class _Statements:
    """The arrival path's statements, built once per dialect with bound parameters: SQLAlchemy then compiles
    each once and reuses its cache key, so recording an instance costs the SQL, not the building of it (which
    was most of the ~4 ms of Python per instance)."""

    known: Executable
    new_study: Executable
    study_expected: Executable
    series_seen: Executable
    new_series: Executable
    refusal_cleared: Executable
    latest_job: Executable
    last_instance_at: Executable
    new_instance: Executable

    @staticmethod
    @cache
    def of(dialect_name: str) -> "_Statements":
        dialect_insert = sqlite.insert if dialect_name == "sqlite" else postgresql.insert
        study, sop = bindparam("study"), bindparam("sop")
        at = bindparam("at")
        return _Statements(
            known=select(instances.c.job_id, instances.c.study_instance_uid, instances.c.purged_at,
                         jobs.c.purge_started_at)
            .join(jobs, jobs.c.id == instances.c.job_id).where(instances.c.sop_instance_uid == sop),
            new_study=dialect_insert(studies).values(study_instance_uid=study, first_received_at=at)
            .on_conflict_do_nothing(),
            study_expected=update(studies).where(studies.c.study_instance_uid == study)
            .values(expected_instances=bindparam("expected")),
            series_seen=update(series).where(series.c.series_instance_uid == bindparam("series_uid"))
            .values(last_association_id=bindparam("association"), released_at=None, stable_at=None,
                    expected=func.coalesce(series.c.expected, bindparam("expected", type_=series.c.expected.type)))
            .returning(series.c.decision),
            new_series=insert(series),
            refusal_cleared=refusals.delete().where(refusals.c.study_instance_uid == study,
                                                    refusals.c.sop_instance_uid == sop),
            latest_job=select(jobs.c.id, jobs.c.state).where(jobs.c.study_instance_uid == study,
                                                             jobs.c.sibling_of.is_(None))
            .order_by(jobs.c.id.desc()).limit(1),
            last_instance_at=update(jobs).where(jobs.c.id == bindparam("job")).values(last_instance_at=case(
                (jobs.c.last_instance_at < at, at), else_=jobs.c.last_instance_at)),
            new_instance=dialect_insert(instances).on_conflict_do_nothing().returning(instances.c.sop_instance_uid))


class Arrivals:
    """The ingress side of the store."""

    _db: Database

    def has_instance(self, sop_instance_uid: str) -> bool:
        """Whether this SOP instance is indexed and its file kept (one retention removed is received anew)."""
        with self._db.read() as conn:
            return conn.execute(select(instances.c.sop_instance_uid).where(
                instances.c.sop_instance_uid == sop_instance_uid, instances.c.purged_at.is_(None))).first() is not None

    def prior(self, sop_instance_uid: str) -> Prior | None:
        """What the store holds of this SOP Instance UID (one query), or None if never received."""
        with self._db.read() as conn:
            row = conn.execute(self._statements.known, {"sop": sop_instance_uid}).first()
        if row is None:
            return None
        return Prior(row.study_instance_uid, kept=row.purged_at is None,
                     being_purged=row.purged_at is not None and row.purged_at == row.purge_started_at)

    @property
    def _statements(self) -> _Statements:
        return _Statements.of(self._db.engine.dialect.name)

    def record_refusal(self, study_instance_uid: str, sop_instance_uid: str, reason: str, calling_ae: str = "",
                       at: float | None = None) -> None:
        """An instance of the study was refused for its content: the study is incomplete until the same SOP
        instance is received and kept; logged on the study's latest job when it has one. A damaged copy of an
        instance the study already holds leaves it complete (the first copy is kept). Under ``late_instances:
        rerun``, a job already queued or running waits for its study again (and then fails, naming the refusal,
        unless the instance is re-sent and kept): results of a study known to be incomplete never go out."""
        at = time.time() if at is None else at
        with self._db.write() as conn:
            lock_study(self._db, conn, study_instance_uid, at)
            job = conn.execute(select(jobs.c.id, jobs.c.state).where(jobs.c.study_instance_uid == study_instance_uid,
                                                                     jobs.c.sibling_of.is_(None))
                               .order_by(jobs.c.id.desc()).limit(1)).first()
            what = f"{sop_instance_uid} from {calling_ae or '?'}: {reason}"
            held = conn.execute(select(instances.c.study_instance_uid).where(
                instances.c.sop_instance_uid == sop_instance_uid, instances.c.purged_at.is_(None))).scalar()
            if held == study_instance_uid:
                if job is not None:
                    log_event(conn, job.id, "refused", f"{what}; a damaged copy of an instance the study holds: "
                                                       "the first copy is kept", at)
                return
            conn.execute(refusals.delete().where(refusals.c.study_instance_uid == study_instance_uid,
                                                 refusals.c.sop_instance_uid == sop_instance_uid))
            conn.execute(insert(refusals).values(study_instance_uid=study_instance_uid,
                                                 sop_instance_uid=sop_instance_uid, reason=reason,
                                                 calling_ae=calling_ae, at=at))
            if job is None:
                return
            log_event(conn, job.id, "refused", what, at)
            if job.state in (JobState.QUEUED.value, JobState.RUNNING.value) and self._reruns(conn, job.id):
                self._reopen(conn, job.id, JobState(job.state), f"an instance of job {job.id}'s study was refused "
                                                                f"({sop_instance_uid})", at)

    @staticmethod
    def _reruns(conn: Connection, job_id: int) -> bool:
        """Whether a series of the job's input takes ``late_instances: rerun``."""
        own_series = select(instances.c.series_instance_uid).where(instances.c.job_id == job_id)
        return any(SeriesDecision.from_record(d).late_instances is LateInstances.RERUN for d in conn.execute(
            select(series.c.decision).where(series.c.series_instance_uid.in_(own_series))).scalars())

    @staticmethod
    def _reopen(conn: Connection, job_id: int, state: JobState, why: str, at: float) -> None:
        """A queued or running main job waits for its study again (``rerun``), with every pipeline of the study:
        queued, it is received again (its dispatch released); running, its restart is requested."""
        if state is JobState.QUEUED:
            transition(conn, job_id, (JobState.QUEUED,), JobState.RECEIVED)
            release(conn, job_id, "stopped", "late instances: waits for its study again", at)
        else:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(restart_requested=True))
        reopen_siblings(conn, job_id, why, at)

    def being_purged(self, sop_instance_uid: str) -> bool:
        """Whether a retention purge that removes this instance's file is under way (not finished)."""
        query = (select(instances.c.sop_instance_uid).join(jobs, jobs.c.id == instances.c.job_id)
                 .where(instances.c.sop_instance_uid == sop_instance_uid, instances.c.purged_at.is_not(None),
                        instances.c.purged_at == jobs.c.purge_started_at))
        with self._db.read() as conn:
            return conn.execute(query).first() is not None

    def indexed_paths(self) -> set[str]:
        """The spool paths of every indexed instance, purged ones included (for re-indexing after a crash: a
        file an interrupted purge left behind is not indexed again)."""
        with self._db.read() as conn:
            return set(conn.execute(select(instances.c.path)).scalars())

    def series_decision(self, series_instance_uid: str) -> SeriesDecision | None:
        """The decision recorded for a series, or None before its first instance."""
        with self._db.read() as conn:
            data = conn.execute(select(series.c.decision).where(
                series.c.series_instance_uid == series_instance_uid)).scalar()
        return None if data is None else SeriesDecision.from_record(data)

    def record_instance(self, inst: Instance, decision: Decide, expected: int | None = None,
                        study_expected: int | None = None, file_written: bool = True) -> tuple[Arrival, int]:
        """Index a received instance under its study's job (created on the first one); idempotent.

        ``decision`` is the series' routing decision (or the function taking it), used on its first instance;
        ``expected`` its expected instance count, ``study_expected`` the study's (when the sender gave them).
        Returns what the arrival meant and the job it belongs to.
        An instance whose file retention removed is indexed anew (its old row leaves its old job, whose log
        says so); ``InstanceBeingPurged`` while that removal is still under way. ``file_written`` False: the
        caller kept the earlier copy's file rather than writing it (a re-send); InstanceFileGone when retention
        removed that file meanwhile (the caller writes it and records again).
        """
        try:
            return self._record(inst, decision, expected, study_expected, file_written)
        except _Raced:
            return self._record(inst, decision, expected, study_expected, file_written)

    def _record(self, inst: Instance, decide: Decide, expected: int | None, study_expected: int | None,
                file_written: bool) -> tuple[Arrival, int]:
        sealed = self._db.sealed(inst.patient_id, inst.study_instance_uid)
        sql = self._statements
        study, sop, at = inst.study_instance_uid, inst.sop_instance_uid, inst.received_at
        with self._db.write() as conn:
            if self._db.is_sqlite:  # its BEGIN IMMEDIATE holds the whole database: the study's row need only exist
                conn.execute(sql.new_study, {"study": study, "at": at})
            else:
                lock_study(self._db, conn, study, at)
            if study_expected is not None:
                conn.execute(sql.study_expected, {"study": study, "expected": study_expected})
            known = conn.execute(sql.known, {"sop": sop}).first()
            if known is not None and known.study_instance_uid != study:
                raise ForeignInstance(f"SOPInstanceUID {sop} already belongs to study "
                                      f"{known.study_instance_uid}, not {study}")
            if known is not None and known.purged_at is not None:
                if known.purged_at == known.purge_started_at:
                    raise InstanceBeingPurged(f"{sop} is being removed by the retention purge "
                                              f"of job {known.job_id}; send it again later")
                if not file_written:
                    raise InstanceFileGone(f"{sop}: retention removed the copy this re-send was to keep")
                conn.execute(instances.delete().where(instances.c.sop_instance_uid == sop))
                log_event(conn, known.job_id, "re-received",
                          f"{sop}, purged by retention, received again from "
                          f"{inst.calling_ae or '?'} ({inst.peer_address or '?'}); indexed anew", at)
                known = None
            if known is not None:
                log_event(conn, known.job_id, "duplicate",
                          f"{sop} received again from {inst.calling_ae or '?'} "
                          f"({inst.peer_address or '?'}); first copy kept", at)
                return Arrival.DUPLICATE, known.job_id
            decision = self._series_arrival(conn, sql, inst, decide, expected)
            conn.execute(sql.refusal_cleared, {"study": study, "sop": sop})
            latest = conn.execute(sql.latest_job, {"study": study}).first()
            arrival = Arrival.NEW
            if latest is None:
                job_id = self._new_job(conn, inst, sealed, decision, whole_study=False)
            elif latest.state == JobState.RECEIVED:
                job_id = latest.id
            else:
                arrival, job_id = self._late(conn, inst, sealed, decision, latest.id, JobState(latest.state))
            if arrival is Arrival.NEW:
                conn.execute(sql.last_instance_at, {"job": job_id, "at": at})
            written = conn.execute(sql.new_instance, {
                **{name: getattr(inst, name) for name in Instance.__dataclass_fields__ if name != "patient_id"},
                "sealed_patient_id": sealed, "job_id": job_id, "late": arrival in (Arrival.LATE, Arrival.OWN_RESULT),
                "provenance": decision.provenance.value}).first()
            if written is None:  # recorded meanwhile by another process, under another study's lock
                raise _Raced()
            if decision.provenance is Provenance.CORRECTION:
                record_correction(conn, inst)
            return arrival, job_id

    @staticmethod
    def _series_arrival(conn: Connection, sql: _Statements, inst: Instance, decide: Decide,
                        expected: int | None) -> SeriesDecision:
        """The series' decision (taken and recorded on its first instance) and the association now delivering."""
        data = conn.execute(sql.series_seen, {"series_uid": inst.series_instance_uid,
                                              "association": inst.association_id, "expected": expected}).scalar()
        if data is not None:
            return SeriesDecision.from_record(data)
        decision = decide() if callable(decide) else decide
        conn.execute(sql.new_series, {"series_instance_uid": inst.series_instance_uid,
                                      "study_instance_uid": inst.study_instance_uid, "decision": decision.to_record(),
                                      "skipped": decision.skipped, "expected": expected,
                                      "last_association_id": inst.association_id})
        return decision

    @staticmethod
    def _new_job(conn: Connection, inst: Instance, sealed_patient_id: str, decision: SeriesDecision,
                 whole_study: bool) -> int:
        job_id = conn.execute(insert(jobs).values(
            study_instance_uid=inst.study_instance_uid, sealed_patient_id=sealed_patient_id,
            pipeline=decision.pipelines[0] if decision.pipelines and not decision.skipped else "",
            state=JobState.RECEIVED.value, calling_ae=inst.calling_ae, peer_address=inst.peer_address,
            created_at=inst.received_at, last_instance_at=inst.received_at, updated_at=inst.received_at,
            priority=decision.priority.rank, whole_study=whole_study)).inserted_primary_key[0]
        log_event(conn, job_id, "received",
                  f"study {inst.study_instance_uid} arriving from {inst.calling_ae or '?'} "
                  f"({inst.peer_address or '?'}), association {inst.association_id or '?'}", inst.received_at)
        return job_id

    def _late(self, conn: Connection, inst: Instance, sealed: str, decision: SeriesDecision, job_id: int,
              state: JobState) -> tuple[Arrival, int]:
        """An instance of a study whose latest job is past ``received``: apply :func:`~policy.late_action`."""
        what = (f"{inst.modality} {inst.sop_instance_uid} (series {inst.series_instance_uid}) arrived from "
                f"{inst.calling_ae or '?'} after the job was {state}")
        action = late_action(state, decision)
        at = inst.received_at
        if action is LateAction.OWN_RESULT:
            log_event(conn, job_id, "own-result", f"{what}; kept in the spool, not processed: {decision.describe()}", at)
            return Arrival.OWN_RESULT, job_id
        if action is LateAction.CORRECTION:
            log_event(conn, job_id, "correction", f"{what}; kept in the spool, not processed: {decision.describe()}", at)
            return Arrival.LATE, job_id
        if action in (LateAction.WAIT_AGAIN, LateAction.RESTART):
            log_event(conn, job_id, "late", f"{what}; added to the input, the job waits for the study again "
                                            "and runs from scratch (late_instances: rerun)", at)
            self._reopen(conn, job_id, state, f"job {job_id}'s study got a late instance ({inst.sop_instance_uid})",
                         at)
            return Arrival.NEW, job_id
        if action in (LateAction.RERUN_STUDY, LateAction.NEW_JOB):
            whole = action is LateAction.RERUN_STUDY
            new_id = self._new_job(conn, inst, sealed, decision, whole_study=whole)
            scope = "the whole study" if whole else "the late instances"
            if whole:
                purged = conn.execute(select(func.count()).where(
                    instances.c.study_instance_uid == inst.study_instance_uid, instances.c.purged_at.is_not(None),
                    instances.c.late == false())).scalar()
                if purged:
                    scope += f" (less {purged} earlier instance(s) retention already removed)"
            log_event(conn, job_id, "late", f"{what}; job {new_id} processes {scope} "
                                            f"(late_instances: {decision.late_instances})", at)
            return Arrival.NEW, new_id
        reason = ("its series is skipped by the routing rules" if decision.skipped
                  else f"late_instances: {decision.late_instances}")
        log_event(conn, job_id, "late", f"{what}; kept in the spool, not part of this job's input ({reason})", at)
        return Arrival.LATE, job_id

    def association_released(self, association_id: str, at: float | None = None) -> int:
        """The association that last delivered to some series was released; returns how many series."""
        with self._db.write() as conn:
            return conn.execute(update(series).where(series.c.last_association_id == association_id,
                                                     series.c.released_at.is_(None))
                                .values(released_at=time.time() if at is None else at)).rowcount

    def study_stable(self, study_instance_uid: str, at: float | None = None) -> int:
        """Orthanc reported the study stable: its series are complete; returns how many series."""
        with self._db.write() as conn:
            return conn.execute(update(series).where(series.c.study_instance_uid == study_instance_uid)
                                .values(stable_at=time.time() if at is None else at)).rowcount

