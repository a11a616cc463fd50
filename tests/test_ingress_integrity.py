"""Validate before trusting, and bounded ingress: the node's SCP against malformed input, reused SOP Instance
UIDs, implausible headers, many senders and silent connections, over real associations.

Senders are DCMTK storescu and, where a file must go out byte for byte as built (a truncated data set, a bad
deflate stream), pynetdicom's SCU sending the file unparsed (``STORE_SEND_CHUNKED_DATASET``).
"""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import keyword_dict
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from factories import write_malformed_corpus, write_study
from radnode.config import IngressConfig, PeerSettings
from radnode.log_safety import EscapeControlCharacters, escape_control
from radnode.node.scp import Ingest, Origin, Refused, Spool, StorageSCP
from radnode.node.service import Node
from radnode.node.store import JobState, JobStore
from radnode.peers import FhirServer, StoreSCP
from support.dicom_tools import STORESCU, send_unparsed, storescu
from support.node import ServeProcess, final_job, node_config
from support.waiting import wait_until

@pytest.fixture
def scp(tmp_path: Path) -> Iterator[tuple[StorageSCP, JobStore]]:
    """The node's Storage SCP alone with small limits, on a free port, over a fresh spool and store."""
    store = JobStore(tmp_path / "data" / "radnode.db")
    config = IngressConfig(host="127.0.0.1", port=0, max_associations_per_peer=2, acse_timeout_seconds=2,
                           peers={"TRUSTED": PeerSettings(max_associations=4)})
    server = StorageSCP(config, Ingest(Spool(tmp_path / "data" / "spool"), store))
    server.start()
    yield server, store
    server.stop()
    store.close()


@pytest.mark.slow
def test_the_malformed_corpus_is_refused_naming_the_attribute_with_no_traceback_or_forged_line(
        tmp_path: Path, peers: tuple[StoreSCP, FhirServer]) -> None:
    """82 malformed instances to ``radnode serve``: each refused with a failure status (never 0xC211) whose
    comment names the attribute; the log holds no traceback and no line a UID forged; nothing is processed,
    and a good study sent after them is received as usual."""
    corpus = write_malformed_corpus(tmp_path / "corpus")
    assert len(corpus) >= 75
    node = ServeProcess(tmp_path / "node", *peers)
    try:
        answers = send_unparsed(node.port, [m.path for m in corpus])
        good = write_study(tmp_path / "good", n=2)
        assert storescu(node.port, tmp_path / "good").returncode == 0
        wait_until(lambda: JobStore(node.data_dir / "radnode.db").jobs(), timeout=30)
    finally:
        node.stop()
    keywords = set(keyword_dict)
    for malformed, (status, comment) in zip(corpus, answers, strict=True):
        assert status == 0xC000, f"{malformed.name}: status {status}, {comment!r}"
        if malformed.names:
            assert malformed.names in comment, f"{malformed.name}: {comment!r}"
        else:
            assert set(re.findall(r"[A-Z][A-Za-z]+", comment)) & keywords, f"{malformed.name}: {comment!r}"
    log = (tmp_path / "node.log").read_text()
    assert "Traceback" not in log and "C211" not in log
    forged = [line for line in log.splitlines() if "radnode: forged" in line]
    assert forged and all(re.search(r"(\\x0a|\\n)2026-12-01 INFO radnode: forged", line) for line in forged)
    store = JobStore(node.data_dir / "radnode.db")
    (job,) = store.jobs()
    assert job.instances == 2 and job.study_instance_uid == pydicom.dcmread(good[0]).StudyInstanceUID
    store.close()


def test_a_request_without_affected_sop_instance_uid_ends_one_association_in_one_line(
        scp: tuple[StorageSCP, JobStore], tmp_path: Path) -> None:
    """pynetdicom's reactor cannot decode a C-STORE request without Affected SOP Instance UID when it receives
    into a file: that association ends, the next sender is served."""
    server, store = scp
    (path,) = write_study(tmp_path / "empty", n=1)
    ds = pydicom.dcmread(path)
    ds.file_meta.MediaStorageSOPInstanceUID = ""
    ds.save_as(path, enforce_file_format=False)
    send_unparsed(server.port, [path])
    write_study(tmp_path / "good", n=2)
    assert storescu(server.port, tmp_path / "good").returncode == 0
    assert [j.instances for j in store.jobs()] == [2]


