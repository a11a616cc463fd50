"""Egress against real peers: DCMTK storescp as the PACS, a local HTTP server as the FHIR endpoint.

Also holds the receiver helpers the node tests share.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest

from radnode.config import Config, DicomPeer
from radnode.node.egress import Egress, outbox_dir
from radnode.node.store import Instance, JobState, JobStore
from test_scp import ECHOSCU, free_port, write_study

STORESCP = "/usr/bin/storescp"


def wait_until(condition: Callable[[], object], timeout: float = 20.0, step: float = 0.05) -> None:
    """Poll until ``condition()`` is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(step)


class StoreSCP:
    """DCMTK storescp writing every received instance to its own file (``+uf``: repeats stay visible)."""

    def __init__(self, folder: Path, ae_title: str = "PACS", port: int | None = None) -> None:
        self.folder, self.ae_title, self.port = folder, ae_title, port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def peer(self) -> DicomPeer:
        return DicomPeer(ae_title=self.ae_title, host="127.0.0.1", port=self.port)

    def start(self) -> "StoreSCP":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([STORESCP, "-aet", self.ae_title, "+uf", "-od", str(self.folder),
                                         str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: subprocess.run([ECHOSCU, "-aec", self.ae_title, "127.0.0.1", str(self.port)],
                                          capture_output=True).returncode == 0)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def received(self) -> list[str]:
        """SOP Instance UIDs of every file received, repeats included."""
        return [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in self.folder.iterdir()]


class FhirServer:
    """A FHIR endpoint on loopback that answers 200 to a POSTed Bundle and keeps what it got."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, str, dict]] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                posts.append((self.path, self.headers["Content-Type"], json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.end_headers()
                self.wfile.write(b'{"resourceType": "Bundle", "type": "transaction-response"}')

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    receiver = StoreSCP(tmp_path / "pacs").start()
    yield receiver
    receiver.stop()


@pytest.fixture
def fhir() -> Iterator[FhirServer]:
    server = FhirServer()
    yield server
    server.stop()


def finished_job(store: JobStore, tmp_path: Path, calling_ae: str = "SCANNER") -> tuple[int, Path, list[str]]:
    """A job whose run just ended, with two DICOM outputs, a FHIR Bundle and a manifest in ``out/``."""
    _, job_id = store.record_instance(
        Instance("1.2.3.1", "1.2.3", "1.2.3.4", "P1", "CT", "1.2.840.10008.5.1.4.1.1.2", "/spool/x.dcm",
                 calling_ae, "127.0.0.1:5000", "a1", 0.0), "ct_tissue")
    store.queue_complete_studies(idle_seconds=1)
    store.start_job(job_id, "run")
    out = tmp_path / "out"
    results = write_study(out, n=2)
    (out / "fhir-bundle.json").write_text(json.dumps({"resourceType": "Bundle", "type": "transaction"}))
    (out / "manifest.json").write_text("{}")
    return job_id, out, [pydicom.dcmread(p).SOPInstanceUID for p in results]


def egress_config(tmp_path: Path, **egress: object) -> Config:
    settings = {"retry_initial_seconds": 0.1, "retry_max_seconds": 0.4, "max_attempts": 30, "timeout_seconds": 5}
    return Config.model_validate({"data_dir": str(tmp_path / "data"), "egress": {**settings, **egress}})


def deliver_until_settled(egress: Egress, store: JobStore, job_id: int, timeout: float = 20.0) -> JobState:
    """Drive egress the way the node's egress thread does, until the job is final."""
    def settled() -> bool:
        egress.deliver_due()
        job = store.job(job_id)
        return job is not None and job.state in (JobState.DONE, JobState.FAILED)

    wait_until(settled, timeout, step=0.05)
    job = store.job(job_id)
    assert job is not None
    return job.state


def test_results_reach_pacs_fhir_and_outbox(tmp_path: Path, pacs: StoreSCP, fhir: FhirServer) -> None:
    config = egress_config(tmp_path, destinations=[pacs.peer.model_dump()], fhir_url=fhir.url)
    store = JobStore(tmp_path / "data" / "radnode.db")
    job_id, out, uids = finished_job(store, tmp_path)
    egress = Egress(config, store)
    egress.stage(job_id, out)
    assert sorted(p.name for p in outbox_dir(config, job_id).iterdir()) == sorted(p.name for p in out.iterdir())
    assert deliver_until_settled(egress, store, job_id) is JobState.DONE
    assert sorted(pacs.received()) == sorted(uids)
    assert [(path, ctype) for path, ctype, _ in fhir.posts] == [("/fhir", "application/fhir+json")]
    assert all(d.state == "done" and d.attempts == 1 for d in store.deliveries(job_id))
    store.close()


def test_destination_down_then_up_gets_results_after_retries(tmp_path: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs")
    config = egress_config(tmp_path, destinations=[pacs.peer.model_dump()])
    store = JobStore(tmp_path / "data" / "radnode.db")
    job_id, out, uids = finished_job(store, tmp_path)
    egress = Egress(config, store)
    egress.stage(job_id, out)
    wait_until(lambda: egress.deliver_due() or all(d.attempts >= 3 for d in store.deliveries(job_id)))
    job = store.job(job_id)
    assert job is not None and job.state is JobState.DELIVERING
    assert all("association with PACS@127.0.0.1" in (d.last_error or "") for d in store.deliveries(job_id))
    pacs.start()
    try:
        assert deliver_until_settled(egress, store, job_id) is JobState.DONE
        assert sorted(pacs.received()) == sorted(uids)
    finally:
        pacs.stop()
    assert all(d.attempts >= 4 and d.last_error is None for d in store.deliveries(job_id))
    store.close()


def test_attempts_exhausted_fail_the_job_results_stay_in_outbox(tmp_path: Path, fhir: FhirServer) -> None:
    down = DicomPeer(ae_title="PACS", host="127.0.0.1", port=free_port())
    config = egress_config(tmp_path, destinations=[down.model_dump()], fhir_url=fhir.url, max_attempts=2)
    store = JobStore(tmp_path / "data" / "radnode.db")
    job_id, out, _ = finished_job(store, tmp_path)
    egress = Egress(config, store)
    egress.stage(job_id, out)
    assert deliver_until_settled(egress, store, job_id) is JobState.FAILED
    job = store.job(job_id)
    assert job is not None and job.reason is not None
    assert f"to dicom:{down} failed after 2 attempts: association with {down}" in job.reason
    assert len(fhir.posts) == 1  # the destination that worked got its delivery
    shutil.rmtree(out)
    assert (outbox_dir(config, job_id) / "fhir-bundle.json").is_file()
    assert len(list(outbox_dir(config, job_id).glob("*.dcm"))) == 2
    store.close()


def test_return_to_sender_uses_the_known_address_of_the_calling_ae(tmp_path: Path, pacs: StoreSCP) -> None:
    sender = StoreSCP(tmp_path / "scanner", ae_title="SCANNER").start()
    try:
        config = egress_config(tmp_path, destinations=[pacs.peer.model_dump()],
                               known_peers=[sender.peer.model_dump()])
        store = JobStore(tmp_path / "data" / "radnode.db")
        job_id, out, uids = finished_job(store, tmp_path, calling_ae="SCANNER")
        egress = Egress(config, store)
        egress.stage(job_id, out)
        assert deliver_until_settled(egress, store, job_id) is JobState.DONE
        assert sorted(sender.received()) == sorted(pacs.received()) == sorted(uids)
        store.close()
    finally:
        sender.stop()
