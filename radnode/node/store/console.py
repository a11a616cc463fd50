"""The console's records: people, API tokens and sessions; operators' actions on jobs, each in the job's event
log with the person who took it (a re-send is egress's: ``Deliveries.resend``); run-time settings (the queue
paused); study details for the job list.

Actions are guarded transitions like the node's own: one that does not apply to the job's state changes
nothing and says why (:class:`ActionRefused`), so two operators clicking at once act once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, Row, and_, delete, false, func, insert, or_, select, true, update

from radnode.node.store.database import Database
from radnode.node.store.deliveries import earlier_reissue, queue_reissue
from radnode.node.store.events import log_event
from radnode.node.store.jobs import release, rerun_shadows, transition
from radnode.node.store.records import CANCELLED_BY, FINAL_STATES, ActionRefused, JobState, ReissuePlan
from radnode.node.store.results import superseded_by
from radnode.node.store.schema import (
    api_tokens, deliveries, instances, jobs, node_settings, refusals, reviews, sessions, study_details, users,
)

QUEUE_PAUSED = "queue_paused"
REVIEW_DECISIONS = ("reviewed", "accepted", "corrected", "rejected")
"""What a reviewer records: looked at a flagged result; or, for local performance, accepted as it was,
corrected (a corrected SEG usually follows), rejected."""
DECISIONS = REVIEW_DECISIONS[1:]
"""The decisions on a job's results (each re-issues them, ``radnode/feedback/reissue.py``)."""
REJECT_REASONS = ("wrong-series", "wrong-anatomy", "segmentation-failed", "image-quality", "other")
"""Why a result was rejected: the short list the API offers."""


@dataclass(frozen=True)
class StudyDetails:
    """What the job list shows of a study beyond its UID."""

    accession_number: str = ""
    study_description: str = ""
    modalities: tuple[str, ...] = ()


def _purged_input(conn: Connection, job_id: int, sibling: bool) -> int:
    """How many instances of job ``job_id``'s input retention removed: its own (late ones too, which a retry
    takes in; a sibling reads only the others) and, for a whole-study job, the study's earlier jobs'."""
    j = jobs.alias("j")
    query = (select(func.count()).select_from(instances.join(j, j.c.id == job_id))
             .where(instances.c.purged_at.is_not(None),
                    or_(instances.c.job_id == j.c.id,
                        and_(j.c.whole_study == true(), instances.c.study_instance_uid == j.c.study_instance_uid,
                             instances.c.job_id < j.c.id, instances.c.late == false()))))
    if sibling:
        query = query.where(instances.c.late == false())
    return int(conn.execute(query).scalar() or 0)


def record_review(conn: Connection, job_id: int, user: str, note: str, decision: str, reason: str | None) -> int:
    """Record a review in the caller's transaction, refused (ActionRefused) where it does not apply: see
    :meth:`Console.mark_reviewed`. Returns the review's id."""
    if decision not in REVIEW_DECISIONS:
        raise ActionRefused(f"unknown review decision {decision!r}: one of {', '.join(REVIEW_DECISIONS)}")
    if decision == "rejected" and reason is None:
        raise ActionRefused(f"a rejection needs a reason: one of {', '.join(REJECT_REASONS)}")
    if decision != "rejected" and reason is not None:
        raise ActionRefused(f"only a rejection takes a reason, not {decision}")
    if reason is not None and reason not in REJECT_REASONS:
        raise ActionRefused(f"unknown rejection reason {reason!r}: one of {', '.join(REJECT_REASONS)}")
    row = conn.execute(select(jobs.c.needs_review, jobs.c.state, jobs.c.pipeline, jobs.c.purged_at,
                              jobs.c.purge_started_at).where(jobs.c.id == job_id).with_for_update()).first()
    if row is None:
        raise LookupError(f"no job {job_id}")
    if decision != "reviewed" and not row.pipeline:
        raise ActionRefused(f"job {job_id} forwarded the study without a pipeline: it has no results to be "
                            f"{decision} (its outbox holds the study's own images)")
    if decision != "reviewed" and (row.purged_at is not None or row.purge_started_at is not None):
        raise ActionRefused(f"job {job_id}'s results were purged by retention: no verified report or rejection "
                            f"note can be made of them any more, so the decision cannot go where they went")
    newer = superseded_by(conn, job_id)
    if decision != "reviewed" and newer is not None:
        raise ActionRefused(f"job {job_id}'s results were superseded by job {newer}'s (withdrawn where they "
                            f"went): review job {newer} instead")
    if decision == "reviewed" and not row.needs_review:
        raise ActionRefused(f"job {job_id} is not flagged for review")
    if decision != "reviewed" and row.state != JobState.DONE.value and not (
            row.state in (JobState.DELIVERING.value, JobState.FAILED.value)
            and conn.execute(select(reviews.c.id).where(reviews.c.job_id == job_id,
                                                        reviews.c.decision.in_(DECISIONS))).first()):
        raise ActionRefused(f"job {job_id} is {row.state}: only a done job's results can be {decision}")
    if decision != "reviewed" and conn.execute(select(reviews.c.id).where(
            reviews.c.job_id == job_id, reviews.c.decision == "rejected")).first():
        raise ActionRefused(f"job {job_id}'s results were rejected: a rejection note withdrew them at the "
                            f"DICOM destinations and the EHR's report is entered-in-error, which is final "
                            f"(IHE IOCM); they cannot be {decision} now")
    text = note if reason is None else f"{reason}" + (f"; {note}" if note else "")
    review_id = conn.execute(insert(reviews).values(job_id=job_id, decision=decision, reviewer=user,
                                                    note=text, at=time.time())
                             .returning(reviews.c.id)).scalar_one()
    log_event(conn, job_id, "reviewed", f"{decision} by {user}" + (f": {text}" if text else ""))
    return review_id


