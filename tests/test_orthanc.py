"""The Orthanc path end to end: a real Orthanc with the radnode plugin, the node, DCMTK storescu/storescp.

A CT sent to Orthanc with storescu is pulled by the node on the plugin's events, processed by the real
``radnode run``; the SEG and SR are stored back into Orthanc and, by the route's ``forward``, sent by
Orthanc to a second DICOM destination. Nothing is triggered by hand.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event

from factories import write_study
from radnode.config import Config, OrthancConfig
from radnode.destinations import Item, Outcome, SendContext
from radnode.destinations.base import Timeouts
from radnode.destinations.orthanc_modality import OrthancModalityDestination
from radnode.execution import RunManifest
from radnode.node.egress import outbox_dir
from radnode.node.orthanc_ingress import OrthancIngress
from radnode.node.scp import Ingest, Spool
from radnode.node.service import Node
from radnode.node.store import JobState, JobStore
from radnode.orthanc_config import write_event_token
from radnode.viewer import ORTHANC_BINARY, OrthancServer
from radnode.peers import StoreSCP, free_port
from support.dicom_tools import storescu
from support.node import node_config
from support.waiting import wait_until

pytestmark = pytest.mark.skipif(not ORTHANC_BINARY.exists(), reason="Orthanc is not installed")

RULES = """\
rules:
  - name: derived-objects
    when: {Modality: {in: [SEG, SR]}}
    discard: true
    stop: true
  - name: ct
    when: {Modality: CT, ImageType: AXIAL}
    pipelines: [ct_tissue]
    forward: [SECOND]
