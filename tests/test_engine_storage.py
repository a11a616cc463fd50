"""Where distributed jobs keep their inputs and outputs: a shared folder, or S3 (moto's real HTTP server).
Both kinds pass the same tests: input once per dispatch, outputs whole or not at all."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest

from radnode.config import Config, parse_config
from radnode.node.egress import Egress
from radnode.node.engine.dispatch import Dispatcher
from radnode.node.engine.storage import COMPLETE, S3Storage, SharedDirStorage, Storage, StorageError, open_storage
from radnode.node.store import Instance, JobState, JobStore
from radnode.node.worker import DEFAULT_JOB_COMMAND, Scheduler
from radnode.pipelines.routing import Completeness, LateInstances, SeriesDecision

if TYPE_CHECKING:
    from radnode.benchmarks.cluster import RabbitNode


@pytest.fixture(params=["shared_dir", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "shared_dir":
        return SharedDirStorage(tmp_path / "shared")
    endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
    return S3Storage(bucket, endpoint, "us-east-1", "site")


def _folder(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def test_inputs_go_up_once_per_dispatch_and_come_back_whole(storage: Storage, tmp_path: Path) -> None:
    """A job's input is kept per dispatch: a second upload for the same dispatch keeps the first, a later dispatch
    (the job sent again after late instances) has its own, never the first one's."""
    storage.check()
    assert not storage.has_inputs(7, 1)
    storage.put_inputs(7, 1, _folder(tmp_path / "a", {"1.dcm": b"one", "2.dcm": b"two"}))
    storage.put_inputs(7, 1, _folder(tmp_path / "b", {"other.dcm": b"later"}))  # a second upload keeps the first
    assert storage.has_inputs(7, 1) and not storage.has_inputs(7, 2)
    storage.get_inputs(7, 1, tmp_path / "got")
    assert {p.name: p.read_bytes() for p in (tmp_path / "got").iterdir()} == {"1.dcm": b"one", "2.dcm": b"two"}
    storage.put_inputs(7, 2, _folder(tmp_path / "c", {"1.dcm": b"one", "2.dcm": b"two", "3.dcm": b"late"}))
    storage.get_inputs(7, 2, tmp_path / "again")
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["1.dcm", "2.dcm", "3.dcm"]
    with pytest.raises(StorageError, match="job 7's input of dispatch 5"):
        storage.get_inputs(7, 5, tmp_path / "none")



def _leader(storage: Storage, tmp_path: Path, postgres_url: str, rabbitmq: "RabbitNode") -> tuple[JobStore, Dispatcher]:
    """The store and the dispatcher of a leader node's scheduler (the real broker, a queue of this test's own)."""
    store, scheduler = _scheduler(storage, tmp_path, postgres_url, rabbitmq)
    assert scheduler.remote is not None
    return store, scheduler.remote


def _scheduler(storage: Storage, tmp_path: Path, postgres_url: str, rabbitmq: "RabbitNode") -> tuple[JobStore, Scheduler]:
    """The store and scheduler of a leader node with the distributed engine."""
    config = Config.model_validate({
        "data_dir": str(tmp_path / "data"), "store": {"url": postgres_url},
        "engine": {"kind": "celery", "broker_url": rabbitmq.url(), "default_queue": f"test-{secrets.token_hex(4)}"}})
    store = JobStore(postgres_url)
    scheduler = Scheduler(config, store, Egress(config, store), DEFAULT_JOB_COMMAND, tmp_path / "radnode.yaml",
                          storage=storage)
    return store, scheduler


def _instance(sop: str, study: str, path: Path) -> Instance:
    return Instance(sop, study, f"{study}.1", "P1", "CT", "1.2.840.10008.5.1.4.1.1.2", str(path), "SCANNER",
                    "127.0.0.1:5000", "a1", 0.0)


def test_a_job_dispatched_again_after_late_instances_gets_its_input_as_it_is_then(
        storage: Storage, tmp_path: Path, postgres_url: str, rabbitmq: "RabbitNode") -> None:
    """The leader's dispatcher, with the real broker: a job and its sibling dispatched (input: one instance),
    then restarted for a late instance and dispatched again; each new message's input holds both instances."""
    store, dispatcher = _leader(storage, tmp_path, postgres_url, rabbitmq)
    decision = SeriesDecision(("ct_tissue", "lung"), completeness=Completeness(late_instances=LateInstances.RERUN))

    def arrive(sop: str) -> int:
        path = _folder(tmp_path / "spool", {f"{sop}.dcm": sop.encode()}) / f"{sop}.dcm"
        return store.record_instance(_instance(sop, "1.2.3", path), decision)[1]

    def dispatch_and_publish() -> dict[int, list[str]]:
        """One round of the leader's dispatcher; per job, the input its new message's worker gets."""
        dispatcher.dispatch()
        messages = {pub.job_id: pub.id for pub in store.unpublished()}
        dispatcher.publish()
        assert store.unpublished() == []
        got = {}
        for job_id, message in messages.items():
            folder = tmp_path / f"got-{message}"
            storage.get_inputs(job_id, message, folder)
            got[job_id] = sorted(p.name for p in folder.iterdir())
            assert store.claim(job_id, message, "w1", False, 30.0, 3).attempt  # the message is the job's own
        return got

    try:
        main = arrive("1.1")
        store.queue_job(main, "idle")
        jobs = [job.id for job in store.jobs()]
        assert dispatch_and_publish() == {job_id: ["1.1.dcm"] for job_id in jobs}
        arrive("1.2")  # late: both running jobs are restarted
        assert sorted(store.restart_requested()) == jobs and all(store.restart(job_id) for job_id in jobs)
        assert dispatch_and_publish() == {}  # nothing may start on the incomplete study
        assert store.queue_job(main, "idle") is JobState.QUEUED
        assert dispatch_and_publish() == {job_id: ["1.1.dcm", "1.2.dcm"] for job_id in jobs}
    finally:
        dispatcher.close()
        store.close()


