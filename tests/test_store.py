"""The job store on a real SQLite file: transitions, late and duplicate instances, retries, reopening."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from factories import open_store_made_by
from radnode.node.store import SCHEMA, Arrival, Instance, JobState, JobStore, SeriesRoute
from radnode.pipelines.rules import Execution, ExecutionMode


def instance(sop: str, study: str = "1.2.3", received_at: float | None = None) -> Instance:
    return Instance(sop_instance_uid=sop, study_instance_uid=study, series_instance_uid=f"{study}.1",
                    patient_id="P1", modality="CT", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    path=f"/spool/{sop}.dcm", calling_ae="SCANNER", peer_address="127.0.0.1:4000",
                    association_id="a1", received_at=time.time() if received_at is None else received_at)


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "radnode.db")


def test_a_study_becomes_a_job_queued_only_after_it_went_idle(store: JobStore) -> None:
    now = time.time()
    assert store.record_instance(instance("1.1", received_at=now - 10), "ct_tissue")[0] is Arrival.NEW
    arrival, job_id = store.record_instance(instance("1.2", received_at=now - 1), "ct_tissue")
    assert arrival is Arrival.NEW
    assert store.queue_complete_studies(idle_seconds=3, now=now) == []
    assert store.queue_complete_studies(idle_seconds=3, now=now + 2) == [job_id]
    job = store.job(job_id)
    assert job is not None and job.state is JobState.QUEUED and job.instances == 2
    assert "2 instances in 1 series (CT) from SCANNER (127.0.0.1:4000)" in store.events(job_id)[-1].message


def test_late_and_duplicate_instances_are_recorded_not_lost(store: JobStore) -> None:
    _, job_id = store.record_instance(instance("1.1", received_at=0), "ct_tissue")
    store.queue_complete_studies(idle_seconds=1)
    assert store.start_job(job_id, "run")
    assert store.record_instance(instance("1.2"), "ct_tissue") == (Arrival.LATE, job_id)
    assert store.record_instance(instance("1.1"), "ct_tissue") == (Arrival.DUPLICATE, job_id)
    assert [i.sop_instance_uid for i in store.job_inputs(job_id)] == ["1.1"]
    assert {i.sop_instance_uid for i in store.instances(job_id)} == {"1.1", "1.2"}
    job = store.job(job_id)
    assert job is not None and (job.instances, job.late_instances) == (1, 1)
    kinds = [e.kind for e in store.events(job_id)]
    assert kinds == ["received", "queued", "running", "late", "duplicate"]


def test_transitions_are_guarded_and_safe_to_repeat(store: JobStore) -> None:
    _, job_id = store.record_instance(instance("1.1", received_at=0), "ct_tissue")
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
    _, job_id = store.record_instance(instance("1.1", received_at=0), "ct_tissue")
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


def test_state_survives_reopening_and_running_jobs_can_be_requeued(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "radnode.db")
    _, job_id = store.record_instance(instance("1.1", received_at=0), "ct_tissue")
    store.queue_complete_studies(idle_seconds=1)
    store.start_job(job_id, "run")
    store.close()
    reopened = JobStore(tmp_path / "radnode.db")
    assert reopened.running_jobs() == [job_id]
    assert reopened.requeue(job_id, "restarted")
    assert not reopened.requeue(job_id, "restarted")
    job = reopened.next_queued()
    assert job is not None and job.id == job_id and job.runs == 1
    reopened.close()


def test_review_state_is_recorded_filterable_and_cleared_by_a_new_run(store: JobStore) -> None:
    jobs = []
    for study in ("1.2.3", "1.2.4", "1.2.5"):
        _, job_id = store.record_instance(instance(f"{study}.1", study=study, received_at=0), "tiny_model")
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
    _, again = store.record_instance(instance("1.2.6.1", study="1.2.6", received_at=0), "tiny_model")
    store.queue_complete_studies(idle_seconds=1)
    store.start_job(again, "run")
    store.record_review(again, True, ["lesion: sample agreement 0.5 < 0.9"])
    assert store.requeue(again, "node stopped") and store.start_job(again, "run again")
    job = store.job(again)
    assert job is not None and job.needs_review is None and job.review_reasons == ()


def test_a_store_from_before_review_states_gets_them_on_open(tmp_path: Path) -> None:
    old_schema = SCHEMA.replace(",\n    needs_review INTEGER,\n    review_reasons TEXT NOT NULL DEFAULT ''", "")
    assert "needs_review" not in old_schema
    store = open_store_made_by(old_schema, tmp_path / "radnode.db")
    (job,) = store.jobs()
    assert job.needs_review is None and job.review_reasons == ()
    store.close()



def test_job_counts_agree_with_the_job_list(store: JobStore) -> None:
    """The health probe's SQL counts equal counting the listed jobs, flagged ones included."""
    jobs = [store.record_instance(instance(f"1.2.{n}.1", study=f"1.2.{n}", received_at=0), "tiny_model")[1]
            for n in range(3)]
    store.queue_complete_studies(idle_seconds=1)
    store.start_job(jobs[0], "run")
    store.record_review(jobs[0], True, ["lesion: mean uncertainty 0.471 > 0.2"])
    counts, flagged = store.job_counts()
    assert counts == {state.value: sum(j.state is state for j in store.jobs()) for state in JobState}
    assert counts["running"] == 1 and sum(counts.values()) == 3
    assert flagged == len(store.jobs(needs_review=True)) == 1