"""


@pytest.fixture
def second(tmp_path: Path) -> Iterator[StoreSCP]:
    with StoreSCP(tmp_path / "second", ae_title="SECOND") as receiver:
        yield receiver


@contextlib.contextmanager
def orthanc_for_node(tmp_path: Path, **options: object) -> Iterator[tuple[OrthancServer, int, Path]]:
    """A real Orthanc whose plugin posts its events, with its own token, to a node's web service on a free port:
    (the server, that port, the token file)."""
    api_port = free_port()
    token = tmp_path / "event-token"
    write_event_token(token)
    with OrthancServer(node_url=f"http://127.0.0.1:{api_port}", stable_age=1, event_token_file=token,
                       **options) as orthanc:
        yield orthanc, api_port, token


def test_orthanc_config_command_writes_a_configuration_orthanc_starts_with(tmp_path: Path) -> None:
    http_port, dicom_port = free_port(), free_port()
    folder = Path("/var/tmp") / f"radnode-test-{tmp_path.name}"
    result = subprocess.run(["radnode", "orthanc-config", "--output", str(folder), "--http-port", str(http_port),
                             "--dicom-port", str(dicom_port), "--node-url", "http://127.0.0.1:9"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60,
                            env={"PATH": str(Path(__file__).resolve().parents[1] / ".venv" / "bin")})
    assert result.returncode == 0, result.stderr
    settings = json.loads((folder / "orthanc.json").read_text())
    assert settings["RadNode"]["NodeUrl"] == "http://127.0.0.1:9"
    assert Path(settings["PythonScript"]) == folder / "radnode_plugin.py"
    token_file = Path(settings["RadNode"]["TokenFile"])
    assert token_file == folder / "radnode-event-token" and len(token_file.read_text().strip()) >= 32
    assert token_file.stat().st_mode & 0o077 == 0, "the plugin's token is owner-only"
    assert token_file.read_text().strip() not in (folder / "orthanc.json").read_text()
    orthanc = subprocess.Popen([str(ORTHANC_BINARY), str(folder / "orthanc.json")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        def plugins() -> list[str] | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/plugins", timeout=2) as r:
                    return json.loads(r.read())
            except OSError:
                return None
        wait_until(plugins, timeout=30, step=0.2)
        assert {"python", "dicom-web"} <= set(plugins() or [])
    finally:
        orthanc.terminate()
        orthanc.wait(20)
        subprocess.run(["rm", "-rf", str(folder)], check=True)


@pytest.mark.slow
def test_a_ct_sent_to_orthanc_comes_back_as_seg_and_sr_and_is_forwarded(tmp_path: Path, second: StoreSCP) -> None:
    from radnode.phantom import make_ct_phantom, write_ct_series

    write_ct_series(make_ct_phantom(n_slices=24, size=128), tmp_path / "ct")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    with orthanc_for_node(tmp_path, modalities={"SECOND": ["SECOND", "127.0.0.1", second.port]}) as (
            orthanc, api_port, token):
        config = Config.model_validate({
            "data_dir": str(tmp_path / "data"), "rules": str(rules),
            "ingress": {"host": "127.0.0.1", "port": 0},
            "orthanc": {"url": orthanc.url, "event_token_file": str(token)}, "api": {"port": api_port},
            "egress": {"destinations": {"SECOND": {"type": "orthanc-modality", "modality": "SECOND",
                                                   "forward_only": True}}, "retry_initial_seconds": 0.5},
            "processing": {"job_timeout_seconds": 300}})
        with Node(config, poll_seconds=0.1) as node:
            sent = storescu(orthanc.dicom_port, tmp_path / "ct", calling_ae="CT_SCANNER", called_ae=orthanc.aet)
            assert sent.returncode == 0, sent.stderr
            wait_until(lambda: node.jobs() and node.jobs()[0].state in (JobState.DONE, JobState.FAILED), timeout=300)
            (job,) = node.jobs()
            assert job.state is JobState.DONE, job.reason
            assert (job.instances, job.calling_ae, job.pipeline) == (24, "CT_SCANNER", "ct_tissue")
            (study_id,) = orthanc.get_json("/studies")  # type: ignore[misc]
            modalities = sorted(s["MainDicomTags"]["Modality"]
                                for s in orthanc.get_json(f"/studies/{study_id}/series"))  # type: ignore[union-attr]
            # every DICOM result but the Encapsulated PDF, which goes only to destinations with encapsulated_pdf: true
            results = sorted(o.modality for o in RunManifest.read(outbox_dir(config, job.id)).outputs
                             if o.modality and o.modality != "DOC")
            assert {"SEG", "SR"} <= set(results)  # the SEG, the TID 1500 report and the text report SR
            assert modalities == sorted(["CT", *results])
            # The results came back through the plugin too: recorded, discarded by the rules, no second job.
            wait_until(lambda: node.job(job.id).late_instances == len(results), timeout=30)  # type: ignore[union-attr]
            assert len(node.jobs()) == 1
    forwarded = sorted(pydicom.dcmread(p, stop_before_pixels=True).Modality for p in second.folder.iterdir())
    assert forwarded == results


def test_a_study_orthanc_received_while_the_node_was_down_is_pulled_when_it_starts(tmp_path: Path,
                                                                                 stand_in: list[str]) -> None:
    """Orthanc takes a study while the node is stopped: the plugin's stored and stable-study events find no node
    and are dropped. Started again, the node catches up from Orthanc's change log and pulls the whole study."""
    study = write_study(tmp_path / "study", n=3)
    with orthanc_for_node(tmp_path) as (orthanc, api_port, token):
        config = node_config(tmp_path, orthanc={"url": orthanc.url, "event_token_file": str(token)},
                             api={"port": api_port})
        with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
            assert node.jobs() == []  # the node has run with this Orthanc before
        orthanc.upload(study)
        log = orthanc.storage / "orthanc.log"  # type: ignore[operator]
        wait_until(lambda: re.search(r"event stable-study \S+ dropped", log.read_text()), timeout=60)
        with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
            wait_until(lambda: node.jobs() and node.jobs()[0].instances == 3, timeout=30)
            (job,) = node.jobs()
            assert job.study_instance_uid == pydicom.dcmread(study[0]).StudyInstanceUID


