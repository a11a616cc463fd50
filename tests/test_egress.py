"""Egress against real peers: DCMTK storescp as the PACS, a sekmet FHIR R4 server as the EHR."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import CTImageStorage

from factories import PATIENT_BUNDLE, job_ready_for_delivery, write_study
from radnode.config import Config, DicomPeer
from radnode.node.egress import Egress, outbox_dir
from radnode.node.service import Node
from radnode.node.store import JobState, JobStore
from radnode.peers import FhirServer, StoreSCP, free_port
from support.dicom_tools import storescu
from support.node import final_job, node_config, patients
from support.waiting import wait_until


def finished_job(store: JobStore, tmp_path: Path, calling_ae: str = "SCANNER") -> tuple[int, Path, list[str]]:
    """A job (of a new study) whose run just ended, with two DICOM outputs, a FHIR Bundle and a manifest in ``out/``."""
    job_id = job_ready_for_delivery(store, calling_ae)
    out = tmp_path / "out"
    results = write_study(out, n=2)
    (out / "fhir-bundle.json").write_text(json.dumps(PATIENT_BUNDLE))
    (out / "manifest.json").write_text("{}")
    return job_id, out, [pydicom.dcmread(p).SOPInstanceUID for p in results]


def egress_config(tmp_path: Path, **egress: object) -> Config:
    settings = {"retry_initial_seconds": 0.1, "retry_max_seconds": 0.4, "max_attempts": 30,
                "timeouts": {"connect_seconds": 5, "acse_seconds": 5, "dimse_seconds": 5, "network_seconds": 5}}
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
    config = egress_config(tmp_path, destinations={"pacs": pacs.destination, "ehr": fhir.destination})
    store = JobStore(tmp_path / "data" / "radnode.db")
    job_id, out, uids = finished_job(store, tmp_path)
    egress = Egress(config, store)
    egress.stage(job_id, out)
    assert sorted(p.name for p in outbox_dir(config, job_id).iterdir()) == sorted(p.name for p in out.iterdir())
    assert deliver_until_settled(egress, store, job_id) is JobState.DONE
    assert sorted(pacs.received_uids()) == sorted(uids)
    assert patients(fhir) == 1
    assert all(d.state == "done" and d.attempts == 1 for d in store.deliveries(job_id))
    assert sorted(d.sent_uid for d in store.deliveries(job_id) if d.destination == "pacs") == sorted(uids)
    store.close()



def test_results_of_an_older_job_never_replace_a_later_jobs_of_the_same_pipeline(tmp_path: Path, pacs: StoreSCP) -> None:
    """A sibling still running on the first part of a study when late instances re-run the whole study: the
    re-run's sibling (same pipeline, the whole study) delivers first; the old one's results, finishing after,
    stay in its outbox and go nowhere (sent, they would replace the newer ones at the PACS and in the EHR)."""
    from radnode.node.store import Instance
    from radnode.pipelines.routing import Completeness, LateInstances, SeriesDecision

    def arrive(sop: str) -> int:
        return store.record_instance(Instance(sop, "1.2.3", "1.2.3.1", "P1", "CT", str(CTImageStorage), f"/spool/{sop}",
                                              "SCANNER", "127.0.0.1:5000", "a1", time.time()), decision)[1]

    config = egress_config(tmp_path, destinations={"pacs": pacs.destination})
    store = JobStore(tmp_path / "data" / "radnode.db")
    decision = SeriesDecision(("ct_tissue", "lung"), completeness=Completeness(late_instances=LateInstances.RERUN))
    main = arrive("1.1")
    store.queue_job(main, "idle")
    old_lung = store.jobs()[-1].id
    assert store.start_job(main, "run") and store.begin_delivery(main, "nothing", [])
    assert store.start_job(old_lung, "run")  # long: still running on instance 1.1 alone
    rerun = arrive("1.2")  # late: the whole study again, with its own lung sibling
    store.queue_job(rerun, "idle")
    new_lung = store.jobs()[-1].id
    assert store.start_job(rerun, "run") and store.begin_delivery(rerun, "nothing", [])
    assert store.start_job(new_lung, "run")
    egress = Egress(config, store)

    newer = write_study(tmp_path / "new", n=2)
    egress.stage(new_lung, newer[0].parent)
    assert deliver_until_settled(egress, store, new_lung) is JobState.DONE
    older = write_study(tmp_path / "old", n=2)
    egress.stage(old_lung, older[0].parent)
    assert store.job(old_lung).state is JobState.DONE and store.deliveries(old_lung) == []
    assert sorted(pacs.received_uids()) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in newer)
    assert len(list(outbox_dir(config, old_lung).glob("*.dcm"))) == 2
    finished = [e.message for e in store.events(old_lung) if e.kind == "finished"][-1]
    assert finished == (f"2 outputs copied to the outbox; not delivered: job {new_lung}, made later from more of the "
                        "study, delivered its lung results first; these are out of date")
    store.close()


def test_egress_stopped_during_a_slow_send_and_started_again_runs_one_worker_per_destination(
        tmp_path: Path) -> None:
    """Leadership lost while a FHIR server hangs on a POST, then regained (egress stopped, then started): the
    stopped worker ends with its send, and a new one starts only then: never two sending to one destination."""
    hanging = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    hanging.listen()
    config = egress_config(tmp_path, destinations={"ehr": {"type": "fhir", "url": f"http://127.0.0.1:"
                                                                                  f"{hanging.getsockname()[1]}",
                                                           "timeouts": {"network_seconds": 2}}})
    store = JobStore(tmp_path / "data" / "radnode.db")
    job_id, out, _ = finished_job(store, tmp_path)
    egress = Egress(config, store, poll_seconds=0.2)
    try:
        egress.start()
        egress.stage(job_id, out)
        wait_until(lambda: _egress_threads("ehr") == 1)
        time.sleep(0.5)  # the POST is under way, the server holds it
        egress.stop(timeout=0.2)
        egress.start()
        counts = []
        deadline = time.monotonic() + 4  # the stopped worker's send times out after 2 s
        while time.monotonic() < deadline:
            egress.dispatch()  # as the node's egress loop does
            counts.append(_egress_threads("ehr"))
            time.sleep(0.05)
        assert max(counts) == 1 and counts[-1] == 1
    finally:
        egress.stop()
        hanging.close()
        store.close()


def test_a_send_cancelled_by_the_nodes_stop_is_no_attempt_and_goes_at_the_next_start(
        tmp_path: Path, pacs: StoreSCP) -> None:
    """The node stopped while a PACS holds the association open without answering, on the deliveries' only
    attempt: the cancelled send counts as no attempt (no back-off, job not failed), and after the next start,
    the PACS working again, the results go and the job is done."""
    hanging = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    hanging.listen()
    settings = {"max_attempts": 1, "retry_initial_seconds": 60, "retry_max_seconds": 60}
    config = egress_config(tmp_path, destinations={"pacs": f"PACS@127.0.0.1:{hanging.getsockname()[1]}"},
                           **settings)
    store = JobStore(tmp_path / "data" / "radnode.db")
    job_id, out, uids = finished_job(store, tmp_path)
    egress = Egress(config, store)
    try:
        egress.start()
        egress.stage(job_id, out)
        time.sleep(1.0)  # the association request is under way, the peer holds it
        egress.stop()
    finally:
        hanging.close()
    job = store.job(job_id)
    assert job is not None and job.state is JobState.DELIVERING
    assert all(d.state == "pending" and d.attempts == 0 for d in store.deliveries(job_id))
    config = egress_config(tmp_path, destinations={"pacs": pacs.destination}, **settings)
    egress = Egress(config, store)
    try:
        egress.start()
        wait_until(lambda: store.job(job_id).state in (JobState.DONE, JobState.FAILED), 15)
    finally:
        egress.stop()
    assert store.job(job_id).state is JobState.DONE
    assert sorted(pacs.received_uids()) == sorted(uids)
    store.close()


def _egress_threads(name: str) -> int:
    return sum(t.name == f"radnode-egress-{name}" and t.is_alive() for t in threading.enumerate())

def test_destination_down_then_up_gets_results_after_retries(tmp_path: Path) -> None:
    port = free_port()
    config = egress_config(tmp_path, destinations={"pacs": f"PACS@127.0.0.1:{port}"})
    store = JobStore(tmp_path / "data" / "radnode.db")
    job_id, out, uids = finished_job(store, tmp_path)
    egress = Egress(config, store)
    egress.stage(job_id, out)
    wait_until(lambda: egress.deliver_due() or all(d.attempts >= 3 for d in store.deliveries(job_id)))
    job = store.job(job_id)
    assert job is not None and job.state is JobState.DELIVERING
    assert all(f"cannot connect to PACS@127.0.0.1:{port}: connection refused" in (d.last_error or "")
               for d in store.deliveries(job_id))
    with StoreSCP(tmp_path / "pacs", port=port) as pacs:
        assert deliver_until_settled(egress, store, job_id) is JobState.DONE
        assert sorted(pacs.received_uids()) == sorted(uids)
    assert all(d.attempts >= 4 and d.last_error is None for d in store.deliveries(job_id))
    store.close()


def test_attempts_exhausted_fail_the_job_results_stay_in_outbox(tmp_path: Path, fhir: FhirServer) -> None:
    down = DicomPeer(ae_title="PACS", host="127.0.0.1", port=free_port())
    config = egress_config(tmp_path, destinations={"pacs": str(down), "ehr": fhir.destination}, max_attempts=2)
    store = JobStore(tmp_path / "data" / "radnode.db")
    job_id, out, _ = finished_job(store, tmp_path)
    egress = Egress(config, store)
    egress.stage(job_id, out)
    assert deliver_until_settled(egress, store, job_id) is JobState.FAILED
    job = store.job(job_id)
    assert job is not None and job.reason is not None
    assert f"to pacs failed after 2 attempts: cannot connect to {down}: connection refused" in job.reason
    assert patients(fhir) == 1  # the destination that worked got its delivery
    shutil.rmtree(out)
    assert (outbox_dir(config, job_id) / "fhir-bundle.json").is_file()
    assert len(list(outbox_dir(config, job_id).glob("*.dcm"))) == 2
    store.close()


def test_return_to_sender_uses_the_known_address_of_the_calling_ae(tmp_path: Path, pacs: StoreSCP) -> None:
    with StoreSCP(tmp_path / "scanner", ae_title="SCANNER") as sender:
        config = egress_config(tmp_path, destinations={"pacs": pacs.destination}, known_peers=[sender.peer.model_dump()])
        store = JobStore(tmp_path / "data" / "radnode.db")
        job_id, out, uids = finished_job(store, tmp_path, calling_ae="SCANNER")
        egress = Egress(config, store)
        egress.stage(job_id, out)
        assert deliver_until_settled(egress, store, job_id) is JobState.DONE
        assert sorted(sender.received_uids()) == sorted(pacs.received_uids()) == sorted(uids)
        store.close()


@pytest.fixture
def silent_peer() -> Iterator[int]:
    """A real listening socket that accepts every TCP connection and never sends a byte (a hung PACS)."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def _delivered_to(store: JobStore, job_id: int, destination: str) -> bool:
    return all(d.state == "done" for d in store.deliveries(job_id) if d.destination == destination)


