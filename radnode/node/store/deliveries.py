"""Deliveries: one row per (job, destination, object), its attempts and retry time; what egress works from.

A destination is named as configured (``egress.destinations``; rows of older releases name it ``dicom:…`` /
``fhir:…`` and still resolve). Each destination has its own queue (``pending_destinations``,
``due_deliveries_to``). A delivery recorded ``done`` (with the SOP Instance UID that went out) is never
attempted again (a restart re-sends nothing delivered) unless an operator re-sends it (``resend``, recorded
with who and why: the API's, CLI's and dashboard's re-send all come here through ``Egress.resend``); one that fails backs off exponentially and gives up after its attempts. Two egress
workers racing for one delivery: the row's state guards the update, so one attempt is counted once.
"""

from __future__ import annotations

import time

from sqlalchemy import Connection, func, select, update

from radnode.node.store.database import Database
from radnode.node.store.events import log_event
from radnode.node.store.jobs import transition
from radnode.node.store.records import (
    DELIVERY_FIELDS, ActionRefused, Delivery, JobState, ShadowNotDelivered, delivery_from_row,
)
from radnode.node.store.results import superseded_by
from radnode.node.store.schema import deliveries as delivery_table
from radnode.node.store.schema import jobs, reviews
from radnode.outputs.layout import REVIEW_FOLDER, review_of

_DELIVERY_COLUMNS = tuple(delivery_table.c[name] for name in DELIVERY_FIELDS)


def earlier_reissue(conn: Connection, job_id: int, review_id: int) -> tuple[int | None, bool]:
    """The latest review of the job, other than ``review_id``, whose re-issue was queued, and whether
    ``review_id`` repeats it (same decision by the same reviewer, or an older review than it)."""
    planned = [review_of(o) for o in conn.execute(select(delivery_table.c.object).where(
        delivery_table.c.job_id == job_id, delivery_table.c.object.like(f"{REVIEW_FOLDER}%"))).scalars()]
    earlier = max((r for r in planned if r is not None and r != review_id), default=None)
    if earlier is None:
        return None, False
    decided = {row.id: (row.decision, row.reviewer) for row in conn.execute(
        select(reviews.c.id, reviews.c.decision, reviews.c.reviewer).where(reviews.c.id.in_((earlier, review_id))))}
    return earlier, earlier > review_id or decided.get(earlier) == decided.get(review_id)


def queue_reissue(db: Database, conn: Connection, job_id: int, review_id: int, summary: str,
                  deliveries: list[tuple[str, str]]) -> int:
    """Queue a review decision's re-issue (``review-<id>/…`` objects) in the caller's transaction (the one that
    recorded the decision, the job's row locked): the job goes back to ``delivering`` and an earlier decision's
    re-issue still pending is superseded (the newer decision goes out instead); returns how many deliveries were
    queued. ActionRefused when a re-run superseded the job's results since the decision's checks (they were
    withdrawn): the caller's transaction, the decision with it, is rolled back."""
    newer = superseded_by(conn, job_id)
    if newer is not None:
        raise ActionRefused(f"job {job_id}'s results were superseded by job {newer}'s (withdrawn where they "
                            f"went) since the decision: review job {newer} instead")
    conn.execute(update(delivery_table).where(
        delivery_table.c.job_id == job_id, delivery_table.c.state == "pending",
        delivery_table.c.object.like(f"{REVIEW_FOLDER}%"))
        .values(state="superseded", last_error=f"superseded by review {review_id}"))
    if not deliveries:
        log_event(conn, job_id, "reissue", f"{summary}: nothing to re-issue (no destination received "
                                           "the report or results)")
        return 0
    now = time.time()
    count = conn.execute(db.insert_ignoring_conflicts(delivery_table),
                         [{"job_id": job_id, "destination": d, "object": o, "next_attempt_at": now}
                          for d, o in deliveries]).rowcount
    transition(conn, job_id, (JobState.DONE, JobState.DELIVERING, JobState.FAILED), JobState.DELIVERING)
    conn.execute(update(jobs).where(jobs.c.id == job_id).values(reason=None))
    log_event(conn, job_id, "reissue", f"{summary}: {len(deliveries)} deliver"
                                       f"{'y' if len(deliveries) == 1 else 'ies'} queued")
    return count


