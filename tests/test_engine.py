"""The distributed engine with its real parts: RabbitMQ (a private node), PostgreSQL, ``radnode serve`` and
``radnode worker`` processes, the CT pipeline on small phantom studies, DCMTK storescu/storescp as the
modalities and the PACS. One cluster (store schema, shared folder, two workers) serves the module."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pydicom
import pytest
import yaml

from factories import write_ct_studies
from radnode.node.store import JobState, JobStore
from radnode.peers import StoreSCP
from radnode.benchmarks.cluster import (
    EngineNode, PrivatePostgres, RabbitNode, WorkerProcess, engine_config, open_store, site_key,
)
from support.cluster import NetnsHost, store_snapshot, wait_final
from support.waiting import wait_until

pytestmark = pytest.mark.slow


@dataclass
class Cluster:
    """Two CPU workers on a shared store and folder; tests start their own node (own data, own PACS)."""

    root: Path
    broker_url: str
    store_url: str
    storage: dict
    key: Path
    """The site key every node of the cluster seals patient IDs with."""
    workers: dict[str, WorkerProcess] = field(default_factory=dict)

    def start_worker(self, name: str, queues: tuple[str, ...] = ()) -> WorkerProcess:
        config = engine_config(self.root / f"{name}.yaml", self.root / f"host-{name}", self.broker_url,
                               self.store_url, self.storage, self.key)
        self.workers[name] = worker = WorkerProcess(config, self.root / f"{name}.log", name, queues)
        return worker

    def node(self, folder: Path, pacs: StoreSCP, **sections) -> EngineNode:
        config = engine_config(folder / "node.yaml", folder / "ingress", self.broker_url, self.store_url,
                               self.storage, self.key, **sections)
        return EngineNode(config, folder / "node.log", self.store_url, pacs.address)

    def wait_workers(self, *names: str) -> None:
        """Until each named worker has reported its heartbeat (it consumes from then on)."""
        def ready() -> bool:
            store = JobStore(self.store_url)
            try:
                alive = {w.name for w in store.workers() if w.stopped_at is None}
            finally:
                store.close()
            return set(names) <= alive
        wait_until(ready, timeout=120, step=0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, rabbitmq: RabbitNode, shared_store_url: str) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    cluster = Cluster(root, rabbitmq.url(), shared_store_url, {"kind": "shared_dir", "path": str(root / "shared")},
                      site_key(root / "site.key"))
    JobStore(shared_store_url).close()  # the schema, before the workers race to create it
    for name in ("worker-a", "worker-b"):
        cluster.start_worker(name)
    cluster.wait_workers("worker-a", "worker-b")
    try:
        yield cluster
    finally:
        for worker in cluster.workers.values():
            worker.stop()


def results_by_study(pacs: StoreSCP) -> tuple[Counter, list[str]]:
    """(study UID, SOP class name) → how many objects the PACS received, and every SOP Instance UID received."""
    counts: Counter = Counter()
    uids = []
    for path in pacs.received():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        counts[(ds.StudyInstanceUID, ds.SOPClassUID.name)] += 1
        uids.append(str(ds.SOPInstanceUID))
    return counts, uids


def assert_each_result_once(pacs: StoreSCP, studies: int) -> None:
    """Every study's SEG and measurement SR arrived exactly once, and no SOP instance arrived twice."""
    counts, uids = results_by_study(pacs)
    assert len(uids) == len(set(uids)), f"an object was delivered twice: {Counter(uids).most_common(3)}"
    for kind in ("Segmentation Storage", "Comprehensive 3D SR Storage"):
        per_study = [n for (study, name), n in counts.items() if name == kind]
        assert per_study == [1] * studies, (kind, counts)