def _seconds_until_delivered(egress: Egress, store: JobStore, job_id: int, out: Path) -> float:
    """Stage a job and time until its deliveries to ``pacs`` are recorded done (the workers send them)."""
    started = time.monotonic()
    egress.stage(job_id, out)
    wait_until(lambda: _delivered_to(store, job_id, "pacs"), timeout=20, step=0.01)
    return time.monotonic() - started


def test_a_hung_destination_delays_another_by_less_than_a_second(tmp_path: Path, pacs: StoreSCP,
                                                                 silent_peer: int) -> None:
    hung = {"type": "dicom", "ae_title": "HUNG", "host": "127.0.0.1", "port": silent_peer,
            "timeouts": {"acse_seconds": 60}}  # its own timeout: far longer than the whole test
    config = egress_config(tmp_path, destinations={"pacs": pacs.destination, "hung": hung})
    store = JobStore(tmp_path / "data" / "radnode.db")
    egress = Egress(config, store, poll_seconds=0.05)
    egress.start()
    try:
        first, out, _ = finished_job(store, tmp_path / "first")
        egress.stage(first, out)  # the hung peer now holds its own worker in an association request
        wait_until(lambda: _delivered_to(store, first, "pacs"))
        second, out, _ = finished_job(store, tmp_path / "second")
        with_hung_peer = _seconds_until_delivered(egress, store, second, out)
        # The same delivery by a node whose only destination is the PACS, side by side: the baseline.
        alone_store = JobStore(tmp_path / "alone" / "radnode.db")
        alone = Egress(egress_config(tmp_path / "alone", destinations={"pacs": pacs.destination}), alone_store,
                       poll_seconds=0.05)
        alone.start()
        third, out, _ = finished_job(alone_store, tmp_path / "third")
        baseline = _seconds_until_delivered(alone, alone_store, third, out)
        alone.stop()
        alone_store.close()
        assert with_hung_peer - baseline < 1.0, (with_hung_peer, baseline)
        hung = [d for d in store.deliveries(first) + store.deliveries(second) if d.destination == "hung"]
        assert len(hung) == 4 and all(d.state == "pending" and d.attempts == 0 for d in hung)  # still in flight
    finally:
        started = time.monotonic()
        egress.stop()
        assert time.monotonic() - started < 5  # the association in flight is aborted, not waited for
        store.close()


