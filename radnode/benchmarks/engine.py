"""The distributed engine (``engine.kind: celery``) on this machine: studies per hour with one and with two
workers (ratio side by side), the time from a worker's death to its job running on another, and the
engine's overhead per job (queued → running) beside the local executor's.

Real parts throughout: a private RabbitMQ node and PostgreSQL server, ``radnode serve`` and ``radnode
worker`` processes, phantom CT studies sent with DCMTK storescu, DCMTK storescp as the PACS. Skipped (and
said so) where RabbitMQ or PostgreSQL is not installed or the run is not root (the private servers need it).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import yaml

from radnode.benchmarks.cluster import (
    PG_BIN, RABBITMQ_SERVER, EngineNode, PrivatePostgres, RabbitNode, WorkerProcess, engine_config, open_store,
    site_key,
)
from radnode.config import Config
from radnode.node.service import Node
from radnode.node.store import FINAL_STATES, JobState, JobStore
from radnode.peers import StoreSCP
from radnode.phantom import make_ct_phantom, write_ct_series

TIMEOUT_SECONDS = 900.0


def _studies(root: Path, tag: str, count: int, slices: int) -> dict[str, Path]:
    folders = {}
    for i in range(count):
        patient = f"{tag}{i}"
        write_ct_series(make_ct_phantom(slices, 128, seed=i), root / patient, patient_id=patient)
        folders[patient] = root / patient
    return folders


def _final(store_url: str, key: Path, patients: set[str]) -> list:
    """The jobs of these patients once all are final, with events and attempts."""
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        store = open_store(store_url, key)
        try:
            jobs = [j for j in store.jobs() if j.patient_id in patients]
            if {j.patient_id for j in jobs} == patients and all(j.state in FINAL_STATES for j in jobs):
                failed = [j for j in jobs if j.state is not JobState.DONE]
                if failed:
                    raise RuntimeError(f"job {failed[0].id} failed: {failed[0].reason}")
                return [(j, store.events(j.id), store.attempts(j.id)) for j in jobs]
        finally:
            store.close()
        time.sleep(0.2)
    raise TimeoutError(f"jobs not final within {TIMEOUT_SECONDS:.0f} s")


class _Cluster:
    def __init__(self, work: Path, broker: str, store_url: str) -> None:
        self.work, self.broker, self.store_url = work, broker, store_url
        self.storage = {"kind": "shared_dir", "path": str(work / "shared")}
        self.key = site_key(work / "site.key")
        rules = work / "rules.yaml"
        rules.write_text(yaml.safe_dump({"rules": [{"name": "ct", "when": {"Modality": "CT"},
                                                    "pipelines": ["ct_tissue"], "queue": "bench"}]}))
        self.rules = rules

    def workers(self, tag: str, count: int) -> list[WorkerProcess]:
        started = []
        for i in range(count):
            config = engine_config(self.work / f"{tag}-w{i}.yaml", self.work / f"{tag}-host{i}", self.broker,
                                   self.store_url, self.storage, self.key)
            started.append(WorkerProcess(config, self.work / f"{tag}-w{i}.log", f"{tag}-w{i}", queues=("bench",)))
        names = {w.name for w in started}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            store = JobStore(self.store_url)
            try:
                if names <= {w.name for w in store.workers() if w.stopped_at is None}:
                    return started
            finally:
                store.close()
            time.sleep(0.5)
        raise TimeoutError("workers did not report")

    def node(self, tag: str, pacs: StoreSCP) -> EngineNode:
        config = engine_config(self.work / f"{tag}-node.yaml", self.work / f"{tag}-ingress", self.broker,
                               self.store_url, self.storage, self.key, rules=str(self.rules))
        return EngineNode(config, self.work / f"{tag}-node.log", self.store_url, pacs.address)


def _throughput(cluster: _Cluster, pacs: StoreSCP, n_workers: int, studies: int, slices: int) -> dict:
    tag = f"TP{n_workers}W"
    folders = _studies(cluster.work / "studies", tag, studies, slices)
    workers = cluster.workers(tag.lower(), n_workers)
    node = cluster.node(tag.lower(), pacs)
    try:
        started = time.time()
        senders = [node.send(folder) for folder in folders.values()]
        for sender in senders:
            sender.wait(120)
        jobs = _final(cluster.store_url, cluster.key, set(folders))
    finally:
        node.stop()
        for worker in workers:
            worker.stop()
    finished = max(next(e.at for e in events if e.kind == "done") for _, events, _ in jobs)
    seconds = finished - started
    return {"studies": studies, "seconds": round(seconds, 1), "studies_per_hour": round(studies * 3600 / seconds, 1)}


def _worker_death(cluster: _Cluster, pacs: StoreSCP, slices: int) -> dict:
    folders = _studies(cluster.work / "studies", "DEATH", 1, slices)
    workers = {w.name: w for w in cluster.workers("death", 2)}
    node = cluster.node("death", pacs)
    try:
        for sender in [node.send(folder) for folder in folders.values()]:
            sender.wait(120)
        deadline = time.monotonic() + TIMEOUT_SECONDS
        victim = None
        while victim is None and time.monotonic() < deadline:
            store = open_store(cluster.store_url, cluster.key)
            try:
                victim = next((j for j in store.jobs() if j.patient_id in folders and j.state is JobState.RUNNING), None)
            finally:
                store.close()
            time.sleep(0.05)
        assert victim is not None, "the job never ran"
        killed_at = time.time()  # before the signal: the broker may hand the job on before kill() returns
        workers[victim.worker].kill()
        ((job, _, attempts),) = _final(cluster.store_url, cluster.key, set(folders))
    finally:
        node.stop()
        for worker in workers.values():
            worker.stop()
    return {"killed": victim.worker, "ran_again_on": attempts[-1].worker,
            "death_to_running_elsewhere_seconds": round(attempts[-1].started_at - killed_at, 2),
            "first_attempt_ended": attempts[0].reason}


def _engine_overhead(cluster: _Cluster, pacs: StoreSCP, repeats: int, slices: int) -> list[float]:
    """Queued → running (the worker's claim), one study at a time on an idle worker."""
    workers = cluster.workers("overhead", 1)
    node = cluster.node("overhead", pacs)
    samples = []
    try:
        for i in range(repeats):
            folders = _studies(cluster.work / "studies", f"OVERHEAD{i}_", 1, slices)
            node.send(next(iter(folders.values()))).wait(120)
            ((_, events, attempts),) = _final(cluster.store_url, cluster.key, set(folders))
            queued = next(e.at for e in events if e.kind == "queued")
            samples.append(attempts[0].started_at - queued)
    finally:
        node.stop()
        for worker in workers:
            worker.stop()
    return samples


def _local_overhead(work: Path, pacs: StoreSCP, repeats: int, slices: int) -> list[float]:
    """The same on the local executor (a node without engine settings, SQLite)."""
    from radnode.benchmarks import BENCH_API, send_files

    config = Config.model_validate({"data_dir": str(work / "local-node"), "ingress": {"host": "127.0.0.1", "port": 0},
                                    "egress": {"destinations": {"pacs": pacs.destination}}, "api": BENCH_API})
    samples = []
    with Node(config) as node:
        for i in range(repeats):
            folders = _studies(work / "studies", f"LOCAL{i}_", 1, slices)
            send_files(node.port, config.ingress.ae_title, sorted(next(iter(folders.values())).iterdir()))
            deadline = time.monotonic() + TIMEOUT_SECONDS
            while time.monotonic() < deadline:
                jobs = [j for j in node.jobs() if j.patient_id in folders]
                if jobs and jobs[0].state in FINAL_STATES:
                    break
                time.sleep(0.1)
            at = {e.kind: e.at for e in node.events(jobs[0].id)}
            samples.append(at["running"] - at["queued"])
    return samples


def run(work: Path, studies: int = 4, slices: int = 20, overhead_repeats: int = 3) -> dict:
    """Every figure of the section (see the module docstring)."""
    missing = [str(p) for p in (RABBITMQ_SERVER, PG_BIN / "initdb") if not p.exists()]
    if missing or os.geteuid() != 0:
        return {"skipped": f"needs {', '.join(missing)} (scripts/bootstrap.sh)" if missing else
                "needs root (private RabbitMQ and PostgreSQL servers)"}
    work.mkdir(parents=True, exist_ok=True)
    rabbit = RabbitNode(work / "rabbitmq")
    database = PrivatePostgres()
    try:
        JobStore(database.url()).close()
        cluster = _Cluster(work, rabbit.url(), database.url())
        with StoreSCP(work / "pacs", ae_title="PACS") as pacs:
            one = _throughput(cluster, pacs, 1, studies, slices)
            two = _throughput(cluster, pacs, 2, studies, slices)
            death = _worker_death(cluster, pacs, slices)
            engine = _engine_overhead(cluster, pacs, overhead_repeats, slices)
            local = _local_overhead(work, pacs, overhead_repeats, slices)
    finally:
        database.close()
        rabbit.close()
    return {"slices": slices, "throughput": {"1": one, "2": two,
                                             "two_over_one": round(two["studies_per_hour"] / one["studies_per_hour"], 2)},
            "worker_death": death,
            "queued_to_running_seconds": {"celery": {"median": round(statistics.median(engine), 3),
                                                     "samples": [round(s, 3) for s in engine]},
                                          "local": {"median": round(statistics.median(local), 3),
                                                    "samples": [round(s, 3) for s in local]}}}
