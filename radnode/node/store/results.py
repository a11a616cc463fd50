"""Result versions: each job that stages results is a version of its study's results, per pipeline.

A study re-run on the whole study (instances arrived after its results went out, ``late_instances: rerun``)
makes version 2, 3, …; the new version supersedes the one before it. :meth:`Results.supersede` records that
in one transaction with the events on both jobs, stops the superseded job's deliveries still pending (its
results are out of date) and answers what the superseded job's DICOM deliveries sent where, so egress can
withdraw exactly those with an IOCM rejection note. Calling it again for the same job answers the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from sqlalchemy import Connection, exists, func, insert, select, update

from radnode.node.store.database import Database
from radnode.node.store.events import log_event
from radnode.node.store.jobs import lock_study
from radnode.node.store.records import ResultsOutOfDate
from radnode.node.store.schema import deliveries, jobs, result_versions
from radnode.outputs.layout import is_dicom


@dataclass(frozen=True)
class Supersession:
    """This job's results replace job ``superseded``'s (this job is version ``version`` of the study's results)."""

    superseded: int
    version: int
    sent: dict[str, list[str]] = field(default_factory=dict)
    """Destination → the superseded job's DICOM outbox files it received (or was being sent when superseded):
    what the rejection note must withdraw there."""


class Results:
    """The result-versions side of the store."""

    _db: Database

    def supersede(self, job_id: int, rejection_file: str) -> Supersession | None:
        """Record job ``job_id``'s results as the study's newest version of its pipeline; None when it is the
        first (or a forward-only job). ``rejection_file`` is the rejection note's file name: no note, in whatever
        folder (a reviewer's ``review-<id>/``), is itself withdrawn.
        ResultsOutOfDate when a later job of the study's pipeline (made from more of the study) has a version
        already: this one finished after it, and its results must not replace the newer ones. A job of late
        instances alone (``late_instances: new-job``) is no version: its results stand beside the study's."""
        now = time.time()
        with self._db.write() as conn:
            job = conn.execute(select(jobs.c.study_instance_uid, jobs.c.pipeline).where(jobs.c.id == job_id)).first()
            if job is None or not job.pipeline or _of_late_instances_alone(conn, job_id):
                return None
            lock_study(self._db, conn, job.study_instance_uid, now)
            mine = conn.execute(select(result_versions.c.version).where(result_versions.c.job_id == job_id)).scalar()
            of_study = (result_versions.c.study_instance_uid == job.study_instance_uid,
                        result_versions.c.pipeline == job.pipeline)
            if mine is None:
                newer = conn.execute(select(result_versions.c.job_id).where(
                    *of_study, result_versions.c.job_id > job_id).order_by(result_versions.c.job_id.desc())).scalar()
                if newer is not None:
                    raise ResultsOutOfDate(f"job {newer}, made later from more of the study, delivered its "
                                           f"{job.pipeline} results first; these are out of date")
                latest = conn.execute(select(result_versions.c.job_id, result_versions.c.version,
                                             result_versions.c.superseded_by).where(*of_study)
                                      .order_by(result_versions.c.version.desc()).limit(1)).first()
                mine = latest.version + 1 if latest else 1
                conn.execute(insert(result_versions).values(job_id=job_id, study_instance_uid=job.study_instance_uid,
                                                            pipeline=job.pipeline, version=mine, created_at=now))
                if latest is None:
                    return None
                self._mark_superseded(conn, latest.job_id, job_id, mine, job.pipeline, rejection_file, now)
            previous = conn.execute(select(result_versions.c.job_id).where(
                *of_study, result_versions.c.superseded_by == job_id)).scalar()
            if previous is None:
                return None
            sent: dict[str, list[str]] = {}
            for destination, obj in conn.execute(
                    select(deliveries.c.destination, deliveries.c.object)
                    .where(deliveries.c.job_id == previous,
                           ((deliveries.c.state == "done") & deliveries.c.sent_uid.is_not(None))
                           | (deliveries.c.state == "superseded"))
                    .order_by(deliveries.c.destination, deliveries.c.object)):
                # a FHIR Bundle or a re-issue has no SOP Instance to reject; a rejection note (its own, or a
                # reviewer's in review-<id>/) withdraws, it is never withdrawn
                if is_dicom(obj) and PurePosixPath(obj).name != rejection_file:
                    sent.setdefault(destination, []).append(obj)
            return Supersession(previous, mine, sent)

    @staticmethod
    def _mark_superseded(conn: Connection, previous: int, job_id: int, version: int, pipeline: str,
                         rejection_file: str, now: float) -> None:
        """Mark ``previous`` superseded by ``job_id``: its pending deliveries stop, both logs say so."""
        conn.execute(update(result_versions).where(result_versions.c.job_id == previous)
                     .values(superseded_by=job_id, superseded_at=now))
        stopped = conn.execute(update(deliveries)
                               .where(deliveries.c.job_id == previous, deliveries.c.state == "pending")
                               .values(state="superseded", last_error=f"superseded by job {job_id}")).rowcount
        log_event(conn, previous, "superseded",
                  f"{pipeline} results superseded by job {job_id} (version {version} of the study's results, run on "
                  f"the whole study); its DICOM results are withdrawn where they went by an IOCM rejection note "
                  f"({rejection_file})" + (f"; {stopped} pending deliveries stopped" if stopped else ""), now)
        log_event(conn, job_id, "supersedes",
                  f"version {version} of the study's {pipeline} results: replaces job {previous}'s", now)


def _of_late_instances_alone(conn: Connection, job_id: int) -> bool:
    """Whether the job (or the main job of a sibling) processes only instances that came after an earlier job of
    its study (``late_instances: new-job``), not the whole study."""
    main_id = conn.execute(select(func.coalesce(jobs.c.sibling_of, jobs.c.id)).where(jobs.c.id == job_id)).scalar()
    main = conn.execute(select(jobs.c.study_instance_uid, jobs.c.whole_study).where(jobs.c.id == main_id)).first()
    if main is None or main.whole_study:
        return False
    return bool(conn.execute(select(exists().where(jobs.c.study_instance_uid == main.study_instance_uid,
                                                   jobs.c.sibling_of.is_(None), jobs.c.id < main_id))).scalar())


def superseded_by(conn: Connection, job_id: int) -> int | None:
    """The job whose results superseded job ``job_id``'s (withdrawn where they went), or None."""
    return conn.execute(select(result_versions.c.superseded_by).where(result_versions.c.job_id == job_id)).scalar()