class Console:
    """The store's console area (see the module docstring)."""

    _db: Database

    # --- accounts (rows only; hashing and policy are radnode.console.accounts) ----------------------

    def insert_user(self, values: dict) -> bool:
        with self._db.write() as conn:
            return conn.execute(self._db.insert_ignoring_conflicts(users).values(**values)  # psycopg: rowcount -1
                                .returning(users.c.name)).first() is not None

    def update_user(self, name: str, values: dict, end_sessions: bool = False) -> bool:
        with self._db.write() as conn:
            changed = conn.execute(update(users).where(users.c.name == name).values(**values)).rowcount == 1
            if end_sessions:
                conn.execute(delete(sessions).where(sessions.c.user_name == name))
            return changed

    def delete_user(self, name: str) -> bool:
        with self._db.write() as conn:
            conn.execute(delete(sessions).where(sessions.c.user_name == name))
            return conn.execute(delete(users).where(users.c.name == name)).rowcount == 1

    def user_rows(self, name: str | None = None) -> list[Row]:
        query = select(users).order_by(users.c.name)
        if name is not None:
            query = query.where(users.c.name == name)
        with self._db.read() as conn:
            return list(conn.execute(query))

    def insert_token(self, values: dict) -> bool:
        with self._db.write() as conn:
            return conn.execute(self._db.insert_ignoring_conflicts(api_tokens).values(**values)  # psycopg: rowcount -1
                                .returning(api_tokens.c.name)).first() is not None

    def delete_token(self, name: str) -> bool:
        with self._db.write() as conn:
            return conn.execute(delete(api_tokens).where(api_tokens.c.name == name)).rowcount == 1

    def token_rows(self, digest: str | None = None) -> list[Row]:
        query = select(api_tokens).order_by(api_tokens.c.name)
        if digest is not None:
            query = query.where(api_tokens.c.token_sha256 == digest)
        with self._db.read() as conn:
            return list(conn.execute(query))

    def token_used(self, name: str, at: float) -> None:
        with self._db.write() as conn:
            conn.execute(update(api_tokens).where(api_tokens.c.name == name).values(last_used_at=at))

    def insert_session(self, values: dict) -> None:
        with self._db.write() as conn:
            conn.execute(delete(sessions).where(sessions.c.expires_at < time.time()))
            conn.execute(insert(sessions).values(**values))

    def session_row(self, digest: str) -> Row | None:
        query = (select(users.c.name, users.c.role, sessions.c.csrf, sessions.c.expires_at)
                 .join(users, users.c.name == sessions.c.user_name).where(sessions.c.id_sha256 == digest))
        with self._db.read() as conn:
            return conn.execute(query).first()

    def delete_session(self, digest: str) -> None:
        with self._db.write() as conn:
            conn.execute(delete(sessions).where(sessions.c.id_sha256 == digest))

    # --- run-time settings ---------------------------------------------------------------------------

    def queue_paused(self) -> bool:
        """Whether an operator paused the queue (no job starts; ingest and deliveries carry on)."""
        with self._db.read() as conn:
            value = conn.execute(select(node_settings.c.value).where(node_settings.c.name == QUEUE_PAUSED)).scalar()
        return value == "true"

    def set_queue_paused(self, paused: bool, user: str) -> bool:
        """Pause or resume the queue; False when it already was so."""
        with self._db.write() as conn:
            current = conn.execute(select(node_settings.c.value).where(node_settings.c.name == QUEUE_PAUSED)
                                   .with_for_update()).scalar()
            if (current == "true") == paused:
                return False
            values = {"value": "true" if paused else "false", "changed_at": time.time(), "changed_by": user}
            if current is None:
                conn.execute(insert(node_settings).values(name=QUEUE_PAUSED, **values))
            else:
                conn.execute(update(node_settings).where(node_settings.c.name == QUEUE_PAUSED).values(**values))
            return True

    # --- study details -------------------------------------------------------------------------------

    def note_study(self, study_uid: str, accession_number: str, study_description: str) -> None:
        """Keep a study's accession number (sealed like the Patient ID: it names a patient's visit) and
        description (the first instance's; later ones change nothing)."""
        with self._db.write() as conn:
            conn.execute(self._db.insert_ignoring_conflicts(study_details).values(
                study_instance_uid=study_uid, sealed_accession_number=self._db.sealed(accession_number),
                study_description=study_description))

    def study_details(self, study_uids: Iterable[str]) -> dict[str, StudyDetails]:
        """Details of these studies (with the modalities received), by Study Instance UID."""
        uids = list(set(study_uids))
        if not uids:
            return {}
        details: dict[str, StudyDetails] = {}
        with self._db.read() as conn:
            modalities: dict[str, set[str]] = {}
            for uid, modality in conn.execute(select(instances.c.study_instance_uid, instances.c.modality).distinct()
                                              .where(instances.c.study_instance_uid.in_(uids))):
                modalities.setdefault(uid, set()).add(modality)
            for row in conn.execute(select(study_details).where(study_details.c.study_instance_uid.in_(uids))):
                details[row.study_instance_uid] = StudyDetails(self._db.opened_identity(row.sealed_accession_number),
                                                                row.study_description)
        return {uid: StudyDetails(details.get(uid, StudyDetails()).accession_number,
                                  details.get(uid, StudyDetails()).study_description,
                                  tuple(sorted(modalities.get(uid, ())))) for uid in uids}

    # --- operators' actions --------------------------------------------------------------------------

    def _locked_state(self, conn, job_id: int) -> JobState:  # type: ignore[no-untyped-def]
        state = conn.execute(select(jobs.c.state).where(jobs.c.id == job_id).with_for_update()).scalar()
        if state is None:
            raise LookupError(f"no job {job_id}")
        return JobState(state)

    def retry_job(self, job_id: int, user: str, note: str = "", without_refused: bool = False) -> int:
        """A failed job runs again on every instance received for its study (late ones included, e.g. a
        missing series sent after it failed), routed anew on them; its earlier deliveries go with the run. A
        sibling or shadow job runs its pipeline again on its main job's input (a shadow run is then compared
        again). Returns how many instances the new run covers. Refused for a job whose results reached a
        destination already (it failed delivering elsewhere): re-sending is what it needs; and for a job whose
        input retention removed, even in part (a run on what is left would deliver a partial study's results).
        ``without_refused`` (a main job, with a note): the study's refused instances are given up on, so it is
        processed without them; the event names each one, for the record."""
        with self._db.write() as conn:
            state = self._locked_state(conn, job_id)
            if state is not JobState.FAILED:
                raise ActionRefused(f"job {job_id} is {state}: only a failed job can be retried")
            if without_refused:
                self._give_up_refused(conn, job_id, user, note)
            reached = sorted(set(conn.execute(select(deliveries.c.destination).where(
                deliveries.c.job_id == job_id, deliveries.c.state == "done")).scalars()))
            if reached:  # a new run makes new UIDs: those destinations would hold two sets of results
                raise ActionRefused(f"job {job_id}'s results reached {', '.join(reached)} already; a new run would "
                                    "leave a second set of results there: re-send its failed deliveries instead "
                                    "(resend, failed only)")
            main = conn.execute(select(jobs.c.sibling_of).where(jobs.c.id == job_id)).scalar()
            if purged := _purged_input(conn, job_id if main is None else main, sibling=main is not None):
                raise ActionRefused(f"job {job_id}'s input was purged by retention: {purged} instance(s) removed; "
                                    "a new run would cover only what is left of the study")
            release(conn, job_id, "failed", "", time.time())  # dispatched afresh, with its input as it is now
            if main is not None:  # a sibling or shadow job: its pipeline again, on its main job's input
                conn.execute(delete(deliveries).where(deliveries.c.job_id == job_id))
                transition(conn, job_id, (JobState.FAILED,), JobState.QUEUED)
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(reason=None))
                count = int(conn.execute(select(func.count()).select_from(instances).where(
                    instances.c.job_id == main, instances.c.late == false(),
                    instances.c.purged_at.is_(None))).scalar() or 0)
                log_event(conn, job_id, "retry", f"retried by {user}: runs again on job {main}'s {count} "
                          "instance(s)" + (f" ({note})" if note else ""))
                return count
            conn.execute(update(instances).where(instances.c.job_id == job_id, instances.c.late == true())
                         .values(late=False))
            conn.execute(delete(deliveries).where(deliveries.c.job_id == job_id))
            transition(conn, job_id, (JobState.FAILED,), JobState.RECEIVED)
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(reason=None, restart_requested=False))
            rerun_shadows(conn, job_id, f"job {job_id} retried by {user}", time.time())
            count = int(conn.execute(select(func.count()).select_from(instances).where(
                instances.c.job_id == job_id, instances.c.purged_at.is_(None))).scalar() or 0)
            log_event(conn, job_id, "retry", f"retried by {user}: runs again on {count} received instance(s)"
                      + (f" ({note})" if note else ""))
        self.queue_job(job_id, f"retried by {user}")  # type: ignore[attr-defined]
        return count

    @staticmethod
    def _give_up_refused(conn: Connection, job_id: int, user: str, note: str) -> None:
        """Delete the refusals that keep job ``job_id``'s study from being processed, naming each in its events."""
        main = conn.execute(select(jobs.c.sibling_of, jobs.c.study_instance_uid).where(jobs.c.id == job_id)).one()
        if main.sibling_of is not None:
            raise ActionRefused(f"job {job_id} runs on job {main.sibling_of}'s input: retry job {main.sibling_of} "
                                "without the refused instances")
        if not note.strip():
            raise ActionRefused("a retry without the refused instances needs a note saying why the study may be "
                                "processed without them")
        of_study = refusals.c.study_instance_uid == main.study_instance_uid
        gone = conn.execute(select(refusals.c.sop_instance_uid, refusals.c.reason).where(of_study)
                            .order_by(refusals.c.at)).all()
        conn.execute(delete(refusals).where(of_study))
        if not gone:
            raise ActionRefused(f"job {job_id}'s study has no refused instances: retry it without --without-refused")
        log_event(conn, job_id, "refusals-waived", f"{user} gave up on {len(gone)} refused instance(s) of the study "
                  f"({note.strip()}); processed without: " + "; ".join(f"{sop}: {why}" for sop, why in gone))

    def cancel_job(self, job_id: int, user: str, note: str = "") -> JobState:
        """A job that has not finished ends ``failed`` (cancelled); a running one's process is ended by the
        scheduler (:meth:`cancelled_running`). Returns the state it was cancelled in."""
        with self._db.write() as conn:
            state = self._locked_state(conn, job_id)
            if state in FINAL_STATES:
                raise ActionRefused(f"job {job_id} is {state} already")
            reason = f"{CANCELLED_BY} {user}" + (f": {note}" if note else "")
            transition(conn, job_id, (state,), JobState.FAILED)
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(reason=reason))
            conn.execute(update(deliveries).where(deliveries.c.job_id == job_id, deliveries.c.state == "pending")
                         .values(state="failed", last_error=reason))
            log_event(conn, job_id, "cancelled", reason)
            return state

    def cancelled(self, job_ids: Iterable[int]) -> list[int]:
        """Of these jobs (running in this process), those no longer running in the store (cancelled)."""
        ids = list(job_ids)
        if not ids:
            return []
        with self._db.read() as conn:
            return list(conn.execute(select(jobs.c.id).where(jobs.c.id.in_(ids),
                                                             jobs.c.state != JobState.RUNNING.value)).scalars())

    def study_job(self, study_uid: str) -> int | None:
        """The study's main job still receiving (what ``study complete`` queues), else its latest main job."""
        with self._db.read() as conn:
            rows = conn.execute(select(jobs.c.id, jobs.c.state).where(jobs.c.study_instance_uid == study_uid,
                                                                       jobs.c.sibling_of.is_(None))
                                .order_by(jobs.c.id.desc())).all()
        receiving = [r.id for r in rows if r.state == JobState.RECEIVED.value]
        return receiving[0] if receiving else (rows[0].id if rows else None)

    def mark_reviewed(self, job_id: int, user: str, note: str = "", decision: str = "reviewed",
                      reason: str | None = None) -> int:
        """A person looked at a job's results; it leaves the review worklist. ``reviewed`` (looked at, for a
        flagged job), or a decision on a finished job's results for local performance: ``accepted``,
        ``corrected``, ``rejected`` (with one of :data:`REJECT_REASONS`); never on a forward-only job (no
        results, only the study's images), on superseded results (the newer job's are the ones to review) nor on
        results retention purged (no verified report or rejection note can be made of them any more); a
        job still delivering (or that failed to deliver) an earlier decision's re-issue takes a new one; a
        rejected one takes no further decision (its results are withdrawn for good). Returns the review's id."""
        with self._db.write() as conn:
            return record_review(conn, job_id, user, note, decision, reason)

    def decide(self, job_id: int, user: str, note: str, decision: str, reason: str | None,
               reissue: Callable[[int], ReissuePlan]) -> tuple[int, int | None]:
        """Record a decision on a job's results (as :meth:`mark_reviewed`) and queue its re-issue in one transaction:
        ``reissue(review_id)`` writes the decision's objects and plans their deliveries (it writes nothing to the
        store). A refusal of either (results a re-run superseded since the checks) rolls the decision back with the
        re-issue, so a refused decision leaves no review and no event, and a later one is taken as if it had never
        been tried. A decision repeating the job's latest re-issued one is recorded and re-issues nothing (no
        objects written). Returns the review's id and how many deliveries were queued (None: a repeat)."""
        if decision not in DECISIONS:
            raise ActionRefused(f"{decision!r} is no decision on a job's results: one of {', '.join(DECISIONS)}")
        with self._db.write() as conn:
            review_id = record_review(conn, job_id, user, note, decision, reason)
            earlier, repeated = earlier_reissue(conn, job_id, review_id)
            if repeated:
                log_event(conn, job_id, "reissue", f"{decision} by {user} (review {review_id}): already re-issued "
                                                   f"(review {earlier}), nothing sent again")
                return review_id, None
            plan = reissue(review_id)
            for line in plan.notes:
                log_event(conn, job_id, "reissue", f"{plan.summary}: {line}")
            if plan.deliveries is None:
                return review_id, 0
            return review_id, queue_reissue(self._db, conn, job_id, review_id, plan.summary, plan.deliveries)

    def reviewed_jobs(self, job_ids: Iterable[int]) -> dict[int, tuple[str, float]]:
        """The latest review (reviewer, when) of each of these jobs that has one."""
        ids = list(job_ids)
        if not ids:
            return {}
        with self._db.read() as conn:
            rows = conn.execute(select(reviews.c.job_id, reviews.c.reviewer, reviews.c.at)
                                .where(reviews.c.job_id.in_(ids)).order_by(reviews.c.id)).all()
        return {r.job_id: (r.reviewer, r.at) for r in rows}

    def note_action(self, job_id: int, kind: str, message: str) -> None:
        """An action recorded in the job's log by a part outside the store (e.g. a forced completion)."""
        with self._db.write() as conn:
            log_event(conn, job_id, kind, message)
