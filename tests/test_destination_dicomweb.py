"""The DICOMweb STOW-RS destination (``radnode/destinations/dicomweb.py``) against a real Orthanc with its DICOMweb
plugin and HTTP basic authentication: a study's SEG and SR reach it and are listed under the study; a refused
password is a named failure that echoes no secret."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests

from factories import (
    egress_test_config, job_ready_for_delivery, phantom_result, rejected_uids, study_version_job, write_chest_phantom,
    write_results,
)
from radnode.config import Config, OrthancConfig
from radnode.destinations import Check, Destination, SendContext, Timeouts, parse_destination
from radnode.imaging.series import VolumeCriteria, load_volume
from radnode.node.egress import Egress, outbox_dir
from radnode.node.store import JobState, JobStore
from radnode.outputs.algorithm import AlgorithmInfo
from radnode.outputs.seg import build_segmentation
from radnode.outputs.sr import build_measurement_report
from radnode.peers import StoreSCP, free_port
from radnode.viewer import ORTHANC_BINARY, OrthancServer
from support.waiting import wait_until

pytestmark = pytest.mark.skipif(not ORTHANC_BINARY.exists(), reason="Orthanc is not installed")

PASSWORD = "stow-Secret-4711"
UID_ROOT = "1.2.826.0.1.3680043.8.498."


@pytest.fixture(scope="module")
def orthanc() -> Iterator[OrthancServer]:
    with OrthancServer(users={"radnode": PASSWORD}) as server:
        yield server


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    """A small CT study and its results as a run leaves them: SEG, SR and a manifest in ``out/``."""
    ct = write_chest_phantom(tmp_path_factory.mktemp("ct"), n_slices=12, rows=32, columns=32)
    volume, _ = load_volume(ct[0].parent, VolumeCriteria())
    result = phantom_result(volume)
    algorithm = AlgorithmInfo(name="radnode test phantom", version="1.0")
    seg = build_segmentation(volume, result.segments, algorithm, uid_root=UID_ROOT)
    sr = build_measurement_report(volume, seg, result, algorithm, uid_root=UID_ROOT)
    out = tmp_path_factory.mktemp("out")
    seg.save_as(out / "seg.dcm")
    sr.save_as(out / "sr.dcm")
    (out / "manifest.json").write_text("{}")
    return ct, out


def _egress(tmp_path: Path, orthanc: OrthancServer, auth: dict) -> tuple[Egress, JobStore]:
    config = Config.model_validate({"data_dir": str(tmp_path / "data"), "egress": {
        "max_attempts": 5, "destinations": {"research": {"type": "dicomweb", "url": orthanc.dicomweb_url,
                                                         "auth": auth}}}})
    store = JobStore(tmp_path / "data" / "radnode.db")
    return Egress(config, store), store


def _check(destination: Destination, orthanc: OrthancConfig | None = None) -> Check:
    """The destination's live check, as the console runs it."""
    return destination.check(SendContext(ae_title="RADNODE", timeouts=Timeouts(), orthanc=orthanc or OrthancConfig(),
                                          job_id=0))


def _secret_file(tmp_path: Path, value: str) -> Path:
    path = tmp_path / "stow-password"
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def test_results_reach_orthanc_by_stow_rs_with_authentication_listed_under_the_study(
        tmp_path: Path, orthanc: OrthancServer, study: tuple[list[Path], Path]) -> None:
    ct, out = study
    orthanc.upload(ct)  # the study is in the archive already, as a PACS would have it
    auth = {"type": "basic", "username": "radnode", "password": {"file": str(_secret_file(tmp_path, PASSWORD))}}
    egress, store = _egress(tmp_path, orthanc, auth)
    job_id = job_ready_for_delivery(store)
    egress.stage(job_id, out)
    egress.deliver_due()  # one STOW-RS request carries both results; its answer settles them
    assert store.job(job_id).state is JobState.DONE  # type: ignore[union-attr]
    results = {pydicom.dcmread(out / name).SOPInstanceUID: pydicom.dcmread(out / name).Modality
               for name in ("seg.dcm", "sr.dcm")}
    deliveries = store.deliveries(job_id)
    assert sorted(d.object for d in deliveries) == ["seg.dcm", "sr.dcm"]  # DICOM objects only, not the manifest
    assert {d.sent_uid for d in deliveries} == set(results)

    study_uid = pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID
    series = orthanc.get_json(f"/dicom-web/studies/{study_uid}/series")  # QIDO-RS, authenticated
    modalities = sorted(s["00080060"]["Value"][0] for s in series)  # type: ignore[union-attr, index]
    assert modalities == ["CT", "SEG", "SR"]
    listed = orthanc.get_json(f"/dicom-web/studies/{study_uid}/instances?Modality=SEG")
    listed += orthanc.get_json(f"/dicom-web/studies/{study_uid}/instances?Modality=SR")  # type: ignore[operator]
    assert {i["00080018"]["Value"][0] for i in listed} == set(results)  # type: ignore[index, union-attr]
    logged = " ".join(e.message for e in store.events(job_id))
    assert "STOW-RS" in logged and PASSWORD not in logged
    assert _check(egress.destinations["research"]) == Check(
        True, f"QIDO-RS {orthanc.dicomweb_url}/studies?limit=1: HTTP 200")
    store.close()