def test_a_job_whose_input_cannot_be_read_fails_and_holds_up_no_other(
        storage: Storage, tmp_path: Path, postgres_url: str, rabbitmq: "RabbitNode") -> None:
    store, dispatcher = _leader(storage, tmp_path, postgres_url, rabbitmq)
    try:
        first = store.record_instance(_instance("1.1", "1.2.3", tmp_path / "gone.dcm"), SeriesDecision(("ct_tissue",)))[1]
        readable = _folder(tmp_path / "spool", {"2.1.dcm": b"x"}) / "2.1.dcm"
        second = store.record_instance(_instance("2.1", "2.2.3", readable), SeriesDecision(("ct_tissue",)))[1]
        store.queue_complete_studies(idle_seconds=0, now=1.0)
        dispatcher.dispatch()
        messages = {pub.job_id: pub.id for pub in store.unpublished()}
        dispatcher.publish()
        failed = store.job(first)
        assert failed is not None and failed.state is JobState.FAILED
        assert (failed.reason or "").startswith("cannot prepare the job's input: ")
        assert store.unpublished() == [] and storage.has_inputs(second, messages[second])
    finally:
        dispatcher.close()
        store.close()


def test_a_paused_queue_dispatches_nothing_to_the_workers(
        storage: Storage, tmp_path: Path, postgres_url: str, rabbitmq: "RabbitNode") -> None:
    store, scheduler = _scheduler(storage, tmp_path, postgres_url, rabbitmq)
    try:
        path = _folder(tmp_path / "spool", {"1.1.dcm": b"x"}) / "1.1.dcm"
        job_id = store.record_instance(_instance("1.1", "1.2.3", path), SeriesDecision(("ct_tissue",)))[1]
        store.set_queue_paused(True, "ops")
        store.queue_complete_studies(idle_seconds=0, now=1.0)
        scheduler.tick()
        assert store.undispatched() == [job_id]
        store.set_queue_paused(False, "ops")
        scheduler.tick()
        assert store.undispatched() == [] and store.unpublished() == []
    finally:
        scheduler.stop()
        store.close()

def test_outputs_are_per_attempt_and_missing_ones_are_refused(storage: Storage, tmp_path: Path) -> None:
    storage.put_outputs(3, 1, _folder(tmp_path / "o1", {"seg.dcm": b"S1", "manifest.json": b"{}"}))
    storage.put_outputs(3, 2, _folder(tmp_path / "o2", {"seg.dcm": b"S2"}))
    storage.get_outputs(3, 2, tmp_path / "got")
    assert {p.name: p.read_bytes() for p in (tmp_path / "got").iterdir()} == {"seg.dcm": b"S2"}
    with pytest.raises(StorageError, match="job 3 attempt 5"):
        storage.get_outputs(3, 5, tmp_path / "none")


def test_s3_outputs_without_their_marker_are_never_taken(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    """An upload cut off before its completion marker (the worker died between files) does not exist for the
    reader, however many of its files are there."""
    storage = S3Storage(s3_bucket, s3_endpoint, "us-east-1", "site")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.put_object(Bucket=s3_bucket, Key="site/jobs/9/attempt-1/out/files/seg.dcm", Body=b"half")
    with pytest.raises(StorageError, match="not complete"):
        storage.get_outputs(9, 1, tmp_path / "got")
    storage.put_outputs(9, 1, _folder(tmp_path / "o", {"seg.dcm": b"whole"}))
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="site/jobs/9/")["Contents"]}
    assert f"site/jobs/9/attempt-1/out/{COMPLETE}" in keys
    storage.get_outputs(9, 1, tmp_path / "got")
    assert (tmp_path / "got" / "seg.dcm").read_bytes() == b"whole"


def test_a_shared_folder_that_is_not_writable_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    config = parse_config({"data_dir": str(tmp_path), "storage": {"path": str(tmp_path / "a-file" / "shared")}})
    with pytest.raises(StorageError) as refused:
        open_storage(config).check()
    assert "is not writable" in str(refused.value) and "\n" not in str(refused.value)


def test_a_bucket_that_does_not_exist_is_refused_in_one_line(s3_endpoint: str) -> None:
    with pytest.raises(StorageError) as refused:
        S3Storage("no-such-bucket", s3_endpoint, "us-east-1", "site").check()
    assert "s3://no-such-bucket" in str(refused.value) and "NoSuchBucket" in str(refused.value)