def test_failure_causes_are_named(tmp_path: Path, silent_peer: int) -> None:
    picky = AE(ae_title="PACS")
    picky.require_called_aet = True
    picky.add_supported_context(CTImageStorage)
    server = picky.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])
    try:
        rejecting = {"type": "dicom", "ae_title": "NOTPACS", "host": "127.0.0.1", "port": server.server_address[1]}
        silent = {"type": "dicom", "ae_title": "HUNG", "host": "127.0.0.1", "port": silent_peer,
                  "timeouts": {"acse_seconds": 1}}
        config = egress_config(tmp_path, destinations={"rejecting": rejecting, "silent": silent,
                                                       "closed": f"PACS@127.0.0.1:{free_port()}"}, max_attempts=1)
        store = JobStore(tmp_path / "data" / "radnode.db")
        job_id, out, _ = finished_job(store, tmp_path)
        egress = Egress(config, store)
        egress.stage(job_id, out)
        assert deliver_until_settled(egress, store, job_id) is JobState.FAILED
        errors = {d.destination: d.last_error for d in store.deliveries(job_id)}
        assert "association rejected by NOTPACS@127.0.0.1" in errors["rejecting"]
        assert "Called AE title not recognised" in errors["rejecting"]
        assert "did not answer the association request: timed out after 1 s" in errors["silent"]
        assert errors["closed"].endswith("connection refused (nothing listens on that port)")
        store.close()
    finally:
        server.shutdown()