def test_six_studies_two_workers_one_sigkilled_mid_job_each_result_once(
        cluster: Cluster, tmp_path: Path, pacs: StoreSCP) -> None:
    folders = write_ct_studies(tmp_path / "studies", [f"KILL{i}" for i in range(6)])
    node = cluster.node(tmp_path, pacs)
    try:
        senders = [node.send(folder) for folder in folders.values()]
        assert [s.wait(120) for s in senders] == [0] * 6
        victim: dict[str, int] = {}

        def a_job_runs() -> bool:
            for job, events, attempts in store_snapshot(cluster.store_url, cluster.key):
                started = any(e.kind == "running" and e.message.startswith(f"attempt {job.attempt} on worker ")
                              for e in events)  # mid-job: its process started, not just claimed
                if job.patient_id in folders and job.state is JobState.RUNNING and job.worker in cluster.workers \
                        and started:
                    victim.update(job=job.id, attempt=job.attempt)
                    victim["worker"] = job.worker  # type: ignore[assignment]
                    return True
            return False
        wait_until(a_job_runs, timeout=180, step=0.2)
        killed = cluster.workers[victim["worker"]]  # type: ignore[index]
        killed.kill()
        jobs = wait_final(cluster.store_url, cluster.key, set(folders), timeout=400)
    finally:
        node.stop()
        cluster.start_worker(victim["worker"]) if victim else None  # type: ignore[arg-type]
    assert all(j.state is JobState.DONE for j, _, _ in jobs), [(j.id, j.state, j.reason) for j, _, _ in jobs]
    assert_each_result_once(pacs, 6)
    (job, events, attempts), = [entry for entry in jobs if entry[0].id == victim["job"]]
    assert [a.outcome for a in attempts] == ["lost", "completed"], attempts
    assert attempts[0].worker == victim["worker"] and attempts[1].worker != victim["worker"]
    assert "redelivered" in attempts[0].reason or "lease" in attempts[0].reason
    running = [e.message for e in events if e.kind == "running"]
    assert len(running) == 2 and running[0].startswith(f"attempt 1 on worker {attempts[0].worker}") \
        and running[1].startswith(f"attempt 2 on worker {attempts[1].worker}"), running
    every_start = [e.message for _, events, _ in jobs for e in events if e.kind == "running"]
    assert all(m.endswith(", warm process)") for m in every_start), every_start  # workers start jobs warm too


def _rules(path: Path, queue: str, stat_patient: str | None = None) -> Path:
    """CT to ct_tissue on ``queue`` (so only the workers serving it take the jobs); one patient's study stat."""
    rules = [{"name": "ct", "when": {"Modality": "CT", "SOPClassUID": "CT Image Storage"},
              "pipelines": ["ct_tissue"], "queue": queue}]
    if stat_patient:
        rules.append({"name": "stat", "when": {"PatientID": stat_patient}, "priority": "stat"})
    path.write_text(yaml.safe_dump({"rules": rules}))
    return path


def _started_order(store_url: str, key: Path, patients: set[str]) -> list[str]:
    """The patients in the order their first attempt started."""
    starts = [(attempts[0].started_at, job.patient_id) for job, _, attempts in store_snapshot(store_url, key)
              if job.patient_id in patients and attempts]
    return [patient for _, patient in sorted(starts)]


def test_a_stat_study_queued_behind_three_routine_ones_runs_next(cluster: Cluster, tmp_path: Path,
                                                                  pacs: StoreSCP) -> None:
    """Three routine studies and then a stat one wait in the broker for the queue's one worker; when it starts
    it takes the stat job first, then the routine ones in their order. (The worker starts only once all four
    are published: a worker already running would finish a small study before the next one is queued, and the
    test would prove nothing about priorities.)"""
    folders = write_ct_studies(tmp_path / "studies", ["ROUTINE1", "ROUTINE2", "ROUTINE3", "STAT1"])
    node = cluster.node(tmp_path, pacs, rules=str(_rules(tmp_path / "rules.yaml", "solo", "STAT1")))
    solo = None
    try:
        store = open_store(cluster.store_url, cluster.key)
        try:
            for patient in ("ROUTINE1", "ROUTINE2", "ROUTINE3", "STAT1"):
                assert node.send(folders[patient]).wait(60) == 0
                wait_until(lambda: not store.unpublished() and patient in
                           {j.patient_id for j in store.jobs() if j.state is JobState.QUEUED}, timeout=60, step=0.2)
        finally:
            store.close()
        solo = cluster.start_worker("worker-solo", queues=("solo",))
        jobs = wait_final(cluster.store_url, cluster.key, set(folders), timeout=400)
    finally:
        node.stop()
        if solo is not None:
            solo.stop()
            del cluster.workers["worker-solo"]
    assert all(j.state is JobState.DONE for j, _, _ in jobs), [(j.id, j.state, j.reason) for j, _, _ in jobs]
    assert {j.worker for j, _, _ in jobs} == {"worker-solo"}  # the queue's only worker ran them all
    assert _started_order(cluster.store_url, cluster.key, set(folders)) == ["STAT1", "ROUTINE1", "ROUTINE2", "ROUTINE3"]
    assert_each_result_once(pacs, 4)