def test_stopping_with_orthanc_down_drops_the_queued_events_and_their_retry_waits(tmp_path: Path) -> None:
    """Orthanc down and a backlog of plugin events: the node stops at once (a systemd stop must not SIGKILL it),
    the events dropped; the stable-study catch-up of the next start pulls what they were for."""
    store = JobStore(tmp_path / "radnode.db")
    ingress = OrthancIngress(OrthancConfig(url=f"http://127.0.0.1:{free_port()}"),
                             Ingest(Spool(tmp_path / "spool"), store), timeout=2)
    ingress.start()
    for n in range(5):
        ingress.submit({"type": "stored", "id": f"0000000{n}-00000000-00000000-00000000-00000000"})
    time.sleep(0.3)  # the first event has failed and waits to be tried again
    stopping = threading.Thread(target=ingress.stop, daemon=True)
    stopping.start()
    stopping.join(3)
    assert not stopping.is_alive(), "stop() still handling the queued events"
    store.close()


def test_a_study_with_an_instance_refused_on_the_orthanc_path_fails_naming_the_refusal(
        tmp_path: Path, stand_in: list[str]) -> None:
    """An instance Orthanc took but the node refuses (an implausible rescale) is recorded with its study, as on the
    node's own SCP: the study is never processed without it, and its job fails naming the refusal."""
    study = write_study(tmp_path / "study", n=3)
    ds = pydicom.dcmread(study[1])
    ds.RescaleSlope = "1e30"
    ds.save_as(study[1])
    with orthanc_for_node(tmp_path) as (orthanc, api_port, token):
        config = node_config(tmp_path, orthanc={"url": orthanc.url, "event_token_file": str(token)},
                             api={"port": api_port})
        with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
            orthanc.upload(study)
            wait_until(lambda: node.jobs() and node.jobs()[0].state in (JobState.DONE, JobState.FAILED), timeout=60)
            (job,) = node.jobs()
            kinds = [e.kind for e in node.events(job.id)]
    assert job.state is JobState.FAILED and job.instances == 2 and "running" not in kinds, job
    assert "RescaleSlope 1e+30 out of range" in job.reason and "refused at ingest" in job.reason, job.reason


def test_a_result_the_modality_behind_orthanc_refuses_fails_alone_and_its_resend_sends_nothing_twice(
        tmp_path: Path) -> None:
    """Orthanc relays each result in a job of its own: the peer refusing one leaves the others delivered (each
    handed to egress as it is known), and the re-send of the refused one is the only thing sent again."""
    results = write_study(tmp_path / "results", n=3)
    uids = [str(pydicom.dcmread(path).SOPInstanceUID) for path in results]
    refusing = {uids[1]}
    received: list[str] = []

    def on_store(event: Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid in refusing:
            return 0xA700
        received.append(uid)
        return 0x0000

    peer = AE(ae_title="PICKY")
    peer.supported_contexts = AllStoragePresentationContexts
    server = peer.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        modalities = {"PICKY": ["PICKY", "127.0.0.1", server.server_address[1]]}
        with OrthancServer(node_url=None, modalities=modalities) as orthanc:
            handed: list[Outcome] = []
            context = SendContext(ae_title="RADNODE", timeouts=Timeouts(connect_seconds=5, network_seconds=30),
                                  orthanc=OrthancConfig(url=orthanc.url), job_id=1, on_outcome=handed.append)
            destination = OrthancModalityDestination(modality="PICKY")
            items = [Item(number, path, path.name) for number, path in enumerate(results, 1)]
            outcomes = destination.send(items, context)
            assert [o.ok for o in outcomes] == [True, False, True], [o.message for o in outcomes]
            assert handed == outcomes
            assert "modalities/PICKY/store" in outcomes[1].message
            assert received == [uids[0], uids[2]]

            refusing.clear()  # the peer takes it now: egress re-sends the failed delivery only
            assert [o.ok for o in destination.send([items[1]], context)] == [True]
    finally:
        server.shutdown()
    assert sorted(received) == sorted(uids), "each result reached the modality exactly once"