def test_every_selected_pipeline_runs_as_its_own_job_with_the_main_jobs_input(store: JobStore) -> None:
    ct = SeriesRoute(("ct_tissue", "lung"), forwards=("ARCHIVE",), late_instances="rerun",
                     execution=Execution(ExecutionMode.SUBPROCESS, 60))
    chest = SeriesRoute(("lung", "nodules"), priority=2, late_instances="rerun", execution=Execution(None, 300))
    _, main = store.record_instance(instance("1.1", received_at=0), "ct_tissue", ct)
    store.record_instance(replace(instance("1.2", received_at=1), series_instance_uid="1.2.3.2"), "lung", chest)
    assert store.queue_job(main, "idle") is JobState.QUEUED
    jobs = store.jobs()
    assert [(j.id, j.pipeline, j.state, j.sibling_of) for j in jobs] == [
        (main, "ct_tissue", JobState.QUEUED, None), (main + 1, "lung", JobState.QUEUED, main),
        (main + 2, "nodules", JobState.QUEUED, main)]
    first, lung, nodules = jobs
    assert first.forwards == ("ARCHIVE",) and lung.forwards == nodules.forwards == ()
    assert {j.priority for j in jobs} == {2}
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

    # a late instance (rerun) goes to the main job only; re-queued, it starts no sibling again
    assert store.record_instance(instance("1.3"), "ct_tissue") == (Arrival.NEW, main)
    assert store.restart_requested() == [main] and store.restart(main)
    assert store.queue_job(main, "idle") is JobState.QUEUED
    assert len(store.jobs()) == 3 and [i.sop_instance_uid for i in store.job_inputs(nodules.id)] == [
        "1.1", "1.2", "1.3"]
    assert store.events(main)[-1].message.endswith(
        f"already run by sibling job {lung.id} (lung), job {nodules.id} (nodules), not started again"
        " (late instances re-run this job only)")
    # once the main job is final, a late instance (rerun) makes a whole-study job with its own sibling(s)
    assert store.start_job(main, "run") and store.begin_delivery(main, "nothing", [])
    arrival, rerun = store.record_instance(instance("1.4"), "ct_tissue")
    assert arrival is Arrival.NEW and rerun == nodules.id + 1
    assert store.queue_job(rerun, "idle") is JobState.QUEUED
    siblings = [j for j in store.jobs() if j.sibling_of == rerun]
    assert [j.pipeline for j in siblings] == ["lung"]  # the routes of the series its own instances belong to
    assert [i.sop_instance_uid for i in store.job_inputs(siblings[0].id)] == ["1.1", "1.2", "1.3", "1.4"]