def test_broker_stopped_for_60_s_while_studies_arrive_then_everything_completes_once(
        cluster: Cluster, rabbitmq: RabbitNode, tmp_path: Path, pacs: StoreSCP) -> None:
    """A job runs when RabbitMQ stops; two more studies arrive during the 60 s outage (ingress accepts them,
    their jobs wait in the store's outbox); after the restart every study is delivered once."""
    folders = write_ct_studies(tmp_path / "studies", ["OUTAGE1", "OUTAGE2", "OUTAGE3"])
    node = cluster.node(tmp_path, pacs)
    try:
        assert node.send(folders["OUTAGE1"]).wait(60) == 0
        wait_until(lambda: _started_order(cluster.store_url, cluster.key, {"OUTAGE1"}) == ["OUTAGE1"], timeout=120, step=0.2)
        rabbitmq.stop_app()
        stopped = time.monotonic()
        try:
            for patient in ("OUTAGE2", "OUTAGE3"):
                assert node.send(folders[patient]).wait(60) == 0  # ingress keeps accepting
            store = open_store(cluster.store_url, cluster.key)
            try:
                wait_until(lambda: len(store.unpublished()) == 2, timeout=50, step=0.5)  # queued in the store
            finally:
                store.close()
            time.sleep(max(0.0, 60 - (time.monotonic() - stopped)))
        finally:
            rabbitmq.start_app()
        jobs = wait_final(cluster.store_url, cluster.key, set(folders), timeout=400)
    finally:
        node.stop()
    assert all(j.state is JobState.DONE for j, _, _ in jobs), [(j.id, j.state, j.reason) for j, _, _ in jobs]
    assert all(len([e for e in events if e.kind == "finished"]) == 1 for _, events, _ in jobs)
    assert_each_result_once(pacs, 3)
    assert "broker unreachable" in node.log_text() and "reachable again" in node.log_text()


def test_s3_storage_end_to_end_with_no_shared_folder_between_hosts(
        cluster: Cluster, tmp_path: Path, pacs: StoreSCP, s3_endpoint: str, s3_bucket: str) -> None:
    """The node and the worker keep nothing in common on disk: the study goes up to S3 once, the results
    come back from S3, and each arrives at the PACS once."""
    folders = write_ct_studies(tmp_path / "studies", ["S3A", "S3B"])
    storage = {"kind": "s3", "endpoint": s3_endpoint, "bucket": s3_bucket, "prefix": "site"}
    worker_config = engine_config(tmp_path / "s3-worker.yaml", tmp_path / "worker-host", cluster.broker_url,
                                  cluster.store_url, storage, cluster.key)
    worker = WorkerProcess(worker_config, tmp_path / "s3-worker.log", "worker-s3", queues=("s3-hosts",))
    node_config = engine_config(tmp_path / "node.yaml", tmp_path / "ingress-host", cluster.broker_url,
                                cluster.store_url, storage, cluster.key,
                                rules=str(_rules(tmp_path / "rules.yaml", "s3-hosts")))
    node = EngineNode(node_config, tmp_path / "node.log", cluster.store_url, pacs.address)
    try:
        cluster.wait_workers("worker-s3")
        senders = [node.send(folder) for folder in folders.values()]
        assert [s.wait(60) for s in senders] == [0, 0]
        jobs = wait_final(cluster.store_url, cluster.key, set(folders), timeout=400)
    finally:
        node.stop()
        worker.stop()
    assert all(j.state is JobState.DONE and j.worker == "worker-s3" for j, _, _ in jobs), \
        [(j.id, j.state, j.reason) for j, _, _ in jobs]
    assert_each_result_once(pacs, 2)
    assert not (tmp_path / "ingress-host" / "shared").exists() and not (tmp_path / "worker-host" / "shared").exists()
    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
            .list_objects_v2(Bucket=s3_bucket, Prefix="site/jobs/")["Contents"]}
    for job, _, _ in jobs:
        inputs = [k for k in keys if re.match(rf"site/jobs/{job.id}/in-\d+/files/", k)]
        assert len(inputs) == 16, inputs  # the study, uploaded once (one dispatch)
        assert f"site/jobs/{job.id}/attempt-1/out/complete.json" in keys