def test_a_delivery_that_gave_up_is_resent_once_with_the_same_uids(tmp_path: Path) -> None:
    port = free_port()
    config = egress_config(tmp_path, destinations={"pacs": f"PACS@127.0.0.1:{port}"}, max_attempts=2)
    store = JobStore(tmp_path / "data" / "radnode.db")
    job_id, out, uids = finished_job(store, tmp_path)
    egress = Egress(config, store)
    egress.stage(job_id, out)
    assert deliver_until_settled(egress, store, job_id) is JobState.FAILED
    with pytest.raises(LookupError, match="does not exist"):
        egress.resend(job_id + 1, user="alice", reason="typo")
    with pytest.raises(ValueError, match="no deliveries to ARCHIVE"):
        egress.resend(job_id, "ARCHIVE", user="alice", reason="wrong name")
    with StoreSCP(tmp_path / "pacs", port=port) as pacs:
        assert egress.resend(job_id, "pacs", user="alice", reason="PACS is back after maintenance") == 2
        assert store.job(job_id).state is JobState.DELIVERING  # type: ignore[union-attr]
        assert deliver_until_settled(egress, store, job_id) is JobState.DONE
        assert sorted(pacs.received_uids()) == sorted(uids)  # each once
        # A re-send of delivered results is the same outbox files: the same SOP Instance UIDs, not new objects.
        assert egress.resend(job_id, user="bob", reason="PACS lost them") == 2
        assert deliver_until_settled(egress, store, job_id) is JobState.DONE
        assert sorted(pacs.received_uids()) == sorted(uids * 2)
    assert sorted(d.sent_uid for d in store.deliveries(job_id)) == sorted(uids)
    resends = [e.message for e in store.events(job_id) if e.kind == "resend"]
    assert resends == ["alice re-sent 2 deliveries to pacs: PACS is back after maintenance",
                       "bob re-sent 2 deliveries to every destination: PACS lost them"]
    assert store.job(job_id).reason is None  # type: ignore[union-attr]
    store.close()


