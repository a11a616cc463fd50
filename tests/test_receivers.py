"""Several receiver processes on one port (``ingress.receivers``): concurrent DCMTK senders spread over them, the
association limits and refusal counters hold for the node as a whole, and a receiver killed mid-association
is started again without keeping its slots."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from factories import make_pki, metric_value, write_study
from radnode.node.service import Node
from support.dicom_tools import STORESCU
from support.node import node_config, process_alive
from support.waiting import wait_until

pytestmark = pytest.mark.slow


def storescu(port: int, files: list[Path], calling_ae: str = "CT01") -> subprocess.Popen:
    return subprocess.Popen([STORESCU, "-aet", calling_ae, "-aec", "RADNODE", "127.0.0.1", str(port), *map(str, files)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def associate(port: int, calling_ae: str):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", port, ae_title="RADNODE")


def test_concurrent_senders_spread_over_the_receivers_and_every_study_is_indexed_and_audited(tmp_path: Path) -> None:
    config = node_config(tmp_path, ingress={"receivers": 3, "reject_unknown": True,
                                            "allowed_peers": [{"ae_title": f"CT0{k}"} for k in range(6)]},
                         api={"public_metrics": True})
    studies = [write_study(tmp_path / f"study{k}", n=6, patient_id=f"P{k}") for k in range(6)]
    with Node(config, job_command=["/bin/true"]) as node:
        pids = node.receivers.pids()
        assert len(pids) == 3 and os.getpid() not in pids
        senders = [storescu(node.port, study, f"CT0{k}") for k, study in enumerate(studies)]
        outputs = [(p.wait(120), p.stdout.read()) for p in senders]  # type: ignore[union-attr]
        assert all(rc == 0 for rc, _ in outputs), outputs
        stranger = storescu(node.port, studies[0], "STRANGER")
        assert stranger.wait(60) != 0

        wait_until(lambda: len(node.jobs()) == 6 and all(j.instances == 6 for j in node.jobs()), 30)
        assert sorted(j.patient_id for j in node.jobs()) == [f"P{k}" for k in range(6)]
        assert node.rejected_associations() == {"calling_ae": 1}
        with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/metrics", timeout=30) as r:
            metrics = r.read().decode()
        assert metric_value(metrics, "radnode_associations_rejected_total", reason="calling_ae") == 1
        assert metric_value(metrics, "radnode_instances_received_total", calling_ae="CT03") == 6
        audit = (config.data_dir / "audit" / "audit.log").read_text().splitlines()
        transferred = [m for m in audit if 'csd-code="110104"' in m]  # DICOM Instances Transferred
        assert len(transferred) == 6 and all(any(f"CT0{k}" in m for m in transferred) for k in range(6))
        assert sum('csd-code="110113"' in m and "STRANGER" in m for m in audit) == 1  # the rejection's alert
    assert not any(process_alive(pid) for pid in pids)  # the node's stop ends its receivers


def test_association_limits_hold_across_the_receivers(tmp_path: Path) -> None:
    config = node_config(tmp_path, ingress={"receivers": 3, "max_associations": 3, "max_associations_per_peer": 1})
    with Node(config, job_command=["/bin/true"]) as node:
        held = associate(node.port, "GREEDY")
        assert held.is_established
        tries = [associate(node.port, "GREEDY") for _ in range(6)]  # the kernel spreads them over the receivers
        assert all(a.is_rejected for a in tries)
        others = [associate(node.port, f"OTHER{k}") for k in range(3)]
        assert [a.is_established for a in others] == [True, True, False]  # 3 in all, whichever process holds them
        for a in [held, *others[:2]]:
            a.release()
        again = associate(node.port, "GREEDY")
        assert again.is_established  # the slots came back at the releases
        again.release()


def test_a_killed_receiver_is_started_again_and_its_slots_are_freed(tmp_path: Path) -> None:
    config = node_config(tmp_path, ingress={"receivers": 2, "max_associations_per_peer": 1})
    study = write_study(tmp_path / "study", n=4)
    with Node(config, job_command=["/bin/true"]) as node:
        held = associate(node.port, "GREEDY")
        assert held.is_established
        before = node.receivers.pids()
        for pid in before:
            os.kill(pid, signal.SIGKILL)  # the one holding GREEDY's association among them
        wait_until(lambda: len(node.receivers.pids()) == 2 and not set(node.receivers.pids()) & set(before), 60)
        wait_until(lambda: not held.is_alive(), 30)  # its connection went with its process
        again = associate(node.port, "GREEDY")
        assert again.is_established  # the dead process's slot was dropped
        again.release()
        sender = storescu(node.port, study, "GREEDY")
        assert sender.wait(60) == 0, sender.stdout.read()  # type: ignore[union-attr]
        wait_until(lambda: len(node.jobs()) == 1 and node.jobs()[0].instances == 4, 30)

        second = Node(node_config(tmp_path / "second", port=node.port, ingress={"receivers": 2}), ["/bin/true"])
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{node.port}"):
            second.start()  # never two nodes splitting one port's senders between them
        second.stop()


def test_tls_only_receivers_store_over_tls_and_count_failed_handshakes(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = {"port": 0, "certificate": str(pki.server_cert), "private_key": str(pki.server_key), "ca_bundle": str(pki.ca)}
    config = node_config(tmp_path, ingress={"receivers": 2, "plain_listener": False, "tls": tls})
    study = write_study(tmp_path / "study", n=3)
    with Node(config, job_command=["/bin/true"]) as node:
        assert node.port == node.tls_port
        plain = [storescu(node.tls_port, study) for _ in range(3)]
        assert all(p.wait(60) != 0 for p in plain)
        secure = subprocess.run([STORESCU, "-aet", "CT01", "-aec", "RADNODE", "+tls", str(pki.client_key),
                                 str(pki.client_cert), "+cf", str(pki.ca), "127.0.0.1", str(node.tls_port),
                                 *map(str, study)], capture_output=True, text=True, timeout=60)
        assert secure.returncode == 0, secure.stdout + secure.stderr
        wait_until(lambda: len(node.jobs()) == 1 and node.jobs()[0].instances == 3, 30)
        wait_until(lambda: node.tls_failures() == 3, 10)  # each plain attempt, in whichever receiver it landed