def test_the_orthanc_types_check_through_the_nodes_orthanc(tmp_path: Path, orthanc: OrthancServer) -> None:
    """``orthanc`` asks Orthanc's /system; ``orthanc-modality`` has Orthanc C-ECHO the modality and
    ``orthanc-dicomweb`` has it relay a QIDO-RS search: the paths the results would take."""
    secret = tmp_path / "orthanc-password"
    secret.write_text(PASSWORD)
    secret.chmod(0o600)
    node_orthanc = OrthancConfig(url=orthanc.url, username="radnode", password={"file": str(secret)})
    auth = ("radnode", PASSWORD)
    port = free_port()
    requests.put(f"{orthanc.url}/modalities/ECHOED", json={"AET": "PACS", "Host": "127.0.0.1", "Port": port},
                 auth=auth, timeout=10).raise_for_status()
    requests.put(f"{orthanc.url}/dicom-web/servers/SELF", timeout=10, auth=auth,
                 json={"Url": orthanc.dicomweb_url, "Username": "radnode", "Password": PASSWORD}).raise_for_status()
    with StoreSCP(tmp_path / "pacs", ae_title="PACS", port=port):
        assert _check(parse_destination("orthanc-modality:ECHOED"), node_orthanc) == Check(
            True, "Orthanc C-ECHOed its modality ECHOED")
    down = _check(parse_destination("orthanc-modality:ECHOED"), node_orthanc)
    assert not down.ok and down.detail.startswith("C-ECHO through Orthanc to ECHOED: POST /modalities/ECHOED/echo: HTTP")
    assert _check(parse_destination("orthanc-dicomweb:SELF"), node_orthanc) == Check(
        True, "Orthanc reached its DICOMweb server SELF")
    found = _check(parse_destination("orthanc"), node_orthanc)
    assert found.ok and found.detail.startswith("Orthanc 1.") and found.detail.endswith(f" at {orthanc.url}")
    unknown = _check(parse_destination("orthanc-modality:NOWHERE"), node_orthanc)
    assert not unknown.ok and unknown.detail.startswith(
        "C-ECHO through Orthanc to NOWHERE: POST /modalities/NOWHERE/echo: HTTP 404"), unknown.detail
    server = _check(parse_destination("orthanc-dicomweb:NOWHERE"), node_orthanc)
    assert not server.ok and server.detail.startswith(
        "QIDO-RS through Orthanc to NOWHERE: POST /dicom-web/servers/NOWHERE/get: HTTP 404"), server.detail
    wrong = tmp_path / "wrong-password"
    wrong.write_text("wrong")
    wrong.chmod(0o600)
    refused = _check(parse_destination("orthanc"), OrthancConfig(url=orthanc.url, username="radnode",
                                                                 password={"file": str(wrong)}))
    assert not refused.ok and "GET /system: HTTP 401" in refused.detail


