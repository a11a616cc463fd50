"""The distributed engine with its real parts: RabbitMQ (a private node), PostgreSQL, ``radnode serve`` and
``radnode worker`` processes, the CT pipeline on small phantom studies, DCMTK storescu/storescp as the
modalities and the PACS. One cluster (store schema, shared folder, two workers) serves the module."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest

from factories import write_ct_studies
from radnode.node.store import JobState, JobStore
from radnode.peers import StoreSCP
from support.cluster import EngineNode, RabbitNode, WorkerProcess, engine_config, store_snapshot, wait_final
from support.waiting import wait_until

pytestmark = pytest.mark.slow


@dataclass
class Cluster:
    """Two CPU workers on a shared store and folder; tests start their own node (own data, own PACS)."""

    root: Path
    broker_url: str
    store_url: str
    storage: dict
    workers: dict[str, WorkerProcess] = field(default_factory=dict)

    def start_worker(self, name: str, queues: tuple[str, ...] = ()) -> WorkerProcess:
        config = engine_config(self.root / f"{name}.yaml", self.root / f"host-{name}", self.broker_url,
                               self.store_url, self.storage)
        self.workers[name] = worker = WorkerProcess(config, self.root / f"{name}.log", name, queues)
        return worker

    def node(self, folder: Path, pacs: StoreSCP, **sections) -> EngineNode:
        config = engine_config(folder / "node.yaml", folder / "ingress", self.broker_url, self.store_url,
                               self.storage, **sections)
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
    cluster = Cluster(root, rabbitmq.url(), shared_store_url, {"kind": "shared_dir", "path": str(root / "shared")})
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
            for job, _, attempts in store_snapshot(cluster.store_url):
                if job.patient_id in folders and job.state is JobState.RUNNING and job.worker in cluster.workers:
                    victim.update(job=job.id, attempt=job.attempt)
                    victim["worker"] = job.worker  # type: ignore[assignment]
                    return True
            return False
        wait_until(a_job_runs, timeout=180, step=0.2)
        killed = cluster.workers[victim["worker"]]  # type: ignore[index]
        killed.kill()
        jobs = wait_final(cluster.store_url, set(folders), timeout=400)
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