class Deliveries:
    """The egress side of the store."""

    _db: Database

    def begin_delivery(self, job_id: int, summary: str, deliveries: list[tuple[str, str]]) -> bool:
        """``running → delivering`` with its (destination, object) deliveries; straight to ``done`` if none.
        ShadowNotDelivered for a shadow run's job, whatever it asks: its results never leave the node. False, and
        nothing delivered, when the job is not running or late instances asked for its restart meanwhile (its
        input has grown since the run: the scheduler restarts it)."""
        now = time.time()
        with self._db.write() as conn:
            job = conn.execute(select(jobs.c.shadow, jobs.c.restart_requested).where(jobs.c.id == job_id)
                               .with_for_update()).first()
            if job is not None and job.shadow:
                raise ShadowNotDelivered(f"job {job_id} is a shadow run: its results are compared, never delivered")
            if job is not None and job.restart_requested:
                log_event(conn, job_id, "late", "run finished, but late instances arrived during it: not delivered, "
                                                "it runs again", now)
                return False
            target = JobState.DELIVERING if deliveries else JobState.DONE
            if not transition(conn, job_id, (JobState.RUNNING,), target):
                return False
            log_event(conn, job_id, "finished", summary)
            if deliveries:
                conn.execute(self._db.insert_ignoring_conflicts(delivery_table),
                             [{"job_id": job_id, "destination": d, "object": o, "next_attempt_at": now}
                              for d, o in deliveries])
            else:
                log_event(conn, job_id, "done", "nothing to deliver beyond the outbox")
            return True

    def due_deliveries(self, now: float | None = None) -> list[Delivery]:
        """Pending deliveries whose next attempt is due, of jobs that are delivering."""
        query = (select(*_DELIVERY_COLUMNS).join(jobs, jobs.c.id == delivery_table.c.job_id)
                 .where(jobs.c.state == JobState.DELIVERING.value, delivery_table.c.state == "pending",
                        delivery_table.c.next_attempt_at <= (time.time() if now is None else now))
                 .order_by(delivery_table.c.job_id, delivery_table.c.destination, delivery_table.c.id))
        with self._db.read() as conn:
            return [delivery_from_row(row._mapping) for row in conn.execute(query)]

    def pending_destinations(self) -> list[str]:
        """Destinations with pending deliveries of delivering jobs (each has its queue and worker)."""
        query = (select(delivery_table.c.destination).distinct()
                 .join(jobs, jobs.c.id == delivery_table.c.job_id)
                 .where(delivery_table.c.state == "pending", jobs.c.state == JobState.DELIVERING.value)
                 .order_by(delivery_table.c.destination))
        with self._db.read() as conn:
            return list(conn.execute(query).scalars())

    def due_deliveries_to(self, destination: str, now: float | None = None) -> list[Delivery]:
        """One destination's pending deliveries whose next attempt is due, of delivering jobs, oldest job first."""
        query = (select(*_DELIVERY_COLUMNS).join(jobs, jobs.c.id == delivery_table.c.job_id)
                 .where(jobs.c.state == JobState.DELIVERING.value, delivery_table.c.state == "pending",
                        delivery_table.c.destination == destination,
                        delivery_table.c.next_attempt_at <= (time.time() if now is None else now))
                 .order_by(delivery_table.c.job_id, delivery_table.c.id))
        with self._db.read() as conn:
            return [delivery_from_row(row._mapping) for row in conn.execute(query)]

    def deliveries(self, job_id: int) -> list[Delivery]:
        """Every delivery of a job."""
        query = (select(*_DELIVERY_COLUMNS).where(delivery_table.c.job_id == job_id)
                 .order_by(delivery_table.c.destination, delivery_table.c.object))
        with self._db.read() as conn:
            return [delivery_from_row(row._mapping) for row in conn.execute(query)]

    def report_already_sent(self, job_id: int, report_file: str) -> bool:
        """Whether a report (``report_file``, the run's FHIR Bundle) of this job's study and pipeline was already
        delivered somewhere, by this job or an earlier one (a re-run of the study): the next run re-issues it."""
        with self._db.read() as conn:
            this = conn.execute(select(jobs.c.study_instance_uid, jobs.c.pipeline).where(jobs.c.id == job_id)).first()
            if this is None:
                return False
            sent = conn.execute(
                select(func.count()).select_from(delivery_table.join(jobs, jobs.c.id == delivery_table.c.job_id))
                .where(jobs.c.study_instance_uid == this.study_instance_uid, jobs.c.pipeline == this.pipeline,
                       delivery_table.c.object == report_file, delivery_table.c.state == "done")).scalar()
            return bool(sent)

    def forwarded_earlier(self, job_id: int, destination: str) -> dict[str, int]:
        """SOP Instance UID → the earlier job of the same study that delivered it to ``destination`` (done): what a
        re-forward of the study after late instances must not send there again."""
        earlier = jobs.alias("earlier")
        this = jobs.alias("this")
        query = (select(delivery_table.c.sent_uid, delivery_table.c.job_id)
                 .join(earlier, earlier.c.id == delivery_table.c.job_id)
                 .join(this, this.c.study_instance_uid == earlier.c.study_instance_uid)
                 .where(this.c.id == job_id, earlier.c.id < job_id, delivery_table.c.destination == destination,
                        delivery_table.c.state == "done", delivery_table.c.sent_uid.is_not(None)))
        with self._db.read() as conn:
            return {uid: job for uid, job in conn.execute(query)}

    def delivery_done(self, delivery_id: int, message: str, sent_uid: str | None = None) -> None:
        """Record a delivery as done (with the SOP Instance UID that went out): it will never be attempted again."""
        with self._db.write() as conn:
            job_id = conn.execute(
                update(delivery_table).where(delivery_table.c.id == delivery_id, delivery_table.c.state == "pending")
                .values(state="done", attempts=delivery_table.c.attempts + 1, done_at=time.time(), last_error=None,
                        sent_uid=sent_uid)
                .returning(delivery_table.c.job_id)).scalar()
            if job_id is not None:
                log_event(conn, job_id, "delivered", message)

    def delivery_failed(self, delivery_id: int, error: str, max_attempts: int, backoff: tuple[float, float]) -> None:
        """Count a failed attempt: retry after exponential back-off, or give up after ``max_attempts``."""
        initial, ceiling = backoff
        with self._db.write() as conn:
            row = conn.execute(select(delivery_table.c.job_id, delivery_table.c.attempts, delivery_table.c.destination,
                                      delivery_table.c.object)
                               .where(delivery_table.c.id == delivery_id, delivery_table.c.state == "pending")
                               .with_for_update()).first()
            if row is None:
                return
            attempts = row.attempts + 1
            exhausted = attempts >= max_attempts
            delay = min(initial * 2 ** (attempts - 1), ceiling)
            conn.execute(update(delivery_table).where(delivery_table.c.id == delivery_id).values(
                attempts=attempts, last_error=error, next_attempt_at=time.time() + delay,
                state="failed" if exhausted else "pending"))
            retry = "giving up" if exhausted else f"retry in {delay:g} s"
            log_event(conn, row.job_id, "delivery-error",
                      f"{row.object} → {row.destination}: attempt {attempts}: {error}; {retry}")

    def settle_job(self, job_id: int) -> JobState | None:
        """``delivering → done`` when every delivery is done, ``→ failed`` when the rest gave up."""
        with self._db.write() as conn:
            conn.execute(select(jobs.c.id).where(jobs.c.id == job_id).with_for_update())
            counts = dict(conn.execute(select(delivery_table.c.state, func.count()).where(delivery_table.c.job_id == job_id)
                                       .group_by(delivery_table.c.state)).all())
            if counts.get("pending"):
                return None
            if not counts.get("failed"):
                if transition(conn, job_id, (JobState.DELIVERING,), JobState.DONE):
                    log_event(conn, job_id, "done", f"{counts.get('done', 0)} deliveries done")
                    return JobState.DONE
                return None
            failed = conn.execute(select(delivery_table.c.destination, delivery_table.c.object, delivery_table.c.attempts,
                                         delivery_table.c.last_error)
                                  .where(delivery_table.c.job_id == job_id, delivery_table.c.state == "failed")
                                  .order_by(delivery_table.c.id).limit(1)).one()
            reason = (f"delivery of {failed.object} to {failed.destination} failed after {failed.attempts} attempts: "
                      f"{failed.last_error} ({counts['failed']} undelivered; results remain in the outbox)")
            if transition(conn, job_id, (JobState.DELIVERING,), JobState.FAILED):
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(reason=reason))
                log_event(conn, job_id, "failed", reason)
                return JobState.FAILED
            return None

    def resend(self, job_id: int, destination: str | None = None, *, user: str, reason: str,
               failed_only: bool = False) -> int:
        """Put a job's delivered or failed deliveries (to one destination, or all; with ``failed_only`` only those
        that gave up, e.g. after an outage) back in the queue, the job back to ``delivering``; recorded with who
        and why. Returns how many; LookupError for an unknown job, ActionRefused saying why none could be."""
        now = time.time()
        with self._db.write() as conn:
            job = conn.execute(select(jobs.c.state, jobs.c.purged_at, jobs.c.purge_started_at, jobs.c.shadow)
                               .where(jobs.c.id == job_id).with_for_update()).first()
            if job is None:
                raise LookupError(f"job {job_id} does not exist")
            if job.shadow:
                raise ActionRefused(f"job {job_id} is a shadow run: its results are compared, never delivered")
            if job.purged_at is not None or job.purge_started_at is not None:
                raise ActionRefused(f"job {job_id}'s results were purged by retention; nothing left to re-send")
            resendable = (JobState.DONE, JobState.FAILED, JobState.DELIVERING)
            if job.state not in resendable:
                raise ActionRefused(f"job {job_id} is {job.state}: only a job that delivered (or tried to) can re-send")
            newer = superseded_by(conn, job_id)
            if newer is not None:
                raise ActionRefused(f"job {job_id}'s results were superseded by job {newer}'s (withdrawn where they "
                                    f"went): re-send job {newer} instead")
            of_job = [delivery_table.c.job_id == job_id]
            if destination is not None:
                of_job.append(delivery_table.c.destination == destination)
            again = (delivery_table.c.state == "failed" if failed_only
                     else delivery_table.c.state.in_(("done", "failed")))  # never a superseded one
            count = conn.execute(update(delivery_table).where(*of_job, again)
                                 .values(state="pending", attempts=0, next_attempt_at=now, last_error=None,
                                         done_at=None)).rowcount
            to = f" to {destination}" if destination is not None else ""
            which = "undelivered " if failed_only else ""
            if count == 0:
                pending = conn.execute(select(func.count()).select_from(delivery_table)
                                       .where(*of_job, delivery_table.c.state == "pending")).scalar()
                raise ActionRefused(f"job {job_id}'s deliveries{to} are still pending" if pending
                                    else f"job {job_id} has no {which}deliveries{to} to re-send")
            transition(conn, job_id, resendable, JobState.DELIVERING)
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(reason=None))
            log_event(conn, job_id, "resend", f"{user} re-sent {count} {which}deliver{'y' if count == 1 else 'ies'} "
                      f"to {destination if destination is not None else 'every destination'}: "
                      f"{reason or 'no reason given'}")
            return count
