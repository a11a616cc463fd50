"""Many studies at once: priority order, bounded concurrency, a hung pipeline killed at its timeout.

Studies arrive over real associations (DCMTK storescu, several senders in parallel); jobs run the
stand-in job command (``support.node.STAND_IN``) in their own processes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from factories import write_study
from radnode.node.service import Node
from radnode.node.store import JobState
from support.dicom_tools import STORESCU, storescu
from support.node import node_config
from support.waiting import wait_until

PRIORITY_RULES = """\
rules:
  - name: research
    when: {calling_ae: RESEARCH}
    pipelines: [ct_tissue]
    priority: off-peak
    stop: true
  - name: ct
    when: {Modality: CT}
    pipelines: [ct_tissue]
  - name: emergency
    when: {calling_ae: ER_CT}
    priority: stat
"""


def _started(node: Node, job_id: int) -> float:
    return next(e.at for e in node.events(job_id) if e.kind == "running")


def test_queued_jobs_start_by_priority_then_arrival(tmp_path: Path, stand_in: list[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    gate = tmp_path / "blocker-may-end"
    monkeypatch.setenv("STAND_IN_GATE_BLOCKER", str(gate))
    rules = tmp_path / "rules.yaml"
    rules.write_text(PRIORITY_RULES)
    config = node_config(tmp_path, processing={"max_concurrent_jobs": 1}).model_copy(update={"rules": rules})
    write_study(tmp_path / "blocker", n=1, patient_id="BLOCKER")
    senders = [("research", "RESEARCH"), ("routine1", "CT1"), ("routine2", "CT2"), ("stat", "ER_CT")]
    for name, _ in senders:
        write_study(tmp_path / name, n=2, patient_id=name.upper())
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        assert storescu(node.port, tmp_path / "blocker").returncode == 0
        wait_until(lambda: node.jobs() and node.jobs()[0].state is JobState.RUNNING)
        for name, aet in senders:  # all queued while the blocker runs, the stat study last
            assert storescu(node.port, tmp_path / name, calling_ae=aet).returncode == 0
        wait_until(lambda: [j.state for j in node.jobs()].count(JobState.QUEUED) == 4, timeout=60)
        gate.touch()
        wait_until(lambda: len(node.jobs()) == 5 and all(j.state is JobState.DONE for j in node.jobs()), timeout=90)
        order = [j.patient_id for j in sorted(node.jobs(), key=lambda j: _started(node, j.id))]
    assert order == ["BLOCKER", "STAT", "ROUTINE1", "ROUTINE2", "RESEARCH"]


@pytest.mark.slow
def test_twenty_studies_from_four_senders_at_once_with_one_hung_pipeline(tmp_path: Path, stand_in: list[str],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAND_IN_SECONDS_S1N2", "600")  # this one hangs
    config = node_config(tmp_path, ingress={"study_idle_seconds": 30},
                         processing={"max_concurrent_jobs": 2, "job_timeout_seconds": 8})
    for sender in range(4):
        for n in range(5):
            write_study(tmp_path / f"sender{sender}" / f"study{n}", n=3, patient_id=f"S{sender}N{n}")
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        senders = [subprocess.Popen([STORESCU, "-aet", f"SENDER{i}", "-aec", "RADNODE", "+sd", "+r", "127.0.0.1",
                                     str(node.port), str(tmp_path / f"sender{i}")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(4)]
        assert [p.wait(120) for p in senders] == [0, 0, 0, 0]
        wait_until(lambda: len(node.jobs()) == 20 and all(j.state in (JobState.DONE, JobState.FAILED)
                                                          for j in node.jobs()), timeout=240, step=0.2)
        jobs = {j.patient_id: j for j in node.jobs()}
    hung = jobs.pop("S1N2")
    assert hung.state is JobState.FAILED and hung.reason == "timed out after 8 s"
    assert all(j.state is JobState.DONE and j.instances == 3 for j in jobs.values())
    assert {j.calling_ae for j in jobs.values()} == {"SENDER0", "SENDER1", "SENDER2", "SENDER3"}
