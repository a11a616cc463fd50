"""Who may send, and over what: DCMTK storescu against the node's SCP with TLS (certificates made here), mutual
TLS, and ``allowed_peers`` with ``reject_unknown``; every refusal logged, counted and audited."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from factories import Pki, make_pki, write_study
from radnode.config import AuditConfig, IngressConfig
from radnode.node.scp import Ingest, Spool, StorageSCP
from radnode.node.store import JobStore
from radnode.security.audit import AuditTrail
from radnode.security.audit_schema import schema_errors
from radnode.security.privacy import SiteKey
from support.dicom_tools import STORESCU

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Receiver:
    """The node's SCP alone over a fresh spool, store and audit trail."""

    def __init__(self, folder: Path, ingress: IngressConfig) -> None:
        self.store = JobStore(folder / "radnode.db")
        self.audit = AuditTrail(AuditConfig(), folder, ingress.ae_title, SiteKey(b"k" * 32))
        self.scp = StorageSCP(ingress, Ingest(Spool(folder / "spool"), self.store), self.audit)
        self.scp.start()

    def stored(self) -> int:
        return sum(job.instances for job in self.store.jobs())

    def audit_events(self, code: str) -> list[str]:
        return [m for m in self.audit.messages() if f'csd-code="{code}"' in m.split("</EventIdentification>")[0]]

    def close(self) -> None:
        self.scp.stop()
        self.store.close()
        self.audit.close()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator:
    made: list[Receiver] = []

    def make(**ingress: object) -> Receiver:
        made.append(Receiver(tmp_path / f"node{len(made)}", IngressConfig(host="127.0.0.1", port=0, **ingress)))
        return made[-1]

    yield make
    for r in made:
        r.close()


def send(port: int, study: list[Path], *options: str, calling_ae: str = "CT01", called_ae: str = "RADNODE"):
    return subprocess.run([STORESCU, "-v", "-aet", calling_ae, "-aec", called_ae, *options, "127.0.0.1", str(port),
                           *map(str, study)], capture_output=True, text=True, timeout=60)


def tls_listener(pki: Pki, mutual: bool = False) -> dict:
    return {"port": 0, "certificate": str(pki.server_cert), "private_key": str(pki.server_key),
            "ca_bundle": str(pki.ca), "require_client_certificate": mutual}


