"""The job store on a real SQLite file and a real PostgreSQL database: transitions, late and duplicate instances,
retries, reopening, schema revisions, and two writers at once."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import UniqueConstraint, insert, inspect, select

from factories import RELEASE_0_1_INDEXES, RELEASE_0_1_SCHEMA, open_store_made_by
from radnode.cli import main
from radnode.console.accounts import Accounts, Role
from radnode.node.store import Arrival, Instance, JobState, JobStore, StoreError, head_revision, upgrade_store
from radnode.node.store.database import alembic_config, connect
from radnode.node.store import schema
from radnode.node.store.schema import deliveries, jobs, metadata
from radnode.peers import free_port
from radnode.pipelines.routing import Completeness, Execution, ExecutionMode, LateInstances, Priority, SeriesDecision
from radnode.security.privacy import IdentitySeal, SiteKey


def to(*pipelines: str) -> SeriesDecision:
    """The decision sending a series to ``pipelines`` (late instances ignored, the node's default)."""
    return SeriesDecision(pipelines, completeness=Completeness(late_instances=LateInstances.IGNORE))


def instance(sop: str, study: str = "1.2.3", received_at: float | None = None) -> Instance:
    return Instance(sop_instance_uid=sop, study_instance_uid=study, series_instance_uid=f"{study}.1",
                    patient_id="P1", modality="CT", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    path=f"/spool/{sop}.dcm", calling_ae="SCANNER", peer_address="127.0.0.1:4000",
                    association_id="a1", received_at=time.time() if received_at is None else received_at)


@pytest.fixture
def store(store_target: Path | str) -> Iterator[JobStore]:
    """A fresh job store: on SQLite, and again on PostgreSQL (``store_target`` is parametrized)."""
    store = JobStore(store_target)
    yield store
    store.close()


def test_a_study_becomes_a_job_queued_only_after_it_went_idle(store: JobStore) -> None:
    now = time.time()
    assert store.record_instance(instance("1.1", received_at=now - 10), to("ct_tissue"))[0] is Arrival.NEW
    arrival, job_id = store.record_instance(instance("1.2", received_at=now - 1), to("ct_tissue"))
    assert arrival is Arrival.NEW
    assert store.queue_complete_studies(idle_seconds=3, now=now) == []
    assert store.queue_complete_studies(idle_seconds=3, now=now + 2) == [job_id]
    job = store.job(job_id)
    assert job is not None and job.state is JobState.QUEUED and job.instances == 2
    assert "2 instances in 1 series (CT) from SCANNER (127.0.0.1:4000)" in store.events(job_id)[-1].message


def test_late_and_duplicate_instances_are_recorded_not_lost(store: JobStore) -> None:
    _, job_id = store.record_instance(instance("1.1", received_at=0), to("ct_tissue"))
    store.queue_complete_studies(idle_seconds=1)
    assert store.start_job(job_id, "run")
    assert store.record_instance(instance("1.2"), to("ct_tissue")) == (Arrival.LATE, job_id)
    assert store.record_instance(instance("1.1"), to("ct_tissue")) == (Arrival.DUPLICATE, job_id)
    assert [i.sop_instance_uid for i in store.job_inputs(job_id)] == ["1.1"]
    assert {i.sop_instance_uid for i in store.instances(job_id)} == {"1.1", "1.2"}
    job = store.job(job_id)
    assert job is not None and (job.instances, job.late_instances) == (1, 1)
    kinds = [e.kind for e in store.events(job_id)]
    assert kinds == ["received", "queued", "running", "late", "duplicate"]


def test_transitions_are_guarded_and_safe_to_repeat(store: JobStore) -> None:
    _, job_id = store.record_instance(instance("1.1", received_at=0), to("ct_tissue"))
    assert not store.start_job(job_id, "run")  # not queued yet
    store.queue_complete_studies(idle_seconds=1)
    assert store.start_job(job_id, "run")
    assert not store.start_job(job_id, "run")
    assert store.begin_delivery(job_id, "1 output", [("dicom:PACS@h:104", "seg.dcm")])
    assert not store.begin_delivery(job_id, "1 output", [("dicom:PACS@h:104", "seg.dcm")])
    assert len(store.deliveries(job_id)) == 1
    assert store.fail_job(job_id, "broken")
    assert not store.fail_job(job_id, "broken again")
    job = store.job(job_id)
    assert job is not None and job.state is JobState.FAILED and job.reason == "broken"


def _delivering_job(store: JobStore, plan: list[tuple[str, str]]) -> int:
    _, job_id = store.record_instance(instance("1.1", received_at=0), to("ct_tissue"))
    store.queue_complete_studies(idle_seconds=1)
    store.start_job(job_id, "run")
    store.begin_delivery(job_id, "outputs", plan)
    return job_id


def test_failed_delivery_backs_off_exponentially_then_gives_up(store: JobStore) -> None:
    job_id = _delivering_job(store, [("dicom:PACS@h:104", "seg.dcm"), ("fhir:http://f", "fhir-bundle.json")])
    seg, fhir = store.deliveries(job_id)  # ordered by destination
    assert (fhir.object, seg.object) == ("fhir-bundle.json", "seg.dcm")
    store.delivery_done(fhir.id, "posted")
    delays = []
    for attempt in range(1, 4):
        before = time.time()
        store.delivery_failed(seg.id, "connection refused", max_attempts=3, backoff=(1.0, 3.0))
        (current,) = [d for d in store.deliveries(job_id) if d.id == seg.id]
        delays.append(round(current.next_attempt_at - before))
        assert current.attempts == attempt and current.last_error == "connection refused"
        if attempt < 3:
            assert store.settle_job(job_id) is None
    assert delays[:2] == [1, 2]
    assert store.settle_job(job_id) is JobState.FAILED
    job = store.job(job_id)
    assert job is not None and "seg.dcm to dicom:PACS@h:104 failed after 3 attempts: connection refused" in job.reason


def test_done_deliveries_are_never_due_again_and_the_job_completes(store: JobStore) -> None:
    job_id = _delivering_job(store, [("dicom:PACS@h:104", "a.dcm"), ("dicom:PACS@h:104", "b.dcm")])
    first, second = store.deliveries(job_id)
    store.delivery_done(first.id, "sent")
    store.delivery_done(first.id, "sent again")  # a repeat changes nothing
    assert [d.object for d in store.due_deliveries()] == ["b.dcm"]
    assert store.settle_job(job_id) is None
    store.delivery_done(second.id, "sent")
    assert store.due_deliveries() == []
    assert store.settle_job(job_id) is JobState.DONE
    assert [e.kind for e in store.events(job_id)].count("delivered") == 2



def test_each_destination_has_its_queue_and_a_resend_requeues_what_went_out_with_who_and_why(store: JobStore) -> None:
    job_id = _delivering_job(store, [("pacs", "a.dcm"), ("pacs", "b.dcm"), ("ehr", "fhir-bundle.json")])
    assert store.pending_destinations() == ["ehr", "pacs"]
    assert [d.object for d in store.due_deliveries_to("pacs")] == ["a.dcm", "b.dcm"]
    bundle, a, b = store.deliveries(job_id)  # ordered by destination, then object
    store.delivery_done(a.id, "sent", sent_uid="1.2.9.1")
    store.delivery_done(b.id, "sent", sent_uid="1.2.9.2")
    with pytest.raises(ValueError, match=f"job {job_id}'s deliveries to ehr are still pending"):
        store.resend(job_id, "ehr", user="alice", reason="too early")
    store.delivery_done(bundle.id, "posted")
    assert store.settle_job(job_id) is JobState.DONE and store.pending_destinations() == []
    assert store.resend(job_id, "pacs", user="alice", reason="PACS lost them") == 2
    job = store.job(job_id)
    assert job is not None and job.state is JobState.DELIVERING
    assert store.events(job_id)[-1].message == "alice re-sent 2 deliveries to pacs: PACS lost them"
    assert [(d.destination, d.state, d.sent_uid) for d in store.due_deliveries_to("pacs")] == [
        ("pacs", "pending", "1.2.9.1"), ("pacs", "pending", "1.2.9.2")]  # the UIDs that went out, kept to compare
    with pytest.raises(ValueError, match=f"job {job_id} has no deliveries to ARCHIVE to re-send"):
        store.resend(job_id, "ARCHIVE", user="alice", reason="wrong name")
    with pytest.raises(LookupError, match=f"job {job_id + 1} does not exist"):
        store.resend(job_id + 1, user="alice", reason="typo")
    for delivery in store.due_deliveries_to("pacs"):
        store.delivery_done(delivery.id, "sent again", sent_uid=delivery.sent_uid)
    assert store.settle_job(job_id) is JobState.DONE
    assert store.begin_purge(job_id, time.time() + 1, time.time() + 1) is not None
    with pytest.raises(ValueError, match=f"job {job_id}'s results were purged by retention; nothing left to re-send"):
        store.resend(job_id, user="bob", reason="PACS lost them again")


def test_state_survives_reopening_and_running_jobs_can_be_requeued(store_target: Path | str) -> None:
    store = JobStore(store_target)
    _, job_id = store.record_instance(instance("1.1", received_at=0), to("ct_tissue"))
    store.queue_complete_studies(idle_seconds=1)
    store.start_job(job_id, "run")
    store.close()
    reopened = JobStore(store_target)
    assert reopened.running_jobs() == [job_id]
    assert reopened.requeue(job_id, "restarted")
    assert not reopened.requeue(job_id, "restarted")
    job = reopened.next_queued()
    assert job is not None and job.id == job_id and job.runs == 1
    reopened.close()


def test_patient_ids_are_sealed_at_rest_and_those_stored_in_clear_are_sealed_by_the_node(
        store_target: Path | str) -> None:
    """With the site key's seal, the store's columns hold no Patient ID; identifiers an older store holds in clear
    (as the 0004 revision leaves them) read as they are and are sealed once; without the seal a tool sees the
    sealed text."""
    seal = IdentitySeal(SiteKey(b"k" * 32))
    # "^" and " " are outside the seal's base64 alphabet: the ID cannot turn up in a token by chance ("P1" did)
    patient = "DOE^J 0001"
    unsealed = JobStore(store_target)  # what a store written before sealing holds
    _, first = unsealed.record_instance(replace(instance("1.1", study="1.2.3"), patient_id=patient), to("ct_tissue"))
    unsealed.close()
    store = JobStore(store_target, seal=seal)
    assert store.job(first).patient_id == patient
    assert store.seal_stored() == 2 and store.seal_stored() == 0  # the job's and its instance's, once
    _, second = store.record_instance(replace(instance("2.1", study="2.2.3"), patient_id=patient), to("ct_tissue"))
    assert [j.patient_id for j in store.jobs()] == [patient, patient]
    assert {i.patient_id for i in store.instances(first) + store.instances(second)} == {patient}
    store.close()
    database = connect(store_target)
    with database.read() as conn:
        stored = [*conn.execute(select(schema.jobs.c.sealed_patient_id)).scalars(),
                  *conn.execute(select(schema.instances.c.sealed_patient_id)).scalars()]
    database.close()
    assert len(stored) == 4 and all(v.startswith("sealed:") and patient not in v for v in stored)
    without_key = JobStore(store_target)
    assert without_key.job(second).patient_id.startswith("sealed:")
    without_key.close()


def test_a_studys_instances_share_one_sealed_patient_id_and_no_two_studies_do(store_target: Path | str) -> None:
    """The seal encrypts a patient's identifier once per study (its instances are linked by the study anyway):
    two studies of the same patient still get different sealed values, so the store does not link them."""
    patient = "DOE^J 0001"
    store = JobStore(store_target, seal=IdentitySeal(SiteKey(b"k" * 32)))
    for sop, study in (("1.1", "1.2.3"), ("1.2", "1.2.3"), ("1.3", "1.2.3"), ("2.1", "2.2.3"), ("2.2", "2.2.3")):
        store.record_instance(replace(instance(sop, study=study), patient_id=patient), to("ct_tissue"))
    store.close()
    database = connect(store_target)
    with database.read() as conn:
        rows = conn.execute(select(schema.instances.c.study_instance_uid, schema.instances.c.sealed_patient_id)).all()
    database.close()
    by_study: dict[str, set[str]] = {}
    for study, sealed in rows:
        by_study.setdefault(study, set()).add(sealed)
    assert {study: len(values) for study, values in by_study.items()} == {"1.2.3": 1, "2.2.3": 1}
    assert by_study["1.2.3"] != by_study["2.2.3"]
    assert all(v.startswith("sealed:") and patient not in v for values in by_study.values() for v in values)


def test_review_state_is_recorded_filterable_and_cleared_by_a_new_run(store: JobStore) -> None:
    jobs = []
    for study in ("1.2.3", "1.2.4", "1.2.5"):
        _, job_id = store.record_instance(instance(f"{study}.1", study=study, received_at=0), to("tiny_model"))
        jobs.append(job_id)
    flagged, clear, unassessed = jobs
    store.queue_complete_studies(idle_seconds=1)
    assert not store.record_review(flagged, True, ["lesion: mean uncertainty 0.471 > 0.2"])  # not running
    for job_id in jobs:
        store.start_job(job_id, "run")
    assert store.record_review(flagged, True, ["lesion: mean uncertainty 0.471 > 0.2"])
    assert store.record_review(clear, False, [])
    for job_id in jobs:
        store.begin_delivery(job_id, "outputs", [])
    job = store.job(flagged)
    assert job is not None and job.state is JobState.DONE
    assert job.needs_review is True and job.review_reasons == ("lesion: mean uncertainty 0.471 > 0.2",)
    assert (store.job(clear).needs_review, store.job(unassessed).needs_review) == (False, None)  # type: ignore[union-attr]
    assert [j.id for j in store.jobs(needs_review=True)] == [flagged]
    assert [j.id for j in store.jobs(needs_review=False)] == [clear]
    assert [j.id for j in store.jobs(JobState.DONE, needs_review=True)] == [flagged]
    assert store.jobs(JobState.FAILED, needs_review=True) == []
    review = [e.message for e in store.events(flagged) if e.kind == "review"]
    assert review == ["flagged for human review: lesion: mean uncertainty 0.471 > 0.2"]
    # A job that runs again (here: the node stopped before it was staged) decides afresh.
    _, again = store.record_instance(instance("1.2.6.1", study="1.2.6", received_at=0), to("tiny_model"))
    store.queue_complete_studies(idle_seconds=1)
    store.start_job(again, "run")
    store.record_review(again, True, ["lesion: sample agreement 0.5 < 0.9"])
    assert store.requeue(again, "node stopped") and store.start_job(again, "run again")
    job = store.job(again)
    assert job is not None and job.needs_review is None and job.review_reasons == ()


def test_a_store_from_before_review_states_gets_them_on_open(tmp_path: Path) -> None:
    old_schema = RELEASE_0_1_SCHEMA.replace(",\n    needs_review INTEGER,\n    review_reasons TEXT NOT NULL DEFAULT ''", "")
    assert "needs_review" not in old_schema
    store = open_store_made_by(old_schema, tmp_path / "radnode.db")
    (job,) = store.jobs()
    assert job.needs_review is None and job.review_reasons == ()
    store.close()



def test_job_counts_agree_with_the_job_list(store: JobStore) -> None:
    """The health probe's SQL counts equal counting the listed jobs, flagged ones included."""
    jobs = [store.record_instance(instance(f"1.2.{n}.1", study=f"1.2.{n}", received_at=0), to("tiny_model"))[1]
            for n in range(3)]
    store.queue_complete_studies(idle_seconds=1)
    store.start_job(jobs[0], "run")
    store.record_review(jobs[0], True, ["lesion: mean uncertainty 0.471 > 0.2"])
    counts, flagged = store.job_counts()
    assert counts == {state.value: sum(j.state is state for j in store.jobs()) for state in JobState}
    assert counts["running"] == 1 and sum(counts.values()) == 3
    assert flagged == len(store.jobs(needs_review=True)) == 1


def test_every_selected_pipeline_runs_as_its_own_job_with_the_main_jobs_input(store: JobStore) -> None:
    rerun = Completeness(late_instances=LateInstances.RERUN)
    ct = SeriesDecision(("ct_tissue", "lung"), forwards=("ARCHIVE",), completeness=rerun,
                        execution=Execution(ExecutionMode.SUBPROCESS, 60))
    chest = SeriesDecision(("lung", "nodules"), priority=Priority.STAT, completeness=rerun,
                           execution=Execution(None, 300))
    _, main = store.record_instance(instance("1.1", received_at=0), ct)
    store.record_instance(replace(instance("1.2", received_at=1), series_instance_uid="1.2.3.2"), chest)
    assert store.queue_job(main, "idle") is JobState.QUEUED
    jobs = store.jobs()
    assert [(j.id, j.pipeline, j.state, j.sibling_of) for j in jobs] == [
        (main, "ct_tissue", JobState.QUEUED, None), (main + 1, "lung", JobState.QUEUED, main),
        (main + 2, "nodules", JobState.QUEUED, main)]
    first, lung, nodules = jobs
    assert first.forwards == ("ARCHIVE",) and lung.forwards == nodules.forwards == ()
    assert {j.priority for j in jobs} == {Priority.STAT}
    assert first.execution == Execution(ExecutionMode.SUBPROCESS, 60)
    assert lung.execution == Execution(ExecutionMode.SUBPROCESS, 300) and nodules.execution == Execution(None, 300)
    inputs = [i.sop_instance_uid for i in store.job_inputs(main)]
    assert inputs == ["1.1", "1.2"] and all([i.sop_instance_uid for i in store.job_inputs(j.id)] == inputs
                                            for j in (lung, nodules))
    assert lung.instances == 2 and store.instances(lung.id) == []
    route = store.events(main)[-1]
    assert route.kind == "route" and route.message == (f"rules select ct_tissue, lung, nodules; this job runs "
                                                       f"ct_tissue; started sibling job {lung.id} (lung), "
                                                       f"job {nodules.id} (nodules)")
    (queued,) = store.events(lung.id)
    assert queued.kind == "queued" and queued.message.startswith(
        f"sibling of job {main}: the rules select ct_tissue, lung, nodules for study 1.2.3; this job runs lung")
    # each runs and finishes on its own
    assert store.next_queued().id == main and store.start_job(main, "run")
    assert store.next_queued().id == lung.id and store.start_job(lung.id, "run")
    assert store.begin_delivery(lung.id, "nothing", []) and store.job(lung.id).state is JobState.DONE

    # a late instance (rerun) is recorded under the main job; the sibling that ran is run again, the queued one
    # waits; re-queued, the main job starts no sibling again
    assert store.record_instance(instance("1.3"), to("ct_tissue")) == (Arrival.NEW, main)
    assert store.restart_requested() == [main] and store.restart(main)
    lung_again = store.jobs()[-1]
    assert (lung_again.id, lung_again.pipeline, lung_again.state) == (nodules.id + 1, "lung", JobState.QUEUED)
    assert store.queue_job(main, "idle") is JobState.QUEUED
    assert len(store.jobs()) == 4 and all([i.sop_instance_uid for i in store.job_inputs(j)] == ["1.1", "1.2", "1.3"]
                                          for j in (nodules.id, lung_again.id))
    assert store.events(main)[-1].message.endswith(
        f"sibling job {lung_again.id} (lung), job {nodules.id} (nodules) exist already, not started again")
    # once the main job is final, a late instance (rerun) makes a whole-study job with its own sibling(s)
    assert store.start_job(main, "run") and store.begin_delivery(main, "nothing", [])
    arrival, rerun = store.record_instance(instance("1.4"), to("ct_tissue"))
    assert arrival is Arrival.NEW and rerun == lung_again.id + 1
    assert store.queue_job(rerun, "idle") is JobState.QUEUED
    siblings = [j for j in store.jobs() if j.sibling_of == rerun]
    assert [j.pipeline for j in siblings] == ["lung"]  # the routes of the series its own instances belong to
    assert [i.sop_instance_uid for i in store.job_inputs(siblings[0].id)] == ["1.1", "1.2", "1.3", "1.4"]



def test_no_sibling_runs_while_late_instances_reopen_its_study_and_each_one_run_runs_again(store: JobStore) -> None:
    """``late_instances: rerun`` reopens the study for every pipeline, not the main job alone: a queued sibling
    does not start on the incomplete study, a running one is stopped and queued again, one already run (its
    results out of date) gets a queued re-run, one an operator cancelled stays cancelled; all start once the
    main job is queued again, on the whole input."""
    rerun = Completeness(late_instances=LateInstances.RERUN)
    decision = SeriesDecision(("ct_tissue", "lung", "nodules", "liver"), completeness=rerun)
    _, main = store.record_instance(instance("1.1"), decision)
    assert store.queue_job(main, "idle") is JobState.QUEUED
    _, lung, nodules, liver = (j.id for j in store.jobs())
    assert store.start_job(lung, "run") and store.begin_delivery(lung, "nothing", [])  # ran: done
    assert store.start_job(nodules, "run")  # running
    store.cancel_job(liver, "ops")  # an operator's decision

    # a late instance while the main job is queued: it waits for the study again, and so do its siblings
    assert store.record_instance(instance("1.2"), decision) == (Arrival.NEW, main)
    assert store.job(main).state is JobState.RECEIVED
    assert store.next_queued() is None  # the re-run of lung is queued, yet nothing may start
    assert store.restart_requested() == [nodules] and store.restart(nodules)
    assert store.job(nodules).state is JobState.QUEUED
    assert store.events(nodules)[-1].message == (
        f"run stopped for late instances; partial output discarded; runs again once job {main}'s study is complete")
    lung_again = store.jobs()[-1]
    assert (lung_again.pipeline, lung_again.state, lung_again.sibling_of) == ("lung", JobState.QUEUED, main)
    assert store.events(lung)[-1].message == (
        f"job {main}'s study got a late instance (1.2): this run's input is out of date; sibling job "
        f"{lung_again.id} runs lung again on the whole study (late_instances: rerun)")
    assert [j.pipeline for j in store.jobs() if j.sibling_of == main] == ["lung", "nodules", "liver", "lung"]
    # more late instances change nothing more
    assert store.record_instance(instance("1.3"), decision) == (Arrival.NEW, main)
    assert len(store.jobs()) == 5 and store.next_queued() is None

    # complete again: the main job first, then each pipeline once, every one on the three instances
    assert store.queue_job(main, "idle") is JobState.QUEUED and len(store.jobs()) == 5
    started = []
    while (job := store.next_queued()) is not None:
        assert store.start_job(job.id, "run") and store.begin_delivery(job.id, "nothing", [])
        started.append(job.id)
    assert started == [main, nodules, lung_again.id]
    for job_id in started:
        assert [i.sop_instance_uid for i in store.job_inputs(job_id)] == ["1.1", "1.2", "1.3"]
    assert store.job(liver).state is JobState.FAILED
    # the re-run's results are the study's next version of lung's, superseding the out-of-date run's
    assert store.supersede(lung, "REJECTION.dcm") is None
    assert store.supersede(lung_again.id, "REJECTION.dcm").superseded == lung


def test_a_sibling_cancelled_then_retried_is_run_again_for_late_instances_like_any_other(store: JobStore) -> None:
    """An operator cancelled two siblings and retried them; one ran, the other was cancelled again. A late
    instance (``rerun``) re-runs the one whose latest decision is the retry; the one cancelled again stays
    cancelled."""
    decision = SeriesDecision(("ct_tissue", "lung", "liver"),
                              completeness=Completeness(late_instances=LateInstances.RERUN))
    _, main = store.record_instance(instance("1.1"), decision)
    assert store.queue_job(main, "idle") is JobState.QUEUED
    _, lung, liver = (j.id for j in store.jobs())
    for job_id in (lung, liver):
        store.cancel_job(job_id, "ops", "wrong pipeline")
        assert store.retry_job(job_id, "ops", "the right one after all") == 1
    store.cancel_job(liver, "ops", "not this one after all")
    assert store.start_job(lung, "run") and store.begin_delivery(lung, "nothing", [])
    store.record_instance(instance("1.2"), decision)
    assert [(j.pipeline, j.state) for j in store.jobs() if j.sibling_of == main] == [
        ("lung", JobState.DONE), ("liver", JobState.FAILED), ("lung", JobState.QUEUED)]
    assert "this run's input is out of date" in store.events(lung)[-1].message


def test_a_running_sibling_of_a_running_main_job_is_stopped_by_a_late_instance_too(store: JobStore) -> None:
    decision = SeriesDecision(("ct_tissue", "lung"), completeness=Completeness(late_instances=LateInstances.RERUN))
    _, main = store.record_instance(instance("1.1"), decision)
    store.queue_job(main, "idle")
    lung = store.jobs()[-1].id
    assert store.start_job(main, "run") and store.start_job(lung, "run")
    store.record_instance(instance("1.2"), decision)
    assert sorted(store.restart_requested()) == [main, lung]
    assert store.restart(main) and store.restart(lung)
    assert (store.job(main).state, store.job(lung).state) == (JobState.RECEIVED, JobState.QUEUED)
    assert store.next_queued() is None
    store.queue_job(main, "idle")
    assert [store.next_queued().id] == [main] and store.start_job(main, "run")
    assert store.next_queued().id == lung and len(store.jobs()) == 2



def test_a_run_that_ends_as_late_instances_arrive_is_not_delivered_but_runs_again(store: JobStore) -> None:
    """A late instance (``rerun``) recorded after the run ended but before its results were staged: the results
    (made without it) are not delivered, and the job waits for its study again."""
    decision = SeriesDecision(("ct_tissue",), completeness=Completeness(late_instances=LateInstances.RERUN))
    _, job_id = store.record_instance(instance("1.1"), decision)
    store.queue_job(job_id, "idle")
    assert store.start_job(job_id, "run")
    store.record_instance(instance("1.2"), decision)
    assert not store.begin_delivery(job_id, "2 outputs", [("pacs", "seg.dcm")])
    assert store.job(job_id).state is JobState.RUNNING and store.deliveries(job_id) == []
    assert store.events(job_id)[-1].message == ("run finished, but late instances arrived during it: not delivered, "
                                                "it runs again")
    assert store.restart_requested() == [job_id] and store.restart(job_id)
    assert store.job(job_id).state is JobState.RECEIVED


def test_a_job_of_late_instances_alone_neither_supersedes_the_studys_results_nor_is_out_of_date(
        store: JobStore) -> None:
    """``late_instances: new-job``: the job of the late instances is no new version of the study's results (it
    did not see the whole study), so it withdraws nothing and the main job's results go out whenever it ends;
    a whole-study re-run (``rerun``) is the next version."""
    new_job = SeriesDecision(("ct_tissue",), completeness=Completeness(late_instances=LateInstances.NEW_JOB))
    _, main = store.record_instance(instance("1.1"), new_job)
    store.queue_job(main, "idle")
    assert store.start_job(main, "run")  # long
    arrival, late = store.record_instance(instance("1.2"), new_job)
    assert arrival is Arrival.NEW and late != main and [i.sop_instance_uid for i in store.job_inputs(late)] == ["1.2"]
    store.queue_job(late, "idle")
    assert store.start_job(late, "run")
    assert store.supersede(late, "REJECTION.dcm") is None  # delivers first
    assert store.supersede(main, "REJECTION.dcm") is None  # not out of date: the study's first version
    rerun = SeriesDecision(("ct_tissue",), completeness=Completeness(late_instances=LateInstances.RERUN))
    assert store.begin_delivery(late, "done", []) and store.begin_delivery(main, "done", [])
    _, whole = store.record_instance(replace(instance("2.1"), series_instance_uid="1.2.3.2"), rerun)
    store.queue_job(whole, "idle")
    assert store.supersede(whole, "REJECTION.dcm").superseded == main


def test_an_instance_refused_after_its_study_was_queued_keeps_the_incomplete_study_from_going_out(
        store: JobStore) -> None:
    """``late_instances: rerun``: an instance of the study refused for its content after the job was queued
    (running: the same, by a restart) sends it back to wait; complete again, it fails naming the refusal, and the
    corrected instance re-sent runs the whole study."""
    rerun = SeriesDecision(("ct_tissue", "lung"), completeness=Completeness(late_instances=LateInstances.RERUN))
    _, job_id = store.record_instance(instance("1.1"), rerun)
    assert store.queue_job(job_id, "idle") is JobState.QUEUED
    store.record_refusal("1.2.3", "1.3", "PixelData declares 524288 bytes, the instance ends after 1000", "SCANNER")
    assert store.job(job_id).state is JobState.RECEIVED and store.next_queued() is None
    assert store.queue_job(job_id, "idle") is JobState.FAILED
    assert "1.3: PixelData declares 524288 bytes" in (store.job(job_id).reason or "")
    arrival, whole = store.record_instance(instance("1.3"), rerun)
    assert arrival is Arrival.NEW and whole != job_id and store.queue_job(whole, "idle") is JobState.QUEUED

    _, running = store.record_instance(instance("2.1", study="2.2.3"), rerun)
    store.queue_job(running, "idle")
    assert store.start_job(running, "run")
    store.record_refusal("2.2.3", "2.2", "no SOPInstanceUID", "SCANNER")
    assert store.restart_requested() == [running] and not store.begin_delivery(running, "done", [])


def test_a_damaged_copy_of_an_instance_the_study_holds_leaves_it_complete(store: JobStore) -> None:
    rerun = SeriesDecision(("ct_tissue",), completeness=Completeness(late_instances=LateInstances.RERUN))
    _, job_id = store.record_instance(instance("1.1"), rerun)
    store.record_instance(instance("1.2"), rerun)
    store.record_refusal("1.2.3", "1.2", "PixelData declares 524288 bytes, the instance ends after 1000", "SCANNER")
    assert store.queue_job(job_id, "idle") is JobState.QUEUED
    (refused,) = [e.message for e in store.events(job_id) if e.kind == "refused"]
    assert refused.endswith("a damaged copy of an instance the study holds: the first copy is kept")


def test_a_job_that_failed_delivering_after_its_results_reached_a_destination_is_not_run_again(
        store: JobStore) -> None:
    """A retry runs the pipeline again, with new UIDs: where the first results went, there would be two sets. A
    job that failed at delivery is re-sent instead (its failed deliveries); the retry is refused saying so."""
    from radnode.node.store import ActionRefused

    _, job_id = store.record_instance(instance("1.1"), to("ct_tissue"))
    store.queue_complete_studies(idle_seconds=0, now=time.time() + 10)
    assert store.start_job(job_id, "run")
    assert store.begin_delivery(job_id, "2 outputs", [("pacs", "seg.dcm"), ("backup", "seg.dcm")])
    first, second = store.deliveries(job_id)
    store.delivery_done(first.id, "stored", sent_uid="1.2.3.9")
    store.delivery_failed(second.id, "connection refused", max_attempts=1, backoff=(0.1, 0.1))
    store.settle_job(job_id)
    assert store.job(job_id).state is JobState.FAILED
    with pytest.raises(ActionRefused, match=rf"reached {first.destination} already.*re-send its failed deliveries"):
        store.retry_job(job_id, "ops")
    assert store.job(job_id).state is JobState.FAILED and store.resend(job_id, user="ops", reason="", failed_only=True)

# --- schema revisions ----------------------------------------------------------------------------


_SQLITE_SAME = {("REAL", "DOUBLE"), ("INTEGER", "BOOLEAN")}
"""Type names 0.1's SQLite tables used for what ``schema.py`` declares: the same storage class in SQLite."""


def _differences(target: Path | str) -> list:
    """What Alembic finds different between the store's tables and ``schema.py`` (nothing, when right). On
    tables 0.1 made in SQLite, its spellings of the same thing are not differences: a unique constraint without
    a name, REAL for DOUBLE, INTEGER for BOOLEAN, a TEXT primary key SQLite reports as nullable."""
    database = connect(target)
    try:
        with database.read() as conn:
            unnamed = {(table, tuple(u["column_names"])) for table in metadata.tables
                       for u in inspect(conn).get_unique_constraints(table) if u["name"] is None}

            def same(d: Any) -> bool:
                if isinstance(d, list):
                    d = d[0]
                if d[0] == "add_constraint" and isinstance(d[1], UniqueConstraint):
                    return (d[1].table.name, tuple(c.name for c in d[1].columns)) in unnamed
                if d[0] == "modify_type" and database.is_sqlite:
                    return (str(d[5]), str(d[6]).upper()) in _SQLITE_SAME
                if d[0] == "modify_nullable" and database.is_sqlite:
                    return metadata.tables[d[2]].c[d[3]].primary_key
                return False

            return [d for d in compare_metadata(MigrationContext.configure(conn), metadata) if not same(d)]
    finally:
        database.close()


def test_every_schema_revision_leads_to_exactly_the_tables_of_the_schema_module(store_target: Path | str) -> None:
    """From the baseline revision (the store radnode 0.1 made) through every later one, the tables come out
    as ``schema.py`` declares them, as they do when a new store is created."""
    database = connect(store_target)
    with database.write() as conn:
        command.upgrade(alembic_config(conn), "0001")
    database.close()
    assert "upgraded from 0001 to " + head_revision() in upgrade_store(store_target)
    assert _differences(store_target) == []
    assert JobStore(store_target).opened.endswith(f"at schema revision {head_revision()}")


def test_radnode_store_upgrade_brings_a_store_at_revision_0003_to_the_console_tables_keeping_its_deliveries(
        store_target: Path | str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A store at 0003 (deliveries record the UID sent) gets the sealed patient IDs (0004) and the console's tables (0005) from ``radnode store
    upgrade``: one linear history, its job and delivery kept, and people and tokens can be stored."""
    database = connect(store_target)
    with database.write() as conn:
        command.upgrade(alembic_config(conn), "0003")
        conn.execute(insert(jobs).values(id=1, study_instance_uid="1.2.3", pipeline="ct_tissue", state="done",
                                         created_at=1, last_instance_at=1, updated_at=2))
        conn.execute(insert(deliveries).values(job_id=1, destination="pacs", object="seg.dcm", state="done",
                                               attempts=1, next_attempt_at=0, done_at=2, sent_uid="1.2.3.9"))
    database.close()
    config = tmp_path / "radnode.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path),
                                      **({"store": {"url": store_target}} if isinstance(store_target, str) else {})}))
    assert main(["store", "upgrade", "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"upgraded from 0003 to {head_revision()}")
    assert _differences(store_target) == []
    store = JobStore(store_target)
    try:
        assert [(d.destination, d.state, d.sent_uid) for d in store.deliveries(1)] == [("pacs", "done", "1.2.3.9")]
        token = Accounts(store).create_token("night-shift", Role.OPERATOR)
        identity = Accounts(store).identity_for_token(token)
        assert identity is not None and identity.role is Role.OPERATOR
    finally:
        store.close()


def test_a_store_made_by_release_0_1_opens_with_its_jobs_series_decisions_and_deliveries(tmp_path: Path) -> None:
    """A 0.1 store in use (a study still arriving, routed to two pipelines; a done job with its delivery) is
    upgraded on open; the study then queues with the route it was recorded with."""
    store = open_store_made_by(
        RELEASE_0_1_SCHEMA, tmp_path / "radnode.db", *filter(str.strip, RELEASE_0_1_INDEXES.split(";")),
        "INSERT INTO jobs (id, study_instance_uid, patient_id, pipeline, state, created_at, last_instance_at,"
        " updated_at, priority) VALUES (2, '1.2.4', 'P2', 'ct_tissue', 'received', 10, 11, 11, 2)",
        "INSERT INTO series VALUES ('1.2.4.1', '1.2.4', 'ct_tissue,lung', 'ARCHIVE', 0, 2, 5.0, NULL, 'rerun',"
        " 'pipelines ct_tissue, lung (rules: chest)', 'subprocess', 60, 3, 'a1', 12, NULL)",
        *(f"INSERT INTO instances VALUES ('1.2.4.1.{n}', '1.2.4', '1.2.4.1', 'P2', 'CT', '1.2.840.10008.5.1.4.1.1.2',"
          f" 'CT01', '127.0.0.1:4000', 'a1', {10 + n}, '/spool/{n}.dcm', 2, 0, NULL)" for n in (0, 1)),
        "INSERT INTO deliveries (job_id, destination, object, state, attempts, next_attempt_at, done_at)"
        " VALUES (1, 'dicom:PACS@h:104', 'seg.dcm', 'done', 1, 0, 1)")
    assert store.opened.endswith(f"upgraded from before schema revisions to {head_revision()}")
    assert [(j.id, j.state, j.priority) for j in store.jobs()] == [(1, JobState.DONE, Priority.ROUTINE),
                                                                   (2, JobState.RECEIVED, Priority.STAT)]
    ((progress,),) = store.receiving().values()
    assert (progress.received, progress.expected, progress.released_at) == (2, 3, 12)
    assert progress.decision == SeriesDecision(
        ("ct_tissue", "lung"), forwards=("ARCHIVE",), priority=Priority.STAT,
        completeness=Completeness(5.0, None, LateInstances.RERUN), execution=Execution(ExecutionMode.SUBPROCESS, 60),
        note="pipelines ct_tissue, lung (rules: chest)")
    assert store.queue_job(2, "idle") is JobState.QUEUED
    main, sibling = store.jobs()[1:]
    assert (main.pipeline, main.forwards, sibling.pipeline, sibling.execution) == (
        "ct_tissue", ("ARCHIVE",), "lung", Execution(ExecutionMode.SUBPROCESS, 60))
    assert [(d.object, d.state) for d in store.deliveries(1)] == [("seg.dcm", "done")]
    store.close()
    assert _differences(tmp_path / "radnode.db") == []


def test_a_store_whose_deliveries_already_record_the_sent_uid_opens_with_them(tmp_path: Path) -> None:
    """The development build before schema revisions added ``deliveries.sent_uid`` on open; such a store
    upgrades to the same tables, its recorded UIDs kept."""
    store = open_store_made_by(
        RELEASE_0_1_SCHEMA, tmp_path / "radnode.db", "ALTER TABLE deliveries ADD COLUMN sent_uid TEXT",
        "INSERT INTO deliveries (job_id, destination, object, state, attempts, next_attempt_at, done_at, sent_uid)"
        " VALUES (1, 'pacs', 'seg.dcm', 'done', 1, 0, 1, '1.2.3.9')")
    assert [(d.destination, d.sent_uid) for d in store.deliveries(1)] == [("pacs", "1.2.3.9")]
    store.close()
    assert _differences(tmp_path / "radnode.db") == []


def test_a_postgresql_store_at_an_older_schema_stops_the_node_until_it_is_upgraded(
        postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Several nodes may share a PostgreSQL store, so a node never migrates one: ``radnode serve`` refuses to
    start with one line saying what to do, and ``radnode store upgrade`` does it."""
    database = connect(postgres_url)
    with database.write() as conn:
        command.upgrade(alembic_config(conn), "0001")
    database.close()
    config = tmp_path / "radnode.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "store": {"url": postgres_url},
                                      "ingress": {"host": "127.0.0.1", "port": 0}, "api": {"port": 0}}))
    radnode = [sys.executable, "-m", "radnode"]
    serve = subprocess.run([*radnode, "serve", "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert serve.returncode == 2 and serve.stdout == ""
    (line,) = serve.stderr.splitlines()
    assert re.fullmatch(r"radnode: job store postgresql://radnode_test_\w+:\*\*\*@127\.0\.0\.1:\d+/\S+ is at an older "
                        rf"schema \(0001; this radnode needs {head_revision()}\): back it up, then run "
                        r"`radnode store upgrade --config FILE`", line), line
    assert main(["store", "upgrade", "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"upgraded from 0001 to {head_revision()}")
    store = JobStore(postgres_url)
    assert store.jobs() == []
    store.close()


def test_an_unreachable_postgresql_store_is_refused_with_one_line() -> None:
    url = f"postgresql://radnode@127.0.0.1:{free_port()}/radnode"
    with pytest.raises(StoreError) as refused:
        JobStore(url)
    (line,) = str(refused.value).splitlines()
    assert line.startswith(f"job store {url} unreachable: ") and "refused" in line, line


# --- two writers at once -------------------------------------------------------------------------


INGRESS_PROCESS = """
import pathlib, sys, time
from radnode.node.store import Instance, JobStore
from radnode.pipelines.routing import SeriesDecision

target, worker, go = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
store = JobStore(target if target.startswith("postgresql") else pathlib.Path(target))
while not go.exists():  # both connected: start together
    time.sleep(0.01)
for n in range(25):
    for sop in (f"9.9.{worker}.{n}", f"9.9.0.{n}"):  # its own instance, and one both processes receive
        store.record_instance(Instance(sop, "9.9", "9.9.1", "P9", "CT", "1.2.840.10008.5.1.4.1.1.2",
                                       f"/spool/{sop}.dcm", "CT01", "127.0.0.1:4000", worker, time.time()),
                              SeriesDecision(("ct_tissue",)))
store.close()
"""
"""One ingress process: its own connection to the store, recording its share of one study's instances and the
instances both processes receive (a sender retrying on the other node), in lockstep with the other."""


def test_two_ingress_processes_recording_one_study_make_one_job(store_target: Path | str, tmp_path: Path) -> None:
    JobStore(store_target).close()  # the schema, before the two start
    go = tmp_path / "go"
    workers = [subprocess.Popen([sys.executable, "-c", INGRESS_PROCESS, str(store_target), str(worker), str(go)],
                                stderr=subprocess.PIPE, text=True) for worker in (1, 2)]
    time.sleep(0.5)
    go.touch()
    for worker in workers:
        _, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr
    store = JobStore(store_target)
    (job,) = store.jobs()
    assert job.study_instance_uid == "9.9" and job.instances == 75  # 25 + 25 of their own, 25 both received
    assert len(store.instances(job.id)) == 75
    assert [e.kind for e in store.events(job.id)].count("duplicate") == 25
    store.close()


def test_a_rerun_of_a_study_whose_report_went_out_reissues_it(store: JobStore) -> None:
    """The report of a study's pipeline counts as sent once its FHIR Bundle is delivered; a later job re-running
    the study (a late instance, late_instances: rerun) re-issues it, another study's job does not."""
    rerun = SeriesDecision(("ct_tissue",), completeness=Completeness(late_instances=LateInstances.RERUN))
    _, first = store.record_instance(instance("2.1", study="2.9", received_at=0), rerun)
    _, other = store.record_instance(instance("3.1", study="3.9", received_at=0), rerun)
    for job_id in (first, other):
        store.queue_job(job_id, "idle")
        store.start_job(job_id, "run")
        store.begin_delivery(job_id, "2 outputs", [("pacs", "seg.dcm"), ("ehr", "fhir-bundle.json")])
    assert not store.report_already_sent(first, "fhir-bundle.json")  # planned, not delivered
    seg, bundle = sorted(store.deliveries(first), key=lambda d: d.object, reverse=True)
    store.delivery_done(seg.id, "stored")
    assert not store.report_already_sent(first, "fhir-bundle.json")  # the DICOM went out, the report did not
    store.delivery_done(bundle.id, "HTTP 200")
    assert store.report_already_sent(first, "fhir-bundle.json")
    assert not store.report_already_sent(other, "fhir-bundle.json")
    _, again = store.record_instance(instance("2.2", study="2.9", received_at=1), rerun)
    assert again != first and store.job(again).pipeline == "ct_tissue"  # type: ignore[union-attr]
    assert store.report_already_sent(again, "fhir-bundle.json")