def test_after_a_restart_workers_send_what_is_pending_and_nothing_delivered_again(
        tmp_path: Path, pacs: StoreSCP, fhir: FhirServer) -> None:
    port = free_port()
    destinations = {"pacs": pacs.destination, "ehr": fhir.destination, "archive": f"ARCHIVE@127.0.0.1:{port}"}
    config = egress_config(tmp_path, destinations=destinations)
    store = JobStore(tmp_path / "data" / "radnode.db")
    job_id, out, uids = finished_job(store, tmp_path)
    egress = Egress(config, store)
    egress.stage(job_id, out)
    wait_until(lambda: egress.deliver_due() or all(
        d.state == "done" for d in store.deliveries(job_id) if d.destination != "archive"))
    store.close()  # the node stops with the archive's deliveries pending

    with StoreSCP(tmp_path / "archive", ae_title="ARCHIVE", port=port) as archive:
        store = JobStore(tmp_path / "data" / "radnode.db")
        restarted = Egress(config, store, poll_seconds=0.05)
        restarted.start()
        try:
            wait_until(lambda: store.job(job_id).state is JobState.DONE)  # type: ignore[union-attr]
        finally:
            restarted.stop()
        assert sorted(archive.received_uids()) == sorted(uids)
    assert sorted(pacs.received_uids()) == sorted(uids) and patients(fhir) == 1  # once each, not again
    store.close()


