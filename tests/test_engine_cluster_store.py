"""The distributed engine's records in the job store (PostgreSQL, where several hosts share it): the
outbox, claims fenced by the attempt number, leases and the reaper, the attempt limit, the leader lock.
These are the rules the end-to-end tests (``test_engine.py``) rely on, each checked on its own."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from factories import queued_job
from radnode.node.activity import ActivityLog
from radnode.node.store import Instance, JobState, JobStore
from radnode.pipelines.routing import Completeness, LateInstances, SeriesDecision
from support.waiting import wait_until

LEASE = 30.0


@pytest.fixture
def store(postgres_url: str) -> Iterator[JobStore]:
    store = JobStore(postgres_url)
    try:
        yield store
    finally:
        store.close()


def _dispatched(store: JobStore) -> tuple[int, int]:
    job_id = queued_job(store)
    assert store.undispatched() == [job_id]
    dispatch = store.dispatch(job_id, "radnode", 5)
    assert dispatch is not None and store.dispatch(job_id, "radnode", 5) is None  # once
    assert [p.id for p in store.unpublished()] == [dispatch]
    return job_id, dispatch


def test_a_dispatch_stays_in_the_outbox_until_the_broker_confirms(store: JobStore) -> None:
    job_id, dispatch = _dispatched(store)
    store.publish_failed(dispatch, "connection refused")
    assert [p.id for p in store.unpublished()] == [dispatch]  # kept for the next round
    store.published(dispatch)
    assert store.unpublished() == [] and store.undispatched() == []


def test_a_duplicate_message_claims_nothing(store: JobStore) -> None:
    job_id, dispatch = _dispatched(store)
    assert store.claim(job_id, dispatch, "w1", False, LEASE, 3).attempt == 1
    second = store.claim(job_id, dispatch, "w2", False, LEASE, 3)
    assert second.attempt == 0 and "duplicate message" in second.why
    assert store.job(job_id).worker == "w1"  # type: ignore[union-attr]


def test_a_redelivered_message_takes_the_job_from_the_lost_worker(store: JobStore) -> None:
    job_id, dispatch = _dispatched(store)
    store.claim(job_id, dispatch, "w1", False, LEASE, 3)
    assert store.claim(job_id, dispatch, "w2", True, LEASE, 3).attempt == 2
    first, second = store.attempts(job_id)
    assert (first.worker, first.outcome, second.worker, second.outcome) == ("w1", "lost", "w2", "running")
    assert "redelivered" in first.reason


def test_a_fenced_attempt_cannot_report(store: JobStore) -> None:
    """Attempt 1's worker was cut off and the job moved on to attempt 2: attempt 1 can neither renew, nor
    report outputs, nor fail the job."""
    job_id, dispatch = _dispatched(store)
    store.claim(job_id, dispatch, "w1", False, LEASE, 3)
    store.claim(job_id, dispatch, "w2", True, LEASE, 3)
    assert not store.renew_lease(job_id, 1, LEASE)
    assert not store.report_outputs(job_id, 1)
    assert not store.report_failure(job_id, 1, "late news")
    assert store.completed_remotely() == []
    assert store.renew_lease(job_id, 2, LEASE) and store.report_outputs(job_id, 2)
    assert store.completed_remotely() == [(job_id, 2)]


def test_the_reaper_requeues_a_lapsed_lease_and_drops_the_stale_message(store: JobStore) -> None:
    job_id, dispatch = _dispatched(store)
    store.published(dispatch)
    store.claim(job_id, dispatch, "w1", False, 0.01, 3)
    time.sleep(0.05)
    ((reaped, why),) = store.reap_expired(3)
    assert reaped == job_id and "worker w1 lost: its lease lapsed" in why
    job = store.job(job_id)
    assert job is not None and job.state is JobState.QUEUED and store.undispatched() == [job_id]
    new_dispatch = store.dispatch(job_id, "radnode", 5)
    stale = store.claim(job_id, dispatch, "w2", True, LEASE, 3)  # the broker redelivers the old message late
    assert stale.attempt == 0 and "stale message" in stale.why
    assert store.claim(job_id, new_dispatch, "w2", False, LEASE, 3).attempt == 2  # type: ignore[arg-type]


def test_a_job_that_loses_its_worker_n_times_fails_with_every_reason(store: JobStore) -> None:
    job_id, dispatch = _dispatched(store)
    for worker in ("w1", "w2", "w3"):
        assert store.claim(job_id, dispatch, worker, True, LEASE, 3).attempt > 0
    last = store.claim(job_id, dispatch, "w4", True, LEASE, 3)
    assert last.exhausted and last.attempt == 0
    job = store.job(job_id)
    assert job is not None and job.state is JobState.FAILED
    assert job.reason.startswith("gave up after 3 lost attempts: ")  # type: ignore[union-attr]
    for n, worker in enumerate(("w1", "w2", "w3"), start=1):
        assert f"attempt {n} on {worker}: worker {worker} lost mid-job" in job.reason  # type: ignore[operator]


def test_a_failed_run_fails_the_job_with_its_reason(store: JobStore) -> None:
    job_id, dispatch = _dispatched(store)
    store.claim(job_id, dispatch, "w1", False, LEASE, 3)
    assert store.report_failure(job_id, 1, "no image series in the input")
    job = store.job(job_id)
    assert job is not None and job.state is JobState.FAILED and job.reason == "no image series in the input"
    assert [e.message for e in store.events(job_id) if e.kind == "failed"] == ["attempt 1: no image series in the input"]



def test_a_late_instance_makes_the_messages_of_a_queued_study_stale_and_it_is_dispatched_again(
        store: JobStore) -> None:
    """``late_instances: rerun`` on a study whose jobs were dispatched but not yet claimed: the messages out are
    stale (a worker drops them, so nothing runs on the incomplete study), nothing is dispatched while it is
    incomplete, and once it is complete again every job is dispatched afresh (none is lost)."""
    decision = SeriesDecision(("ct_tissue", "lung"), completeness=Completeness(late_instances=LateInstances.RERUN))

    def arrive(sop: str) -> int:
        return store.record_instance(Instance(sop, "1.2.3", "1.2.3.1", "P1", "CT", "1.2.840.10008.5.1.4.1.1.2",
                                              f"/spool/{sop}.dcm", "SCANNER", "127.0.0.1:5000", "a1", 0.0), decision)[1]

    main = arrive("1.1")
    store.queue_job(main, "idle")
    jobs = [job.id for job in store.jobs()]
    messages = {job_id: store.dispatch(job_id, "radnode", 5) for job_id in jobs}
    assert arrive("1.2") == main
    for job_id, message in messages.items():
        claim = store.claim(job_id, message, "w1", False, LEASE, 3)
        assert claim.attempt == 0 and "stale message" in claim.why
    assert store.undispatched() == []
    assert store.queue_job(main, "idle") is JobState.QUEUED
    assert store.undispatched() == jobs
    for job_id in jobs:
        message = store.dispatch(job_id, "radnode", 5)
        assert message not in messages.values() and store.claim(job_id, message, "w1", False, LEASE, 3).attempt == 1


def test_a_job_failed_on_a_worker_and_retried_is_dispatched_again(store: JobStore) -> None:
    job_id, dispatch = _dispatched(store)
    attempt = store.claim(job_id, dispatch, "w1", False, LEASE, 3).attempt
    assert store.report_failure(job_id, attempt, "exit 139 (segfault)")
    store.retry_job(job_id, "ops")
    assert store.job(job_id).state is JobState.QUEUED  # type: ignore[union-attr]
    assert store.undispatched() == [job_id]
    again = store.dispatch(job_id, "radnode", 5)
    assert again is not None and again != dispatch
    assert store.claim(job_id, dispatch, "w2", True, LEASE, 3).attempt == 0  # the old message stays stale
    assert store.claim(job_id, again, "w2", False, LEASE, 3).attempt == attempt + 1


def test_a_shadow_dispatched_after_its_production_job_was_retried_is_not_claimed_until_the_new_run_is_over(
        store: JobStore, caplog: pytest.LogCaptureFixture) -> None:
    """The leader listed the shadow job for dispatch (its production run had failed), an operator retried the
    production job, then the leader dispatched the shadow: a worker's claim of that message refuses it, so it
    never runs beside the new production run. Its dispatch is dropped: it is dispatched again, and claimed, once
    the new production run is over, and compared with that run."""
    _, main = store.record_instance(Instance("1.1", "1.2.3", "1.2.3.1", "P1", "CT", "1.2.840.10008.5.1.4.1.1.2",
                                             "/spool/1.1.dcm", "SCANNER", "127.0.0.1:5000", "a1", 0.0),
                                    SeriesDecision(("ct_tissue",), shadow=("model_seg",)))
    assert store.queue_job(main, "idle") is JobState.QUEUED
    (shadow,) = [job.id for job in store.jobs() if job.shadow]
    attempt = store.claim(main, store.dispatch(main, "radnode", 5), "w1", False, LEASE, 3).attempt
    assert store.report_failure(main, attempt, "exit 139 (segfault)")
    assert store.undispatched() == [shadow]  # the leader's read...
    store.retry_job(main, "ops")  # ...then the operator's retry, before the leader's dispatch
    message = store.dispatch(shadow, "radnode", 5)
    assert message is not None
    activity = ActivityLog(store.read_rows)
    held = store.claim(shadow, message, "w2", False, LEASE, 3)
    assert held.attempt == 0 and f"held until job {main}'s run is over" in held.why
    with caplog.at_level(logging.INFO, logger="radnode.activity"):
        activity.tick()
    assert [r.getMessage() for r in caplog.records if "held" in r.getMessage()] == [
        f"job {shadow} (model_seg) held: message {message} not run: {held.why}"]  # the node's log says so too
    assert store.job(shadow).state is JobState.QUEUED and store.attempts(shadow) == []  # type: ignore[union-attr]
    assert store.undispatched() == [main]
    attempt = store.claim(main, store.dispatch(main, "radnode", 5), "w1", False, LEASE, 3).attempt
    assert store.undispatched() == [] and store.report_outputs(main, attempt)
    assert store.begin_delivery(main, "results", [("PACS", "seg.dcm")])
    assert store.undispatched() == [shadow]
    assert store.claim(shadow, message, "w2", True, LEASE, 3).attempt == 0  # the refused message stays stale
    attempt = store.claim(shadow, store.dispatch(shadow, "radnode", 5), "w2", False, LEASE, 3).attempt
    assert attempt == 1 and store.report_outputs(shadow, attempt) and store.finish_shadow(shadow, "8 outputs")
    assert [(s.id, p.id, p.state) for s, p in store.shadows_to_compare()] == [(shadow, main, JobState.DELIVERING)]


def test_a_forward_left_running_by_a_leader_that_died_is_queued_again_by_the_next(store: JobStore) -> None:
    """A forward-only job is the leader's own work (no worker, no lease): one it started and did not hand to egress
    before it died is queued again when another node becomes leader, and forwarded once."""
    _, job_id = store.record_instance(Instance("1.1", "1.2.3", "1.2.3.1", "P1", "CT", "1.2.840.10008.5.1.4.1.1.2",
                                               "/spool/1.1.dcm", "SCANNER", "127.0.0.1:5000", "a1", 0.0),
                                      SeriesDecision((), forwards=("ARCHIVE",)))
    assert store.queue_job(job_id, "idle") is JobState.QUEUED
    assert store.next_queued(forward_only=True).id == job_id and store.start_job(job_id, "forward-only route")
    assert store.reap_expired(3, now=time.time() + 1e6) == []  # no lease: the reaper never sees it
    assert store.requeue_forwarding("leader gone") == [job_id]
    assert store.next_queued(forward_only=True).id == job_id and store.start_job(job_id, "forward-only route")
    assert store.begin_delivery(job_id, "1 instance", [("ARCHIVE", "1.1.dcm")])
    assert store.requeue_forwarding("leader gone") == []

def test_one_leader_at_a_time_and_the_next_takes_over(postgres_url: str) -> None:
    first, second = JobStore(postgres_url), JobStore(postgres_url)
    try:
        held = first.take_leadership()
        assert held is not None and second.take_leadership() is None
        assert first.leadership_held(held)
        first.give_up_leadership(held)  # the leader stops (or dies): its session, and the lock, end
        taken: list = []
        # the server ends the old session a moment after its socket closes; the next node polls each second
        wait_until(lambda: taken.append(second.take_leadership()) or taken[-1] is not None, timeout=10, step=0.2)
        second.give_up_leadership(taken[-1])
    finally:
        first.close()
        second.close()


def test_workers_report_their_heartbeat(store: JobStore) -> None:
    from radnode.node.engine.devices import worker_state, workers_table

    store.worker_heartbeat("w1", "gpu-host-1", ["radnode", "large-gpu"], "0", 1234, None, started=True)
    (worker,) = store.workers()
    assert (worker.host, worker.queues, worker.gpus, worker_state(worker, LEASE)) == \
        ("gpu-host-1", ("radnode", "large-gpu"), "0", "idle")
    assert worker_state(worker, LEASE, now=worker.heartbeat_at + LEASE + 1) == "lost"
    table = workers_table(store.workers(), LEASE)
    assert "gpu-host-1" in table and "radnode,large-gpu" in table
    store.worker_stopped("w1")
    assert worker_state(store.workers()[0], LEASE) == "stopped"


def test_the_api_lists_the_workers_a_node_s_store_knows(tmp_path) -> None:
    """``GET /api/workers``: the workers' queues, GPUs, state, current job and last heartbeat (none: [])."""
    from radnode.node.service import Node
    from support.console import api_json, token_for
    from support.node import node_config

    with Node(node_config(tmp_path, api={"enabled": True, "port": 0, "host": "127.0.0.1"})) as node:
        token = token_for(node, "viewer")
        assert api_json(node, "/api/workers", token) == {"workers": []}
        node.store.worker_heartbeat("gpu-host-1-gpu0", "gpu-host-1", ["radnode"], "0", 42, 7, started=True)  # type: ignore[union-attr]
        (worker,) = api_json(node, "/api/workers", token)["workers"]
    assert (worker["name"], worker["host"], worker["queues"], worker["gpus"], worker["state"], worker["current_job"]) == \
        ("gpu-host-1-gpu0", "gpu-host-1", ["radnode"], "0", "busy", 7)
    assert worker["last_heartbeat"] > 0