def test_a_refused_password_is_named_and_never_echoed(tmp_path: Path, orthanc: OrthancServer,
                                                       study: tuple[list[Path], Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _, out = study
    wrong = "not-the-" + PASSWORD
    egress, store = _egress(tmp_path, orthanc, {"type": "basic", "username": "radnode",
                                                "password": {"file": str(_secret_file(tmp_path, wrong))}})
    job_id = job_ready_for_delivery(store)
    egress.stage(job_id, out)
    egress.deliver_due()
    errors = {d.last_error for d in store.deliveries(job_id)}
    assert errors == {f"STOW-RS {orthanc.dicomweb_url}: HTTP 401 authentication refused"}
    assert all(d.state == "pending" for d in store.deliveries(job_id))  # retried, not given up
    assert wrong not in " ".join(e.message for e in store.events(job_id))
    refused = _check(egress.destinations["research"])
    assert refused == Check(False, f"GET {orthanc.dicomweb_url}/studies?limit=1: HTTP 401 (credentials refused)")
    store.close()

    monkeypatch.delenv("RADNODE_TEST_STOW_TOKEN", raising=False)
    egress, store = _egress(tmp_path / "token", orthanc, {"type": "bearer", "token": {"env": "RADNODE_TEST_STOW_TOKEN"}})
    job_id = job_ready_for_delivery(store)
    egress.stage(job_id, out)
    egress.deliver_due()
    assert {d.last_error for d in store.deliveries(job_id)} == {
        f"credentials for {orthanc.dicomweb_url}: environment variable RADNODE_TEST_STOW_TOKEN is not set"}
    store.close()


@pytest.mark.slow
def test_a_node_sends_a_studys_results_to_an_authenticated_dicomweb_archive(
        tmp_path: Path, orthanc: OrthancServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from radnode.demo import send_study
    from radnode.node.service import Node
    from radnode.phantom import make_ct_phantom, write_ct_series

    files = write_ct_series(make_ct_phantom(n_slices=24, size=128), tmp_path / "ct")
    monkeypatch.setenv("RADNODE_TEST_STOW_PASSWORD", PASSWORD)
    config = Config.model_validate({
        "data_dir": str(tmp_path / "data"), "ingress": {"host": "127.0.0.1", "port": 0, "study_idle_seconds": 1},
        "processing": {"job_timeout_seconds": 300}, "api": {"port": 0},
        "egress": {"destinations": {"archive": {
            "type": "dicomweb", "url": orthanc.dicomweb_url,
            "auth": {"type": "basic", "username": "radnode", "password": {"env": "RADNODE_TEST_STOW_PASSWORD"}}}}}})
    with Node(config, poll_seconds=0.1) as node:
        assert send_study(files, node.port, calling_ae="CT_SCANNER") == len(files)
        wait_until(lambda: node.jobs() and node.jobs()[0].state in (JobState.DONE, JobState.FAILED), timeout=300)
        (job,) = node.jobs()
        assert job.state is JobState.DONE, job.reason
        sent = {d.sent_uid for d in node.deliveries(job.id)}
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    listed = orthanc.get_json(f"/dicom-web/studies/{study_uid}/instances")  # QIDO-RS, authenticated
    by_modality = {i["00080018"]["Value"][0]: i["00080060"]["Value"][0] for i in listed}  # type: ignore[index, union-attr]
    assert set(by_modality) == sent and {"SEG", "SR"} <= set(by_modality.values())
    assert PASSWORD not in (config.data_dir / "node-config.yaml").read_text()


def test_results_sent_through_orthanc_are_withdrawn_there_when_superseded(tmp_path: Path,
                                                                          orthanc: OrthancServer) -> None:
    """The node's Orthanc and a modality it relays to keep each result's SOP Instance UID per delivery, so a
    re-run's rejection note names exactly those objects and goes the same two ways."""
    port = free_port()
    requests.put(f"{orthanc.url}/modalities/RELAYED", json={"AET": "RELAYED", "Host": "127.0.0.1", "Port": port},
                 auth=("radnode", PASSWORD), timeout=10).raise_for_status()
    password = {"file": str(_secret_file(tmp_path, PASSWORD))}
    config = egress_test_config(tmp_path, {"relayed": "orthanc-modality:RELAYED"},
                                orthanc={"url": orthanc.url, "username": "radnode", "password": password})
    store = JobStore(tmp_path / "data" / "radnode.db")
    egress = Egress(config, store)
    with StoreSCP(tmp_path / "relayed", ae_title="RELAYED", port=port) as relayed:
        first = study_version_job(store, "1.1")
        first_uids = write_results(tmp_path / "first")
        egress.stage(first, tmp_path / "first")
        wait_until(lambda: egress.deliver_due() or store.job(first).state is JobState.DONE)
        sent = {(d.destination, d.sent_uid) for d in store.deliveries(first)}
        assert sent == {(name, uid) for name in ("orthanc", "relayed") for uid in first_uids}
        rerun = study_version_job(store, "1.2")
        write_results(tmp_path / "rerun")
        egress.stage(rerun, tmp_path / "rerun")
        notes = {d.destination for d in store.deliveries(rerun) if d.object == "rejection-note.dcm"}
        assert notes == {"orthanc", "relayed"}
        note = pydicom.dcmread(outbox_dir(config, rerun) / "rejection-note.dcm")
        assert rejected_uids(note) == set(first_uids)
        wait_until(lambda: egress.deliver_due() or store.job(rerun).state is JobState.DONE)
        assert note.SOPInstanceUID in relayed.received_uids()
    store.close()