def test_a_study_reusing_another_studys_sop_instance_uids_is_refused_and_not_processed(
        tmp_path: Path, stand_in: list[str]) -> None:
    """The second study's instances with the first study's SOP Instance UIDs are refused (naming both
    studies), the first study keeps exactly its own instances, the second is never processed."""
    first = write_study(tmp_path / "first", n=6, patient_id="FIRST")
    second = write_study(tmp_path / "second", n=6, patient_id="SECOND")
    for source, target in zip(first[:2], second[:2]):
        ds = pydicom.dcmread(target)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.dcmread(source).SOPInstanceUID
        ds.save_as(target)
    with Node(node_config(tmp_path), job_command=stand_in, poll_seconds=0.05) as node:
        assert storescu(node.port, tmp_path / "first").returncode == 0
        sent = storescu(node.port, tmp_path / "second", options=("-nh",))  # go on past a refusal
        assert sent.stderr.count("Error: CannotUnderstand") == 2
        wait_until(lambda: len(node.jobs()) == 2 and all(j.state in (JobState.DONE, JobState.FAILED)
                                                       for j in node.jobs()), timeout=60)
        by_patient = {j.patient_id: j for j in node.jobs()}
        events = [e.kind for e in node.events(by_patient["SECOND"].id)]
    assert by_patient["FIRST"].state is JobState.DONE and by_patient["FIRST"].instances == 6
    refused = by_patient["SECOND"]
    assert refused.state is JobState.FAILED and refused.instances == 4 and "running" not in events
    assert "SOPInstanceUID" in refused.reason and "already belongs to study" in refused.reason


def test_a_study_with_an_implausible_rescale_is_not_processed(tmp_path: Path, stand_in: list[str]) -> None:
    study = write_study(tmp_path / "study", n=6)
    ds = pydicom.dcmread(study[3])
    ds.RescaleSlope = "1e30"
    ds.save_as(study[3])
    with Node(node_config(tmp_path), job_command=stand_in, poll_seconds=0.05) as node:
        assert storescu(node.port, tmp_path / "study", options=("-nh",)).stderr.count("Error: CannotUnderstand") == 1
        job = final_job(node, 1)
        kinds = [e.kind for e in node.events(job.id)]
    assert job.state is JobState.FAILED and job.instances == 5 and "running" not in kinds
    assert "RescaleSlope 1e+30 out of range" in job.reason and "refused at ingest" in job.reason


def test_the_same_instance_sent_again_corrected_lifts_the_refusal(tmp_path: Path, stand_in: list[str]) -> None:
    study = write_study(tmp_path / "study", n=4)
    good = study[1].read_bytes()
    ds = pydicom.dcmread(study[1])
    ds.PixelSpacing = ["0", "0"]
    ds.save_as(study[1])
    config = node_config(tmp_path, ingress={"study_idle_seconds": 3, "study_quiet_seconds": 3})
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        assert storescu(node.port, tmp_path / "study", options=("-nh",)).stderr.count("Error: CannotUnderstand") == 1
        study[1].write_bytes(good)
        assert storescu(node.port, study[1]).returncode == 0
        job = final_job(node, 1)
    assert job.state is JobState.DONE and job.instances == 4


def test_instances_without_a_sop_instance_uid_hold_the_study_until_an_operator_gives_them_up(
        tmp_path: Path, stand_in: list[str]) -> None:
    """Two instances of a study come without SOP Instance UID (the request names one, the dataset none): both
    refused and counted, the study not processed, and no corrected re-send can lift that; a plain retry fails
    again; the operator's retry without the refused instances (a note required, over the API) processes the
    rest, and the job's events name what was given up."""
    from radnode.console.accounts import Role
    from support.console import api, token_for

    study = write_study(tmp_path / "study", n=5)
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in study[3:]:
        ds = pydicom.dcmread(path)
        del ds.SOPInstanceUID
        ds.save_as(broken / path.name, enforce_file_format=False)
        path.unlink()
    with Node(node_config(tmp_path), job_command=stand_in, poll_seconds=0.05) as node:
        assert storescu(node.port, tmp_path / "study").returncode == 0
        answers = send_unparsed(node.port, sorted(broken.iterdir()))
        assert [status for status, _ in answers] == [0xC000, 0xC000], answers
        job = final_job(node, 1)
        assert job.state is JobState.FAILED and "2 instance(s) of the study were refused" in job.reason, job.reason
        assert "retry the job without them" in job.reason
        assert node.store.retry_job(job.id, "ops") == 3 and final_job(node, job.id).state is JobState.FAILED
        with api(node, token_for(node, Role.OPERATOR)) as client:
            unexplained = client.post(f"/api/jobs/{job.id}/retry", json={"without_refused": True})
            assert unexplained.status_code == 409 and "needs a note" in unexplained.json()["detail"]
            answer = client.post(f"/api/jobs/{job.id}/retry",
                                 json={"without_refused": True, "note": "scanner bug, the images are complete"})
            assert answer.status_code == 200, answer.text
        done = final_job(node, job.id)
        waived = [e.message for e in node.events(job.id) if e.kind == "refusals-waived"]
    assert done.state is JobState.DONE and done.instances == 3
    (message,) = waived
    assert "gave up on 2 refused instance(s)" in message and "scanner bug" in message
    assert message.count("(no SOP Instance UID)") == 2