def test_a_tls_only_node_refuses_plain_dicom_and_stores_over_tls(receiver, pki: Pki, tmp_path: Path) -> None:
    node = receiver(plain_listener=False, tls=tls_listener(pki))
    study = write_study(tmp_path / "study", n=3)

    plain = send(node.scp.tls_port, study)
    assert plain.returncode != 0, plain.stdout + plain.stderr
    assert node.stored() == 0

    wrong_ca = send(node.scp.tls_port, study, "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.rogue_cert))
    assert wrong_ca.returncode != 0 and node.stored() == 0  # the client does not trust the node's certificate

    secure = send(node.scp.tls_port, study, "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))
    assert secure.returncode == 0, secure.stdout + secure.stderr
    assert node.stored() == 3
    assert node.scp.refusals.tls_failures() >= 1  # the plain attempt (and the aborted handshake) were counted
    alerts = node.audit_events("110113")
    assert alerts and all(not schema_errors(m) for m in alerts)


def test_mutual_tls_refuses_a_client_without_a_certificate_from_the_ca(receiver, pki: Pki, tmp_path: Path) -> None:
    node = receiver(plain_listener=False, tls=tls_listener(pki, mutual=True))
    study = write_study(tmp_path / "study", n=2)

    anonymous = send(node.scp.tls_port, study, "+tla", "+cf", str(pki.ca))
    assert anonymous.returncode != 0
    rogue = send(node.scp.tls_port, study, "+tls", str(pki.rogue_key), str(pki.rogue_cert), "+cf", str(pki.ca))
    assert rogue.returncode != 0
    assert node.stored() == 0
    assert node.scp.refusals.tls_failures() == 2
    assert len(node.audit_events("110113")) == 2

    trusted = send(node.scp.tls_port, study, "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert node.stored() == 2
    received = node.audit_events("110104")
    assert len(received) == 1 and "CN=CT01" in received[0]  # the sender's certificate subject is its UserName


def test_plain_and_tls_listeners_side_by_side(receiver, pki: Pki, tmp_path: Path) -> None:
    node = receiver(tls=tls_listener(pki))
    assert node.scp.port != node.scp.tls_port
    assert send(node.scp.port, write_study(tmp_path / "a", n=1)).returncode == 0
    assert send(node.scp.tls_port, write_study(tmp_path / "b", n=1), "+tls", str(pki.client_key), str(pki.client_cert),
                "+cf", str(pki.ca)).returncode == 0
    assert node.stored() == 2


def test_unknown_senders_and_wrong_called_titles_are_rejected_at_association(receiver, tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    node = receiver(reject_unknown=True, called_ae_titles=["AI_NODE"],
                    allowed_peers=[{"ae_title": "CT01", "host": "127.0.0.1"}, {"ae_title": "MR01", "host": "10.0.0.0/8"}])
    study = write_study(tmp_path / "study", n=2)

    stranger = send(node.scp.port, study, calling_ae="STRANGER")
    assert stranger.returncode != 0
    assert "Association Rejected" in stranger.stderr + stranger.stdout
    assert "Calling AE Title Not Recognized" in stranger.stderr + stranger.stdout
    wrong_network = send(node.scp.port, study, calling_ae="MR01")  # listed, but from another network
    assert "Calling AE Title Not Recognized" in wrong_network.stderr + wrong_network.stdout
    wrong_called = send(node.scp.port, study, called_ae="PACS")
    assert "Called AE Title Not Recognized" in wrong_called.stderr + wrong_called.stdout
    assert node.stored() == 0
    assert node.scp.refusals.rejected() == {"calling_ae": 2, "called_ae": 1}
    rejections = [r for r in caplog.records if "rejected association" in r.getMessage()]
    assert len(rejections) == 3 and "127.0.0.1" in rejections[0].getMessage()
    alerts = node.audit_events("110113")
    assert len(alerts) == 3 and all(not schema_errors(m) for m in alerts)
    assert "STRANGER" in alerts[0]

    for called in ("RADNODE", "AI_NODE"):
        assert send(node.scp.port, write_study(tmp_path / called, n=1), called_ae=called).returncode == 0
    assert node.stored() == 2


def test_a_peer_triggers_only_the_pipelines_its_entry_lists(tmp_path: Path) -> None:
    """The rules choose two pipelines for every series; each sender's entry keeps only what it may trigger, and
    a sender allowed none of them gets no job that runs one."""
    from pydicom import dcmread

    from radnode.node.scp import Origin, Router
    from radnode.node.store import JobState
    from radnode.pipelines.rules import parse_rules
    from radnode.security.access import PeerPolicy

    rules = parse_rules("rules:\n  - name: both\n    when: {Modality: {exists: true}}\n"
                        "    pipelines: [ct_tissue, mri_brain]\n")
    policy = PeerPolicy(IngressConfig(allowed_peers=[{"ae_title": "CT01", "pipelines": ["ct_tissue"]},
                                                     {"ae_title": "RESEARCH", "pipelines": []}]))
    router = Router(rules, policy=policy)
    study = write_study(tmp_path / "s", n=1)
    ds = dcmread(study[0])
    for sender, allowed, refused in (("CT01", ("ct_tissue",), ("mri_brain",)), ("RESEARCH", (), ("ct_tissue", "mri_brain")),
                                     ("OTHER", ("ct_tissue", "mri_brain"), ())):
        decision = router.route(ds, Origin(sender, "10.0.0.20:4000", "a1"))
        assert (decision.pipelines, decision.refused_pipelines) == (allowed, refused)
        assert decision.skipped is (not allowed)
        if refused:
            assert f"not run for this sender (ingress.allowed_peers): {', '.join(refused)}" in decision.describe()

    store = JobStore(tmp_path / "radnode.db")
    ingest = Ingest(Spool(tmp_path / "spool"), store, router)
    for n, sender in enumerate(("CT01", "RESEARCH")):
        instance = write_study(tmp_path / sender, n=1)[0].read_bytes()
        ingest.receive(instance, b"", Origin(sender, "10.0.0.20:4000", f"a{n}"))
    for job in store.jobs():
        store.queue_job(job.id, "idle")
    jobs = {job.calling_ae: job for job in store.jobs()}
    assert {j.pipeline for j in store.jobs() if j.calling_ae == "CT01"} == {"ct_tissue"}
    assert jobs["RESEARCH"].pipeline == "" and jobs["RESEARCH"].state is JobState.DONE
    assert "not run for this sender" in jobs["RESEARCH"].reason
    store.close()


def test_a_peer_limited_to_some_pipelines_triggers_no_shadow_run_of_another(tmp_path: Path) -> None:
    """A shadow pipeline is a job too: a sender whose entry does not list it gets no shadow run of it (the
    refusal named like any other), while a sender allowed it gets one."""
    from radnode.node.scp import Origin, Router
    from radnode.pipelines.rules import parse_rules
    from radnode.security.access import PeerPolicy

    rules = parse_rules("rules:\n  - name: ct\n    when: {Modality: {exists: true}}\n"
                        "    pipelines: [ct_tissue]\n    shadow: [mri_brain]\n")
    policy = PeerPolicy(IngressConfig(allowed_peers=[{"ae_title": "CT01", "pipelines": ["ct_tissue"]},
                                                     {"ae_title": "CT02", "pipelines": ["ct_tissue", "mri_brain"]}]))
    store = JobStore(tmp_path / "radnode.db")
    ingest = Ingest(Spool(tmp_path / "spool"), store, Router(rules, policy=policy))
    for n, sender in enumerate(("CT01", "CT02")):
        instance = write_study(tmp_path / sender, n=1)[0].read_bytes()
        ingest.receive(instance, b"", Origin(sender, "10.0.0.20:4000", f"a{n}"))
    for job in store.jobs():
        store.queue_job(job.id, "idle")
    runs = {(job.calling_ae, job.pipeline, job.shadow) for job in store.jobs()}
    decision = Router(rules, policy=policy).route(pydicom.dcmread(write_study(tmp_path / "one", n=1)[0]),
                                                  Origin("CT01", "10.0.0.20:4000", "a2"))
    store.close()
    assert runs == {("CT01", "ct_tissue", False), ("CT02", "ct_tissue", False), ("CT02", "mri_brain", True)}
    assert decision.shadow == () and "not run for this sender (ingress.allowed_peers): mri_brain" in decision.describe()


def test_a_tls_only_node_sends_its_results_over_tls_to_a_storescp_tls_destination(
        tmp_path: Path, pki: Pki, stand_in: list[str]) -> None:
    from radnode.node.service import Node
    from radnode.node.store import JobState
    from radnode.peers import StoreSCP
    from support.node import final_job, node_config
    from support.waiting import wait_until

    node_tls = {"certificate": str(pki.client_cert), "private_key": str(pki.client_key), "ca_bundle": str(pki.ca)}
    secure = {"tls": (pki.server_key, pki.server_cert, pki.ca), "require_client_certificate": True}
    with StoreSCP(tmp_path / "pacs", **secure) as pacs, StoreSCP(tmp_path / "ct01", "CT01", **secure) as sender:
        config = node_config(tmp_path, ingress={"plain_listener": False, "tls": tls_listener(pki, mutual=True)},
                             egress={"destinations": {"pacs": {**pacs.destination, "tls": node_tls}},
                                     "known_peers": [{**sender.peer.model_dump(), "tls": node_tls}]})
        with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
            study = write_study(tmp_path / "study", n=3)
            assert send(node.tls_port, study).returncode != 0  # plain DICOM: no listener speaks it
            sent = send(node.tls_port, study, "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))
            assert sent.returncode == 0, sent.stdout + sent.stderr
            wait_until(lambda: node.jobs(), timeout=30)
            job = final_job(node, node.jobs()[0].id, timeout=60)
            assert job.state is JobState.DONE, job.reason
        assert len(pacs.received()) == 1  # the result, received by storescp over mutual TLS
        assert len(sender.received()) == 1  # and back to the sender (return-to-sender) over mutual TLS
    # the same destination without the node's client certificate: storescp refuses it, the delivery fails
    with StoreSCP(tmp_path / "pacs2", tls=(pki.server_key, pki.server_cert, pki.ca),
                  require_client_certificate=True) as pacs:
        config = node_config(tmp_path / "second", egress={"max_attempts": 1, "destinations": {
            "pacs": {**pacs.destination, "tls": {"ca_bundle": str(pki.ca)}}}})
        with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
            assert send(node.port, write_study(tmp_path / "again", n=1)).returncode == 0
            wait_until(lambda: node.jobs(), timeout=30)
            job = final_job(node, node.jobs()[0].id, timeout=60)
            deliveries = node.deliveries(job.id)
            audit = node.audit
        assert job.state is JobState.FAILED and pacs.received() == []
        assert any("(TLS)" in (d.last_error or "") for d in deliveries), [d.last_error for d in deliveries]
    failed = [m for m in audit.messages() if 'csd-code="110104"' in m and 'EventActionCode="R"' in m]
    assert len(failed) == 1 and 'EventOutcomeIndicator="8"' in failed[0] and "(TLS)" in failed[0]  # audited too
    assert not schema_errors(failed[0])