def test_postgresql_restarted_mid_run_then_everything_completes_once(
        tmp_path: Path, rabbitmq: RabbitNode, pacs: StoreSCP) -> None:
    """The job store's server goes down for 5 s while a job runs on a worker and another waits: the node, the
    worker and the leader lock reconnect, and each study is delivered once."""
    database = PrivatePostgres()
    storage = {"kind": "shared_dir", "path": str(tmp_path / "shared")}
    key = site_key(tmp_path / "site.key")
    try:
        JobStore(database.url()).close()
        worker = WorkerProcess(engine_config(tmp_path / "w.yaml", tmp_path / "host-w", rabbitmq.url(), database.url(),
                                             storage, key), tmp_path / "w.log", "worker-pg", queues=("pg",))
        node = EngineNode(engine_config(tmp_path / "node.yaml", tmp_path / "ingress", rabbitmq.url(), database.url(),
                                        storage, key, rules=str(_rules(tmp_path / "rules.yaml", "pg"))),
                          tmp_path / "node.log", database.url(), pacs.address)
        try:
            folders = write_ct_studies(tmp_path / "studies", ["PGRESTART1", "PGRESTART2"])
            senders = [node.send(folder) for folder in folders.values()]
            assert [s.wait(60) for s in senders] == [0, 0]
            wait_until(lambda: _started_order(database.url(), key, set(folders)), timeout=120, step=0.2)
            database.stop()
            time.sleep(5)
            database.start()
            jobs = wait_final(database.url(), key, set(folders), timeout=400)
        finally:
            node.stop()
            worker.stop()
    finally:
        database.close()
    assert all(j.state is JobState.DONE for j, _, _ in jobs), [(j.id, j.state, j.reason) for j, _, _ in jobs]
    assert all(len([e for e in events if e.kind == "finished"]) == 1 for _, events, _ in jobs)
    assert_each_result_once(pacs, 2)


def test_a_claim_the_store_cannot_take_in_time_goes_back_to_the_broker_and_is_taken_later(
        tmp_path: Path, rabbitmq: RabbitNode) -> None:
    """The job store is down past the worker's patience while a job's message reaches it: the claim cannot be
    made, and the message must not be acknowledged (the job would stay queued for good, nothing on its way to
    it); once the store is back, the redelivered message is claimed, as the job's first attempt."""
    from radnode.config import load_config
    from radnode.node.engine.broker import TASK, celery_app, job_queue
    from radnode.node.store import Instance
    from radnode.pipelines.routing import SeriesDecision

    database = PrivatePostgres()
    storage = {"kind": "shared_dir", "path": str(tmp_path / "shared")}
    try:
        store = JobStore(database.url())
        try:
            _, job_id = store.record_instance(Instance("1.1", "1.2.3", "1.2.3.1", "P1", "CT",
                                                       "1.2.840.10008.5.1.4.1.1.2", "/spool/1.1.dcm"),
                                              SeriesDecision(("ct_tissue",)))
            assert store.queue_job(job_id, "idle") is JobState.QUEUED
            dispatch_id = store.dispatch(job_id, "claims", 0)
        finally:
            store.close()
        config = engine_config(tmp_path / "w.yaml", tmp_path / "host-w", rabbitmq.url(), database.url(), storage,
                               site_key(tmp_path / "site.key"), engine={"report_patience_seconds": 2})
        worker = WorkerProcess(config, tmp_path / "w.log", "worker-claims", queues=("claims",))
        app = celery_app(load_config(config).engine, [])
        try:
            wait_until(lambda: _workers_alive(database.url(), "worker-claims"), timeout=120, step=0.5)
            database.stop()
            app.send_task(TASK, args=[job_id, dispatch_id], queue=job_queue("claims"), retry=True,  # a connection
                          retry_policy={"max_retries": 5, "interval_start": 0.5})  # reset while busy: publish again
            wait_until(lambda: "its message goes back to the broker" in (tmp_path / "w.log").read_text(),
                       timeout=60, step=0.5)
            time.sleep(3)  # a second delivery's claim gives up too
            database.start()

            def claimed() -> bool:
                store = JobStore(database.url())
                try:
                    return store.job(job_id).attempt >= 1
                finally:
                    store.close()
            wait_until(claimed, timeout=120, step=0.5)
        finally:
            app.close()
            worker.stop()
        store = JobStore(database.url())
        try:
            job = store.job(job_id)
            assert job.attempt == 1, "a claim the store never took counted as an attempt"
            assert job.state in (JobState.RUNNING, JobState.FAILED), (job.state, job.reason)
        finally:
            store.close()
    finally:
        database.close()