def test_an_instance_is_received_into_a_file_never_whole_in_memory(
        scp: tuple[StorageSCP, JobStore], tmp_path: Path) -> None:
    """A 64 MB instance: Python allocations during its receipt and spooling stay far below its size."""
    server, store = scp
    (path,) = write_study(tmp_path / "big", n=1)
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 4096
    ds.NumberOfFrames = 2
    ds.PixelData = np.zeros((2, 4096, 4096), np.uint16).tobytes()
    ds.save_as(path)
    tracemalloc.start()
    try:
        assert storescu(server.port, path).returncode == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [j.instances for j in store.jobs()] == [1]
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MB allocated while receiving a 64 MB instance"


def test_twenty_senders_at_once_are_all_accepted_beside_ten_silent_connections(tmp_path: Path) -> None:
    """The defaults: 20 storescu at once all store on their first try while 10 TCP connections that never
    send a byte are open; the node drops those within its ACSE timeout (5 s)."""
    store = JobStore(tmp_path / "data" / "radnode.db")
    config = IngressConfig(host="127.0.0.1", port=0)
    assert config.acse_timeout_seconds <= 5
    server = StorageSCP(config, Ingest(Spool(tmp_path / "data" / "spool"), store))
    server.start()
    try:
        silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(10)]
        opened = time.monotonic()
        for k in range(20):
            write_study(tmp_path / f"s{k}", n=2, patient_id=f"P{k}")
        senders = [subprocess.Popen([STORESCU, "-aet", "MODALITY", "-aec", "RADNODE", "127.0.0.1", str(server.port),
                                     str(tmp_path / f"s{k}"), "+sd"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True) for k in range(20)]
        outputs = [(p.wait(120), p.stdout.read()) for p in senders]  # type: ignore[union-attr]
        assert all(rc == 0 for rc, _ in outputs), [out for rc, out in outputs if rc]
        assert not any("Local Limit" in out or "rejected" in out.lower() for _, out in outputs)
        for conn in silent:
            conn.settimeout(config.acse_timeout_seconds + 10)
            assert conn.recv(1) == b""  # closed by the node
        dropped_after = time.monotonic() - opened
        assert dropped_after < config.acse_timeout_seconds + 10
        assert len(store.jobs()) == 20 and all(j.instances == 2 for j in store.jobs())
    finally:
        for conn in silent:
            conn.close()
        server.stop()
        store.close()


def test_one_calling_ae_gets_its_association_limit_others_are_served(scp: tuple[StorageSCP, JobStore]) -> None:
    server, _ = scp
    ae = AE(ae_title="GREEDY")
    ae.add_requested_context(CTImageStorage)
    held = [ae.associate("127.0.0.1", server.port, ae_title="RADNODE") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = ae.associate("127.0.0.1", server.port, ae_title="RADNODE")
        assert third.is_rejected  # transient, local limit exceeded: the sender retries later
        other = AE(ae_title="OTHER")
        other.add_requested_context(CTImageStorage)
        served = other.associate("127.0.0.1", server.port, ae_title="RADNODE")
        assert served.is_established
        served.release()
        trusted = AE(ae_title="TRUSTED")
        trusted.add_requested_context(CTImageStorage)
        three = [trusted.associate("127.0.0.1", server.port, ae_title="RADNODE") for _ in range(3)]
        assert all(a.is_established for a in three)  # ingress.peers gives it 4
        for a in three:
            a.release()
    finally:
        for a in held:
            a.release()


def test_control_characters_in_logged_values_are_escaped(caplog: pytest.LogCaptureFixture) -> None:
    assert escape_control("1.2.3\n2026 INFO forged\r\x1b[2J\t") == "1.2.3\\x0a2026 INFO forged\\x0d\\x1b[2J\\x09"
    logger = logging.getLogger("radnode.test.escaping")
    caplog.handler.addFilter(EscapeControlCharacters())
    logger.warning("refused C-STORE %s from %s", "1.2\nINFO forged", "AE\r")
    (record,) = caplog.records
    assert record.getMessage() == "refused C-STORE 1.2\\x0aINFO forged from AE\\x0d"
    assert "\n" not in caplog.text.rstrip("\n")


def test_a_uid_the_spool_cannot_name_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    store = JobStore(tmp_path / "radnode.db")
    (path,) = write_study(tmp_path / "s", n=1)
    ds = pydicom.dcmread(path)
    ds.SeriesInstanceUID = "../" + generate_uid()
    ds.save_as(path, enforce_file_format=False)
    with pytest.raises(Refused, match="SeriesInstanceUID"):
        Ingest(spool, store).receive(path.read_bytes(), b"", Origin("AE", "", "a"))
    assert not list(spool.files())
    store.close()
