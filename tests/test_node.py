"""The whole node: studies in over DICOM, jobs in their own processes, results out; killed and restarted.

Jobs run a stand-in job command (a real Python subprocess written by the test, ``support.node.STAND_IN``)
unless the test is the end-to-end one, which runs the real ``radnode run`` on a real CT series.
"""

from __future__ import annotations

import os
import signal
import subprocess
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import yaml

from factories import write_study
from radnode.config import Config, DicomPeer
from radnode.node.service import Node
from radnode.node.store import JobState, JobStore
from radnode.node.worker import failure_reason, oom_kills
from radnode.peers import FhirServer, StoreSCP, free_port
from support.dicom_tools import ECHOSCU, STORESCU, storescu
from support.node import final_job, jobs_by_patient, node_config, patients, process_alive
from support.waiting import wait_until

def test_a_failing_job_is_recorded_while_another_study_completes(tmp_path: Path, stand_in: list[str],
                                                                  pacs: StoreSCP, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAND_IN_FAIL_BAD", "no image series in the input")
    with FhirServer(tmp_path / "fhir") as fhir:
        config = node_config(tmp_path, egress={"destinations": {"pacs": pacs.destination, "ehr": fhir.destination}},
                             processing={"max_concurrent_jobs": 2})
        write_study(tmp_path / "good", n=5, patient_id="GOOD")
        write_study(tmp_path / "bad", n=1, patient_id="BAD")
        with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
            for folder in ("bad", "good"):
                assert storescu(node.port, tmp_path / folder, calling_ae="SCANNER").returncode == 0
            jobs = jobs_by_patient(node, 2)
            bad, good = final_job(node, jobs["BAD"].id), final_job(node, jobs["GOOD"].id)
            assert bad.state is JobState.FAILED and bad.reason == "no image series in the input"
            assert good.state is JobState.DONE and good.instances == 5 and good.calling_ae == "SCANNER"
            assert good.needs_review is None  # its manifest has no review decision: not assessed
            kinds = [e.kind for e in node.events(good.id)]
            assert kinds == ["received", "queued", "running", "finished", "delivered", "delivered", "done"]
            assert [e.kind for e in node.events(bad.id)][-1] == "failed"
        assert len(pacs.received()) == 1 and patients(fhir) == 1
    outbox = tmp_path / "data" / "outbox" / str(good.id)
    assert sorted(p.name for p in outbox.iterdir()) == ["fhir-bundle.json", "manifest.json", "result.dcm"]


def test_a_job_over_its_time_limit_is_killed_and_the_next_one_runs(tmp_path: Path, stand_in: list[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAND_IN_SECONDS_SLOW", "60")
    # the limit leaves the quick job time to start Python and import pydicom on a loaded 2-core machine
    config = node_config(tmp_path, processing={"job_timeout_seconds": 6, "max_concurrent_jobs": 1})
    write_study(tmp_path / "slow", n=2, patient_id="SLOW")
    write_study(tmp_path / "quick", n=2, patient_id="QUICK")
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        assert storescu(node.port, tmp_path / "slow").returncode == 0
        wait_until(lambda: any(j.state is JobState.RUNNING for j in node.jobs()))
        assert storescu(node.port, tmp_path / "quick").returncode == 0
        jobs = jobs_by_patient(node, 2)
        slow, quick = final_job(node, jobs["SLOW"].id), final_job(node, jobs["QUICK"].id)
        assert slow.state is JobState.FAILED and slow.reason == "timed out after 6 s"
        assert quick.state is JobState.DONE
    pid = int((tmp_path / "data" / "jobs" / str(slow.id) / "pid").read_text())
    assert not process_alive(pid)


def test_instances_arriving_while_the_job_runs_are_kept_but_not_its_input(
        tmp_path: Path, stand_in: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    gate = tmp_path / "job-may-end"
    monkeypatch.setenv("STAND_IN_GATE_P1", str(gate))  # the job runs until the late instance is in
    config = node_config(tmp_path, ingress={"late_instances": "ignore"})
    first = write_study(tmp_path / "first", n=3)
    study_uid = pydicom.dcmread(first[0]).StudyInstanceUID
    write_study(tmp_path / "late", n=1, study_uid=study_uid)
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        assert storescu(node.port, tmp_path / "first").returncode == 0
        wait_until(lambda: node.jobs() and node.jobs()[0].state is JobState.RUNNING)
        assert storescu(node.port, tmp_path / "late").returncode == 0
        gate.touch()
        job = final_job(node, node.jobs()[0].id)
        assert job.state is JobState.DONE and (job.instances, job.late_instances) == (3, 1)
        assert "late" in [e.kind for e in node.events(job.id)]
    manifest = (tmp_path / "data" / "outbox" / str(job.id) / "manifest.json").read_text()
    assert manifest == '{"inputs": 3}'
    assert len(list((tmp_path / "data" / "spool" / study_uid).glob("*/*.dcm"))) == 4


def test_stopped_while_running_the_job_is_ended_and_runs_again_at_the_next_start(
        tmp_path: Path, stand_in: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAND_IN_SECONDS_P1", "30")
    config = node_config(tmp_path)
    write_study(tmp_path / "study", n=2)
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        assert storescu(node.port, tmp_path / "study").returncode == 0
        wait_until(lambda: node.jobs() and node.jobs()[0].state is JobState.RUNNING)
        pid_file = tmp_path / "data" / "jobs" / "1" / "pid"
        wait_until(pid_file.exists)
    assert not process_alive(int(pid_file.read_text()))
    monkeypatch.setenv("STAND_IN_SECONDS_P1", "0")
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        job = final_job(node, 1)
        assert job.state is JobState.DONE and job.runs == 2
        (requeued,) = [e for e in node.events(1) if e.kind == "requeued"]
        assert "node stopped while the job was running" in requeued.message


class NodeProcess:
    """The node as its own process (what ``radnode serve`` runs), killable with SIGKILL."""

    def __init__(self, config: Config, job_command: list[str], env: dict[str, str]) -> None:
        self.config, self.job_command, self.env = config, job_command, env
        self.config_file = config.data_dir.parent / "node.yaml"
        self.config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
        self.process: subprocess.Popen | None = None

    def start(self) -> "NodeProcess":
        code = ("import sys; from radnode.config import load_config; from radnode.node.service import run_node; "
                "run_node(load_config(sys.argv[1]), job_command=sys.argv[2:])")
        self.process = subprocess.Popen([sys.executable, "-c", code, str(self.config_file), *self.job_command],
                                        env=self.env, stderr=subprocess.DEVNULL)
        port = str(self.config.ingress.port)
        wait_until(lambda: subprocess.run([ECHOSCU, "-aec", "RADNODE", "127.0.0.1", port],
                                          capture_output=True).returncode == 0,
                   timeout=60)  # a node's start (imports, recovery) took over 20 s at load 13 on 2 cores
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> None:
        assert self.process is not None
        self.process.terminate()
        assert self.process.wait(20) == 0


def _only_job(store: JobStore, state: JobState) -> Callable[[], bool]:
    return lambda: [j.state for j in store.jobs()] == [state]


def test_killed_while_running_the_job_runs_again_and_delivers_once(tmp_path: Path, stand_in: list[str],
                                                                   pacs: StoreSCP) -> None:
    config = node_config(tmp_path, port=free_port(), egress={"destinations": {"pacs": pacs.destination}})
    node = NodeProcess(config, stand_in, {**os.environ, "STAND_IN_SECONDS_P1": "1.5"}).start()
    write_study(tmp_path / "study", n=4)
    assert storescu(config.ingress.port, tmp_path / "study").returncode == 0
    store = JobStore(config.data_dir / "radnode.db")
    wait_until(_only_job(store, JobState.RUNNING))
    pid_file = config.data_dir / "jobs" / "1" / "pid"
    wait_until(pid_file.exists)
    node.kill()
    wait_until(lambda: not process_alive(int(pid_file.read_text())), timeout=5)  # no orphan job outlives the node
    assert pacs.received_uids() == []
    node.start()
    wait_until(_only_job(store, JobState.DONE))
    node.terminate()
    (job,) = store.jobs()
    assert job.runs == 2 and job.instances == 4
    assert "requeued" in [e.kind for e in store.events(job.id)]
    (result,) = (config.data_dir / "outbox" / "1").glob("*.dcm")
    assert pacs.received_uids() == [pydicom.dcmread(result).SOPInstanceUID]
    store.close()


def _stream_and_kill(port: int, files: list[Path], answered: int, kill: Callable[[], None]) -> list[Path]:
    """Send ``files`` with DCMTK storescu (one association), call ``kill`` the moment ``answered`` of them got a
    Success response (storescu is sending the next one), and return every file answered Success, in order."""
    sender = subprocess.Popen([STORESCU, "-v", "-aet", "MODALITY", "-aec", "RADNODE", "127.0.0.1", str(port),
                               *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert sender.stderr is not None
    sending: Path | None = None
    succeeded: list[Path] = []
    for line in sender.stderr:  # "Sending file: PATH" ... "Received Store Response (Success)", one pair per file
        if line.startswith("I: Sending file: "):
            sending = Path(line.removeprefix("I: Sending file: ").strip())
        elif line.startswith("I: Received Store Response (Success)"):
            assert sending is not None
            succeeded.append(sending)
            if len(succeeded) == answered:
                kill()
    assert sender.wait(30) != 0  # the association broke off: storescu did not get to the end
    return succeeded


def test_every_instance_answered_success_before_a_sigkill_is_in_the_spool_and_the_store(tmp_path: Path,
                                                                                       stand_in: list[str]) -> None:
    """Per-object durability (issue 12): an instance answered Success was on disk and recorded before the answer,
    so a node killed with SIGKILL in the middle of a stream holds every one of them after its restart, whole, and
    no half-written file; what was in flight at the kill is either whole too or not there (the sender resends it)."""
    config = node_config(tmp_path, port=free_port(), ingress={"study_idle_seconds": 60, "study_quiet_seconds": 60})
    files = write_study(tmp_path / "study", n=120)
    node = NodeProcess(config, stand_in, dict(os.environ)).start()
    succeeded = _stream_and_kill(config.ingress.port, files, answered=40, kill=node.kill)
    node.start()  # recovery: partial writes dropped, unknown spool files indexed
    node.terminate()
    store = JobStore(config.data_dir / "radnode.db")
    spooled = {pydicom.dcmread(path).SOPInstanceUID: path for path in (config.data_dir / "spool").glob("*/*/*.dcm")}
    indexed = {i.sop_instance_uid: i for job in store.jobs() for i in store.instances(job.id)}
    for sent in succeeded:
        source = pydicom.dcmread(sent)
        uid = source.SOPInstanceUID
        assert uid in spooled and uid in indexed and indexed[uid].path == str(spooled[uid])
        assert pydicom.dcmread(spooled[uid]).PixelData == source.PixelData
    assert len(succeeded) == 40 and set(spooled) == set(indexed)  # in flight at the kill: both or neither
    for path in spooled.values():  # nothing half-written under a final name
        kept = pydicom.dcmread(path)
        assert kept.pixel_array.shape == (16, 16)
    assert not list((config.data_dir / "spool" / ".incoming").iterdir())
    store.close()


def test_killed_while_delivering_only_undelivered_results_are_sent(tmp_path: Path, stand_in: list[str],
                                                                   pacs: StoreSCP) -> None:
    archive = DicomPeer(ae_title="ARCHIVE", host="127.0.0.1", port=free_port())  # down at first
    destinations = {"pacs": pacs.destination, "archive": str(archive)}
    config = node_config(tmp_path, port=free_port(), egress={"destinations": destinations})
    node = NodeProcess(config, stand_in, dict(os.environ)).start()
    write_study(tmp_path / "study", n=2)
    assert storescu(config.ingress.port, tmp_path / "study").returncode == 0
    store = JobStore(config.data_dir / "radnode.db")
    wait_until(lambda: {(d.destination, d.state, d.attempts >= 2) for d in store.deliveries(1)}
               == {("pacs", "done", False), ("archive", "pending", True)})
    node.kill()
    with StoreSCP(tmp_path / "archive", ae_title="ARCHIVE", port=archive.port) as second:
        node.start()
        wait_until(_only_job(store, JobState.DONE))
        node.terminate()
        assert len(pacs.received()) == 1 and second.received_uids() == pacs.received_uids()
    (job,) = store.jobs()
    assert job.runs == 1
    store.close()


def test_every_pipeline_the_rules_select_runs_and_delivers_and_the_study_is_forwarded_once(
        tmp_path: Path, stand_in: list[str], pacs: StoreSCP, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADNODE_PIPELINES", "ct_copy=radnode.apps.ct_tissue.app:CTTissueApp")
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: ct\n    when: {Modality: CT}\n    pipelines: [ct_tissue, ct_copy]\n"
                     "    forward: [ARCHIVE]\n")
    with StoreSCP(tmp_path / "archive") as archive:
        config = node_config(tmp_path, egress={"destinations": {
            "pacs": pacs.destination, "ARCHIVE": {**archive.destination, "forward_only": True}}})
        config = config.model_copy(update={"rules": rules})
        write_study(tmp_path / "study", n=3, patient_id="P1")
        with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
            assert storescu(node.port, tmp_path / "study").returncode == 0
            wait_until(lambda: len(node.jobs()) == 2)
            main, sibling = (final_job(node, j.id) for j in node.jobs())
            assert (main.pipeline, main.state, main.forwards, main.sibling_of) == (
                "ct_tissue", JobState.DONE, ("ARCHIVE",), None)
            assert (sibling.pipeline, sibling.state, sibling.forwards, sibling.sibling_of) == (
                "ct_copy", JobState.DONE, (), main.id)
            assert main.instances == sibling.instances == 3
            assert [e.kind for e in node.events(sibling.id)] == ["queued", "running", "finished", "delivered", "done"]
            assert any(e.kind == "route" and f"started sibling job {sibling.id} (ct_copy)" in e.message
                       for e in node.events(main.id))
        results = [pydicom.dcmread(p) for p in pacs.received()]
        forwarded = [pydicom.dcmread(p) for p in archive.received()]
    assert len(results) == 2 and len({ds.SOPInstanceUID for ds in results}) == 2
    assert len(forwarded) == 1 and forwarded[0].SOPInstanceUID in {ds.SOPInstanceUID for ds in results}


def test_a_study_forwarded_again_after_late_instances_sends_only_what_the_destination_lacks(
        tmp_path: Path, stand_in: list[str]) -> None:
    """A forward-only rule under ``late_instances: rerun``: the study is forwarded, then two more slices arrive in
    a second association; the re-run forwards those two only, so the archive holds each instance once."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: archive\n    when: {Modality: CT}\n    pipelines: []\n"
                     "    forward: [ARCHIVE]\n    completeness: {late_instances: rerun}\n")
    study = write_study(tmp_path / "study", n=5, patient_id="P1")
    first, late = tmp_path / "first", tmp_path / "late"
    for folder, files in ((first, study[:3]), (late, study[3:])):
        folder.mkdir()
        for path in files:
            shutil.copy(path, folder / path.name)
    with StoreSCP(tmp_path / "archive", ae_title="ARCHIVE") as archive:
        config = node_config(tmp_path, egress={"destinations": {
            "ARCHIVE": {**archive.destination, "forward_only": True}}}).model_copy(update={"rules": rules})
        with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
            assert storescu(node.port, first).returncode == 0
            wait_until(lambda: len(node.jobs()) == 1)
            forward = final_job(node, node.jobs()[0].id)
            assert forward.state is JobState.DONE and len(archive.received()) == 3
            assert storescu(node.port, late).returncode == 0
            wait_until(lambda: len(node.jobs()) == 2)
            rerun = final_job(node, max(j.id for j in node.jobs()))
            finished = next(e.message for e in node.events(rerun.id) if e.kind == "finished")
            node_inputs = node.store.job_inputs(rerun.id)
        received = archive.received_uids()
    assert rerun.state is JobState.DONE and len(node_inputs) == 5
    assert sorted(received) == sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in study), received
    assert f"3 instance(s) not sent to ARCHIVE again: forwarded there by job(s) {forward.id}" in finished


def test_a_job_killed_by_sigkill_says_so_and_runs_once_more(tmp_path: Path, stand_in: list[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL from outside (as the OOM killer sends it) is transient: the job runs again (processing.retries: 1)
    and its events keep the first attempt's reason; a second SIGKILL fails it, naming the signal."""
    monkeypatch.setenv("STAND_IN_SECONDS_P1", "30")
    write_study(tmp_path / "study", n=2)
    pid_file = tmp_path / "data" / "jobs" / "1" / "pid"

    def kill_the_running_attempt(attempt: int) -> None:
        wait_until(lambda: node.job(1) is not None and node.job(1).runs == attempt  # type: ignore[union-attr]
                   and pid_file.exists() and pid_file.read_text().strip() != "", timeout=60)
        pid = int(pid_file.read_text())
        pid_file.unlink()
        os.kill(pid, signal.SIGKILL)

    with Node(node_config(tmp_path), job_command=stand_in, poll_seconds=0.05) as node:
        assert storescu(node.port, tmp_path / "study").returncode == 0
        kill_the_running_attempt(1)
        kill_the_running_attempt(2)
        job = final_job(node, 1)
        events = node.events(1)
    (retry,) = [e for e in events if e.kind == "retry"]
    assert retry.message.startswith("attempt 1 ended: killed by signal 9 (SIGKILL)") and "retry 1 of 1" in retry.message
    assert job.state is JobState.FAILED and job.runs == 2
    assert job.reason.startswith("killed by signal 9 (SIGKILL)") and "attempt 2" in job.reason
    assert [e.kind for e in events].count("running") == 2


def test_the_reason_of_a_signal_comes_before_the_last_stderr_line() -> None:
    reason = failure_reason(-signal.SIGKILL, "[warning] [gxf] CUDA driver not found", oom_kills_before=0)
    assert reason.startswith("killed by signal 9 (SIGKILL)") and reason.endswith("CUDA driver not found")
    assert failure_reason(-signal.SIGSEGV, "") == "killed by signal 11 (SIGSEGV)"
    assert failure_reason(3, "no image series in the input") == "no image series in the input"
    assert failure_reason(2, "") == "job process exited with status 2"


def test_an_oom_kill_is_read_from_the_cgroup(tmp_path: Path) -> None:
    (tmp_path / "proc").write_text("0::/radnode.slice/node\n")
    events = tmp_path / "cg" / "radnode.slice" / "node" / "memory.events"
    events.parent.mkdir(parents=True)
    events.write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n")
    assert oom_kills(tmp_path / "proc", tmp_path / "cg") == 2
    assert oom_kills(tmp_path / "missing", tmp_path / "cg") is None
