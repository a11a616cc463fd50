"""The distributed engine's parts for tests: what the benchmark's cluster tooling does not cover (a
simulated host in a network namespace, reading the shared store)."""

from __future__ import annotations

import secrets
import subprocess
import time

from pathlib import Path

from radnode.benchmarks.cluster import open_store
from radnode.node.store import FINAL_STATES, Attempt, Event, Job

def store_snapshot(store_url: str, key: Path, job_ids: set[int] | None = None) -> list[tuple[Job, list[Event], list[Attempt]]]:
    """Every job (or those in ``job_ids``) with its events and attempts, read from the shared store (patient
    IDs opened with the site key file ``key``)."""
    store = open_store(store_url, key)
    try:
        jobs = [j for j in store.jobs() if job_ids is None or j.id in job_ids]
        return [(j, store.events(j.id), store.attempts(j.id)) for j in jobs]
    finally:
        store.close()


def wait_final(store_url: str, key: Path, patients: set[str], timeout: float) -> list[tuple[Job, list[Event], list[Attempt]]]:
    """The jobs of these patients once each has one job and all are final (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = [entry for entry in store_snapshot(store_url, key) if entry[0].patient_id in patients]
        if {j.patient_id for j, _, _ in jobs} == patients and all(j.state in FINAL_STATES for j, _, _ in jobs):
            return jobs
        if time.monotonic() > deadline:
            states = {j.patient_id: (j.id, j.state.value, j.reason) for j, _, _ in jobs}
            raise AssertionError(f"jobs not final within {timeout} s: {states}")
        time.sleep(0.5)


class NetnsHost:
    """A simulated host: a network namespace joined to this machine by a veth pair, with an address on each
    end (``host_address`` here, ``address`` inside); :meth:`cut` takes its link down, as a pulled cable."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.name, self.outside, self.inside = f"rn-{tag}", f"rnh{tag}", f"rnw{tag}"
        subnet = secrets.randbelow(250) + 1
        self.host_address, self.address = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
        for argv in (["ip", "netns", "add", self.name],
                     ["ip", "link", "add", self.outside, "type", "veth", "peer", "name", self.inside],
                     ["ip", "link", "set", self.inside, "netns", self.name],
                     ["ip", "addr", "add", f"{self.host_address}/30", "dev", self.outside],
                     ["ip", "link", "set", self.outside, "up"],
                     ["ip", "netns", "exec", self.name, "ip", "addr", "add", f"{self.address}/30", "dev", self.inside],
                     ["ip", "netns", "exec", self.name, "ip", "link", "set", self.inside, "up"],
                     ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"]):
            subprocess.run(argv, check=True, capture_output=True)

    def cut(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, "ip", "link", "set", self.inside, "down"], check=True)

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