def _workers_alive(store_url: str, *names: str) -> bool:
    store = JobStore(store_url)
    try:
        return set(names) <= {w.name for w in store.workers() if w.stopped_at is None}
    finally:
        store.close()


def test_a_worker_host_cut_off_mid_job_has_its_job_run_on_another_within_the_bound(
        tmp_path: Path, rabbitmq: RabbitNode, pacs: StoreSCP) -> None:
    """Two studies on two workers, one of them on a host of its own (a network namespace); that host's link
    goes down while it runs its job. The job is back in the queue within the README's bound (lease_seconds
    + 5 s: RabbitMQ's heartbeat check or the reaper, whichever comes first) and runs on the other worker as
    soon as that one is free; each result reaches the PACS once."""
    host = NetnsHost()
    database = PrivatePostgres(allow_network="10.213.0.0/16")
    storage = {"kind": "shared_dir", "path": str(tmp_path / "shared")}
    key = site_key(tmp_path / "site.key")
    lease = 9.0  # engine_config's
    try:
        JobStore(database.url()).close()
        inside = engine_config(tmp_path / "cut.yaml", tmp_path / "host-cut", rabbitmq.url(host.host_address),
                               database.url(host.host_address), storage, key)
        outside = engine_config(tmp_path / "other.yaml", tmp_path / "host-other", rabbitmq.url(), database.url(),
                                storage, key)
        workers = [WorkerProcess(inside, tmp_path / "cut.log", "worker-cut", queues=("netns",), netns=host.name),
                   WorkerProcess(outside, tmp_path / "other.log", "worker-other", queues=("netns",))]
        node = EngineNode(engine_config(tmp_path / "node.yaml", tmp_path / "ingress", rabbitmq.url(), database.url(),
                                        storage, key, rules=str(_rules(tmp_path / "rules.yaml", "netns"))),
                          tmp_path / "node.log", database.url(), pacs.address)
        try:
            wait_until(lambda: _workers_alive(database.url(), "worker-cut", "worker-other"), timeout=120, step=0.5)
            folders = write_ct_studies(tmp_path / "studies", ["NETNS1", "NETNS2"])
            senders = [node.send(folder) for folder in folders.values()]
            assert [s.wait(60) for s in senders] == [0, 0]
            on_cut: dict[str, int] = {}

            def runs_on_cut_host() -> bool:
                for job, _, _ in store_snapshot(database.url(), key):
                    if job.state is JobState.RUNNING and job.worker == "worker-cut":
                        on_cut["job"] = job.id
                        return True
                return False
            wait_until(runs_on_cut_host, timeout=120, step=0.1)
            host.cut()
            cut_at = time.time()
            jobs = wait_final(database.url(), key, set(folders), timeout=400)
        finally:
            node.stop()
            for worker in workers:
                worker.stop()
    finally:
        database.close()
        host.close()
    assert all(j.state is JobState.DONE for j, _, _ in jobs), [(j.id, j.state, j.reason) for j, _, _ in jobs]
    assert_each_result_once(pacs, 2)
    (_, _, attempts), = [entry for entry in jobs if entry[0].id == on_cut["job"]]
    (_, _, other_attempts), = [entry for entry in jobs if entry[0].id != on_cut["job"]]
    assert [(a.worker, a.outcome) for a in attempts] == [("worker-cut", "lost"), ("worker-other", "completed")]
    other_free_at = max([cut_at] + [a.ended_at or 0 for a in other_attempts if a.worker == "worker-other"
                                    and a.started_at < attempts[1].started_at])
    back_in_queue = cut_at + lease + 5
    assert attempts[1].started_at <= max(back_in_queue, other_free_at) + 2, \
        (attempts[1].started_at - cut_at, other_free_at - cut_at)
