"""Warm job start (``radnode/node/warm.py``): a job handed to a pre-imported process is as isolated as a cold one.

The leaky app is a real Holoscan application written by the test and registered through ``$RADNODE_PIPELINES``;
for a study of patient CRASH it leaks a few hundred MB into a module global and then segfaults.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from factories import write_study
from radnode.execution import RunManifest
from radnode.node.service import Node
from radnode.node.store import JobState
from radnode.node.worker import DEFAULT_JOB_COMMAND
from support.dicom_tools import storescu
from support.node import final_job, node_config, process_alive
from support.waiting import wait_until

LEAK_MB = 400

LEAKY_APP = {
    "__init__.py": '"""A site application that leaks and crashes on patient CRASH, and reports its process."""\n',
    "app.py": textwrap.dedent(f'''
        import ctypes
        import json
        import os
        from pathlib import Path

        import pydicom
        from holoscan.conditions import CountCondition
        from holoscan.core import Application, Operator, OperatorSpec

        from radnode.execution import app_paths

        LEAKED = []  # module state a warm process would carry from one job into the next


        def resident_mb() -> float:
            status = Path("/proc/self/status").read_text().splitlines()
            return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) / 1024


        class LeakOperator(Operator):
            def setup(self, spec: OperatorSpec) -> None:
                pass

            def compute(self, op_input, op_output, context) -> None:
                source, out = app_paths("leaky_site", self.fragment.argv)
                patient = pydicom.dcmread(next(source.iterdir()), stop_before_pixels=True).PatientID
                state = {{"pid": os.getpid(), "leaked": len(LEAKED), "resident_mb": resident_mb()}}
                if patient == "CRASH":
                    LEAKED.append(b"\\x01" * ({LEAK_MB} * 2**20))
                    Path(out, "..", "crashed.json").write_text(json.dumps({{**state, "resident_mb": resident_mb()}}))
                    ctypes.string_at(0)  # SIGSEGV
                Path(out, "state.txt").write_text(json.dumps(state))


        class LeakyApp(Application):
            version = "0.0.1"

            def compose(self) -> None:
                self.add_operator(LeakOperator(self, CountCondition(self, 1), name="leak"))
    '''),
}

ROUTE = """\
rules:
  - name: site-app
    when: {Modality: CT}
    pipelines: [leaky_site]
"""


@pytest.fixture
def leaky_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The leaky app as an installed site pipeline; returns the rule file that routes every CT to it."""
    package = tmp_path / "site" / "leakysite"
    package.mkdir(parents=True)
    for name, text in LEAKY_APP.items():
        (package / name).write_text(text)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(package.parent),
                                                                   os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("RADNODE_PIPELINES", "leaky_site=leakysite.app:LeakyApp")
    rules = tmp_path / "rules.yaml"
    rules.write_text(ROUTE)
    return rules


def _running_event(node: Node, job_id: int) -> str:
    return next(e.message for e in node.events(job_id) if e.kind == "running")


def test_a_job_that_leaks_and_segfaults_in_a_warm_process_leaves_the_next_job_untouched(
        tmp_path: Path, leaky_site: Path) -> None:
    config = node_config(tmp_path).model_copy(update={"rules": leaky_site})
    write_study(tmp_path / "crash", n=2, patient_id="CRASH")
    write_study(tmp_path / "fine", n=2, patient_id="FINE")
    jobs = tmp_path / "data" / "jobs"
    with Node(config, job_command=list(DEFAULT_JOB_COMMAND), poll_seconds=0.05) as node:
        wait_until(lambda: (jobs / "warm" / "leaky_site.log").exists(), 30)  # the spare is being started
        assert storescu(node.port, tmp_path / "crash").returncode == 0
        wait_until(lambda: len(node.jobs()) == 1)
        crashed = final_job(node, node.jobs()[0].id, timeout=120)
        assert storescu(node.port, tmp_path / "fine").returncode == 0
        wait_until(lambda: len(node.jobs()) == 2)
        fine = final_job(node, max(j.id for j in node.jobs()), timeout=120)
        commands = [_running_event(node, job.id) for job in (crashed, fine)]
    assert crashed.state is JobState.FAILED and crashed.reason.startswith("killed by signal 11 (SIGSEGV)")
    assert fine.state is JobState.DONE, fine.reason
    assert all(c.endswith(", warm process)") for c in commands), commands
    before = json.loads((jobs / str(crashed.id) / "crashed.json").read_text())
    after = json.loads((jobs / str(fine.id) / "out" / "state.txt").read_text())
    assert before["resident_mb"] > LEAK_MB  # the leak was real and resident when it crashed
    assert after["leaked"] == 0 and after["pid"] != before["pid"] and not process_alive(before["pid"])
    assert after["resident_mb"] < LEAK_MB  # a fresh address space: nothing of the crashed job's memory
    manifest = RunManifest.read(jobs / str(fine.id) / "out")
    assert manifest.peak_rss_bytes < LEAK_MB * 2**20


def test_without_warm_start_the_job_starts_cold(tmp_path: Path, leaky_site: Path) -> None:
    config = node_config(tmp_path, processing={"warm_start": False}).model_copy(update={"rules": leaky_site})
    write_study(tmp_path / "fine", n=2, patient_id="FINE")
    with Node(config, job_command=list(DEFAULT_JOB_COMMAND), poll_seconds=0.05) as node:
        assert storescu(node.port, tmp_path / "fine").returncode == 0
        wait_until(lambda: len(node.jobs()) == 1)
        job = final_job(node, node.jobs()[0].id, timeout=120)
        command = _running_event(node, job.id)
    assert job.state is JobState.DONE, job.reason
    assert command.endswith("processing.job_timeout_seconds)") and "warm process" not in command
    assert not (tmp_path / "data" / "jobs" / "warm").exists()