def test_a_deidentifying_destination_gets_de_identified_copies_only_and_every_send_is_audited(tmp_path: Path) -> None:
    """Beside a destination that gets the results as they are, one with ``deidentify: basic`` gets de-identified
    copies of the DICOM results (the outbox keeps the originals) and not the FHIR Bundle, which names the patient;
    each send is in the audit trail, the de-identified one as an Export of anonymized data."""
    from radnode.config import AuditConfig
    from radnode.security.audit import AuditTrail
    from radnode.security.audit_schema import schema_errors
    from radnode.security.privacy import SiteKey

    config = egress_config(tmp_path, destinations={
        "archive": {"type": "folder", "path": str(tmp_path / "archive")},
        "research": {"type": "folder", "path": str(tmp_path / "research"), "deidentify": "basic"}})
    store = JobStore(tmp_path / "data" / "radnode.db")
    job_id, out, uids = finished_job(store, tmp_path)
    audit = AuditTrail(AuditConfig(), tmp_path / "data", "RADNODE", SiteKey(b"k" * 32))
    egress = Egress(config, store, audit=audit)
    egress.stage(job_id, out)
    assert deliver_until_settled(egress, store, job_id) is JobState.DONE
    egress.stop()
    audit.close()

    archived = sorted((tmp_path / "archive" / str(job_id)).iterdir())
    assert "fhir-bundle.json" in {p.name for p in archived}
    research = sorted((tmp_path / "research" / str(job_id)).iterdir())
    assert len(research) == len(uids) and all(p.suffix == ".dcm" for p in research)
    for path in research:
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES" and ds.SOPInstanceUID not in uids
        assert ds.PatientID != "P1" and "Test^Patient" not in str(ds.PatientName)
    assert {pydicom.dcmread(p).SOPInstanceUID for p in outbox_dir(config, job_id).glob("*.dcm")} == set(uids)
    events = " ".join(e.message for e in store.events(job_id))
    assert "fhir-bundle.json not sent to research (basic de-identification): not a DICOM file" in events

    messages = list(audit.messages())
    sent = [m for m in messages if 'csd-code="110104"' in m and 'EventActionCode="R"' in m]
    exports = [m for m in messages if 'csd-code="110106"' in m]
    assert len(sent) == 1 and 'UserName="archive"' in sent[0] and 'EventOutcomeIndicator="0"' in sent[0]
    assert len(exports) == 1 and 'UserName="research"' in exports[0] and "<Anonymized>true</Anonymized>" in exports[0]
    assert all(not schema_errors(m) for m in sent + exports)
    store.close()


SLOW_PACS_SECONDS = 0.6
"""How long the slow PACS of the kill test takes to answer each C-STORE."""

NODE_SCRIPT = """
import sys, threading
from radnode.config import Config
from radnode.node.service import Node
config = Config.model_validate_json(sys.argv[1])
node = Node(config, job_command=["/bin/false"], poll_seconds=0.05)
node.start()
print(node.port, flush=True)
threading.Event().wait()
"""


def test_a_node_killed_during_egress_never_sends_a_recorded_object_twice(tmp_path: Path) -> None:
    """A forward of 8 instances to a PACS that takes 0.6 s per C-STORE; the node process is SIGKILLed in the
    middle and started again: every object the store had recorded as delivered reached the PACS exactly once,
    and after the restart every object is there (the one in flight at the kill at most twice)."""
    received: list[str] = []
    pacs_ae = AE(ae_title="SLOWPACS")
    pacs_ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)

    def on_store(event: Event) -> int:
        time.sleep(SLOW_PACS_SECONDS)
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    server = pacs_ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: forward\n    when: {Modality: CT}\n    forward: [pacs]\n")
    config = node_config(tmp_path, egress={"destinations": {"pacs": {
        "type": "dicom", "ae_title": "SLOWPACS", "host": "127.0.0.1", "port": server.server_address[1],
        "forward_only": True}}}).model_copy(update={"rules": rules})
    sent = write_study(tmp_path / "study", n=8)
    node = subprocess.Popen([sys.executable, "-c", NODE_SCRIPT, config.model_dump_json()], stdout=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    try:
        port = int(node.stdout.readline())  # type: ignore[union-attr]
        assert storescu(port, tmp_path / "study").returncode == 0
        wait_until(lambda: len(received) >= 3, timeout=60)
        node.kill()
        node.wait(30)
        store = JobStore(config.data_dir / "radnode.db")
        recorded = [d.sent_uid for d in store.deliveries(1) if d.state == "done"]
        store.close()
        at_kill = list(received)
        with Node(config, job_command=["/bin/false"], poll_seconds=0.05) as restarted:
            job = final_job(restarted, 1, timeout=60)
    finally:
        if node.poll() is None:
            node.kill()
        server.shutdown()
    assert job.state is JobState.DONE
    assert recorded and all(received.count(uid) == 1 for uid in recorded), (recorded, received)
    assert len(recorded) >= len(at_kill) - 1  # at most the object in flight was not yet recorded
    assert sorted(set(received)) == sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in sent)
    assert len(received) - len(set(received)) <= 1
