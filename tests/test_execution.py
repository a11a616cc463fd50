"""One execution contract, chosen per route: in-process, subprocess (the MAP command) or container.

The slow app is a real MONAI Deploy (Holoscan) application package written by the test and registered
through ``$RADNODE_PIPELINES``, the site-pipeline extension point; nothing in the shipped apps knows it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pydicom
import pytest
import yaml

from factories import restore_totalseg_dicom, write_chest_phantom, write_study
from radnode.config import ConfigError, ContainersConfig
from radnode.container_engine import Engine, cdi_gpu_devices
from radnode.execution import REISSUE_ENV, RunManifest
from radnode.node.executors import (
    CONTAINER_CONFIG_PATH,
    ContainerExecutor,
    InProcessExecutor,
    JobRun,
    SubprocessExecutor,
    Timeout,
    check_models,
    resolve_timeout,
)
from radnode.node.egress import Egress
from radnode.node.service import Node
from radnode.node.store import Instance, JobState, JobStore
from radnode.node.worker import Scheduler
from radnode.outputs.sr import read_measurements
from radnode.pipelines.registry import PipelineRegistryError, get_pipeline
from radnode.pipelines.conditions import RuleError
from radnode.pipelines.routing import Execution, ExecutionMode, SeriesDecision
from radnode.pipelines.rules import parse_rules
from support.dicom_tools import storescu
from support.node import final_job, jobs_by_patient, node_config, process_alive

SLOW_APP = {
    "__init__.py": '"""A site application that never finishes: its only operator sleeps."""\n',
    "app.py": textwrap.dedent('''
        import os
        import time
        from pathlib import Path

        from holoscan.conditions import CountCondition
        from holoscan.core import Application, Operator, OperatorSpec


        class SleepOperator(Operator):
            def setup(self, spec: OperatorSpec) -> None:
                pass

            def compute(self, op_input, op_output, context) -> None:
                Path(os.environ["HOLOSCAN_WORKDIR"], "sleeping.pid").write_text(str(os.getpid()))
                time.sleep(600)


        class SlowApp(Application):
            version = "0.0.1"

            def compose(self) -> None:
                self.add_operator(SleepOperator(self, CountCondition(self, 1), name="sleep"))
    '''),
    "__main__.py": textwrap.dedent('''
        from radnode.execution import app_main

        raise SystemExit(app_main("slow_site"))
    '''),
}

CT_ROUTES = """\
  - name: ct
    when: {Modality: CT}
    pipelines: [ct_tissue]
  - name: map-host
    when: {calling_ae: MAP_HOST}
    execution: {mode: subprocess}
"""
SITE_ROUTE = """\
rules:
  - name: site-app
    when: {calling_ae: SITE_CT}
    pipelines: [slow_site]
    execution: {mode: subprocess, timeout_seconds: 5}
    stop: true
"""


def _rules(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


def _running_event(node: Node, job_id: int) -> str:
    return next(e.message for e in node.events(job_id) if e.kind == "running")


def test_a_subprocess_route_with_a_5_s_timeout_kills_the_slow_app_and_the_in_process_study_proceeds(
        tmp_path: Path, stand_in: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    (site / "slowsite").mkdir(parents=True)
    for name, text in SLOW_APP.items():
        (site / "slowsite" / name).write_text(text)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("RADNODE_PIPELINES", "slow_site=slowsite.app:SlowApp")
    config = node_config(tmp_path, processing={"max_concurrent_jobs": 2}).model_copy(
        update={"rules": _rules(tmp_path, SITE_ROUTE + CT_ROUTES)})
    write_study(tmp_path / "slow", n=2, patient_id="SLOW")
    write_study(tmp_path / "quick", n=2, patient_id="QUICK")
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        assert storescu(node.port, tmp_path / "slow", calling_ae="SITE_CT").returncode == 0
        assert storescu(node.port, tmp_path / "quick").returncode == 0
        jobs = jobs_by_patient(node, 2)
        slow, quick = final_job(node, jobs["SLOW"].id), final_job(node, jobs["QUICK"].id)
        slow_events = {e.kind: e for e in node.events(slow.id)}
        quick_command = _running_event(node, quick.id)
    assert slow.pipeline == "slow_site" and slow.execution == Execution(ExecutionMode.SUBPROCESS, 5)
    assert slow.state is JobState.FAILED and slow.reason == "timed out after 5 s (subprocess)"
    running, failed = slow_events["running"], slow_events["failed"]
    assert running.message == f"subprocess: {sys.executable} -m slowsite (timeout 5 s, route)"
    assert failed.message == slow.reason and 5 <= failed.at - running.at < 8
    pid_file = tmp_path / "data" / "jobs" / str(slow.id) / "work" / "sleeping.pid"
    assert pid_file.exists(), "the app never reached its operator: the kill did not hit a running app"
    assert not process_alive(int(pid_file.read_text()))
    assert quick.state is JobState.DONE and quick.execution == Execution()
    assert quick_command.startswith(f"in-process: {sys.executable} ")
    assert quick_command.endswith("--pipeline ct_tissue (timeout 60 s, processing.job_timeout_seconds)")


@pytest.mark.slow
def test_subprocess_execution_gives_the_same_outputs_as_in_process_on_a_real_ct(
        tmp_path: Path, totalseg_reference: Path, real_ct_folder: Path) -> None:
    second_copy = tmp_path / "real_ct_again"
    restore_totalseg_dicom(totalseg_reference, second_copy, patient_id="TS0002")
    config = node_config(tmp_path).model_copy(update={"rules": _rules(tmp_path, "rules:\n" + CT_ROUTES)})
    with Node(config, poll_seconds=0.1) as node:  # the real job command: python -m radnode run
        assert storescu(node.port, real_ct_folder, options=("-xv",)).returncode == 0
        assert storescu(node.port, second_copy, calling_ae="MAP_HOST", options=("-xv",)).returncode == 0
        jobs = jobs_by_patient(node, 2)
        in_process, by_map = (final_job(node, jobs[p].id, timeout=300) for p in ("TS0001", "TS0002"))
        commands = [_running_event(node, job.id) for job in (in_process, by_map)]
    assert (in_process.state, by_map.state) == (JobState.DONE, JobState.DONE), (in_process.reason, by_map.reason)
    assert commands[0].startswith("in-process: ")  # a warm job process: the same outputs as the MAP command's
    assert commands[0].endswith("processing.job_timeout_seconds, warm process)")
    assert commands[1] == f"subprocess: {sys.executable} -m radnode.apps.ct_tissue (timeout 900 s, MAP app.json)"
    outbox = tmp_path / "data" / "outbox"
    files = [sorted(p.name for p in (outbox / str(job.id)).iterdir()) for job in (in_process, by_map)]
    assert files[0] == files[1] and "sr.dcm" in files[0]

    def values(job_id: int) -> list[tuple]:
        rows = read_measurements(pydicom.dcmread(outbox / str(job_id) / "sr.dcm"))
        return [(r["structure"], r["concept"]["value"], r["unit"], r["value"]) for r in rows]

    assert values(in_process.id) and values(in_process.id) == values(by_map.id)


def _container_executor(tmp_path: Path, models: dict | None = None, **containers: object) -> ContainerExecutor:
    """The container executor for argv checks (no engine call: ``command`` takes the image ID as given)."""
    (tmp_path / "c.yaml").write_text("data_dir: /var/lib/radnode\n")
    return ContainerExecutor(Engine("podman", ("podman",), {"PATH": "/usr/bin"}),
                             ContainersConfig(engine="podman", **containers), tmp_path / "c.yaml", models, "node1")


def _options(argv: list[str]) -> list[tuple[str, str]]:
    """The (flag, value) pairs of a ``podman run`` argv, the few value-less flags with value ''."""
    pairs, rest = [], argv[2:-1]
    while rest:
        flag = rest.pop(0)
        pairs.append((flag, "" if flag in ("--read-only",) or "=" in flag else rest.pop(0)))
    return pairs


def test_the_container_command_mounts_the_job_folders_locks_down_and_applies_the_map_resources(
        tmp_path: Path) -> None:
    run = JobRun(7, "ct_tissue", tmp_path / "jobs" / "7")
    run.outputs.mkdir(parents=True)
    executor = _container_executor(tmp_path, run_options=["--log-level", "warn"])
    assert executor.image("ct_tissue") == "radnode-ct_tissue:0.1.0"
    launch = executor.command(run, "radnode-ct_tissue:0.1.0", "sha256:" + "ab" * 32)
    argv = launch.argv
    options = _options(argv)
    flags = dict(options)
    name = flags["--name"]
    assert argv[:2] == ["podman", "run"] and name.startswith("radnode-job-7-") and argv[-1] == "sha256:" + "ab" * 32
    assert ("--label", "org.radnode.node=node1") in options and ("--label", "org.radnode.job=7") in options
    assert flags["--network"] == "none" and "--read-only" in flags and "--read-only-tmpfs=false" in flags
    assert flags["--tmpfs"] == f"/tmp:rw,nosuid,nodev,noexec,size={256 * 2**20},mode=1777"
    assert flags["--cap-drop"] == "all" and flags["--security-opt"] == "no-new-privileges"
    assert options.index(("--log-level", "warn")) < options.index(("--network", "none"))  # site flags first
    assert flags["--cpus"] == "2" and flags["--memory"] == flags["--memory-swap"] == str(4 * 2**30)
    assert flags["--shm-size"] == str(64 * 2**20) and flags["--pids-limit"] == "1024"
    assert "--device" not in flags and "--gpus" not in flags  # resources.gpu: 0
    uid = (os.getuid(), os.getgid()) if os.getuid() else (1000, 1000)
    assert flags["--user"] == f"{uid[0]}:{uid[1]}" and flags["--user"] != "0:0"
    mounts = [v for k, v in options if k == "-v"]
    assert mounts == [f"{run.inputs}:/var/holoscan/input:ro", f"{run.outputs}:/var/holoscan/output:rw",
                      f"{run.root / 'work'}:/var/holoscan/work:rw",
                      f"{run.root / 'container-config.yaml'}:{CONTAINER_CONFIG_PATH}:ro"]
    env = dict(v.split("=", 1) for k, v in options if k == "-e")
    assert env == {"HOLOSCAN_INPUT_PATH": "/var/holoscan/input", "HOLOSCAN_OUTPUT_PATH": "/var/holoscan/output",
                   "HOLOSCAN_WORKDIR": "/var/holoscan/work", "HOLOSCAN_MODEL_PATH": "/opt/holoscan/models",
                   "HOLOSCAN_LOGS_PATH": "/var/holoscan/work/logs", "HOME": "/tmp",
                   "RADNODE_CONFIG": CONTAINER_CONFIG_PATH, "RADNODE_PIPELINE": "ct_tissue", "OMP_NUM_THREADS": "2",
                   "MKL_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}
    assert launch.container is not None and launch.container.name == name
    custom = _container_executor(tmp_path, images={"ct_tissue": "registry.local/ct:1"},
                                 limits={"ct_tissue": {"memory": "1Gi", "cpu": 1}})
    assert custom.image("ct_tissue") == "registry.local/ct:1"
    flags = dict(_options(custom.command(run, "registry.local/ct:1", "sha256:" + "cd" * 32).argv))
    assert flags["--memory"] == str(2**30) and flags["--cpus"] == "1" and flags["--shm-size"] == str(64 * 2**20)


@pytest.mark.skipif(os.getuid() != 0, reason="handing files to another user needs root, as a root node has")
def test_a_root_node_hands_the_job_to_the_containers_user_and_keeps_the_spool_its_own(tmp_path: Path) -> None:
    """The node's files are owner-only: the container's user (1000) gets its own read-only copies of the inputs
    and the configuration and the writable folders; the spool's files, which ``in/`` hard-links, stay root's."""
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "a.dcm").write_bytes(b"DICM" * 100)
    os.chmod(spool / "a.dcm", 0o600)
    run = JobRun(9, "ct_tissue", tmp_path / "jobs" / "9")
    run.inputs.mkdir(parents=True)
    run.outputs.mkdir()
    os.link(spool / "a.dcm", run.inputs / "a.dcm")
    _container_executor(tmp_path).command(run, "img", "sha256:" + "ab" * 32)
    given = (run.inputs / "a.dcm").stat()
    assert (given.st_uid, given.st_gid, given.st_mode & 0o777) == (1000, 1000, 0o400)
    assert given.st_ino != (spool / "a.dcm").stat().st_ino and (run.inputs / "a.dcm").read_bytes() == b"DICM" * 100
    kept = (spool / "a.dcm").stat()
    assert (kept.st_uid, kept.st_mode & 0o777, kept.st_nlink) == (0, 0o600, 1)
    config = (run.root / "container-config.yaml").stat()
    assert (config.st_uid, config.st_mode & 0o777) == (1000, 0o400)
    assert [(run.root / f).stat().st_uid for f in ("in", "out", "work")] == [1000, 1000, 1000]


def test_gpus_are_passed_as_cdi_devices_to_apps_that_request_them(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The CDI spec ``nvidia-ctk cdi generate`` writes names one device per GPU and ``all``; an app that requests
    one GPU gets the first; one that requests none, or a node set to ``gpus: none``, gets no device."""
    (tmp_path / "cdi").mkdir()
    (tmp_path / "cdi" / "nvidia.yaml").write_text(yaml.safe_dump({
        "cdiVersion": "0.5.0", "kind": "nvidia.com/gpu",
        "devices": [{"name": "0", "containerEdits": {}}, {"name": "1", "containerEdits": {}},
                    {"name": "all", "containerEdits": {}}]}))
    (tmp_path / "cdi" / "other.yaml").write_text(yaml.safe_dump({"kind": "vendor.com/fpga", "devices": [{"name": "0"}]}))
    assert cdi_gpu_devices([tmp_path / "cdi", tmp_path / "absent"]) == ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]
    monkeypatch.setattr("radnode.node.executors.cdi_gpu_devices", lambda: cdi_gpu_devices([tmp_path / "cdi"]))
    run = JobRun(3, "model_seg", tmp_path / "jobs" / "3")
    run.outputs.mkdir(parents=True)

    def devices(**containers: object) -> list[str]:
        argv = _container_executor(tmp_path, **containers).command(run, "img", "sha256:" + "ef" * 32).argv
        return [v for k, v in _options(argv) if k == "--device"]

    assert devices() == []  # model_seg's pkg.json requests no GPU
    assert devices(limits={"model_seg": {"gpu": 1}}) == ["nvidia.com/gpu=0"]
    assert devices(limits={"model_seg": {"gpu": 4}}) == ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]
    assert devices(limits={"model_seg": {"gpu": 1}}, gpus="none") == []
    assert devices(limits={"model_seg": {"gpu": 1}}, gpus=["nvidia.com/gpu=1"]) == ["nvidia.com/gpu=1"]


def test_the_subprocess_command_is_the_map_command_with_the_map_environment(tmp_path: Path) -> None:
    run = JobRun(3, "ct_tissue", tmp_path / "jobs" / "3")
    launch = SubprocessExecutor({"PATH": "/usr/bin"}).launch(run)
    assert launch.argv == [sys.executable, "-m", "radnode.apps.ct_tissue"]
    assert get_pipeline("ct_tissue").map_module == "radnode.apps.ct_tissue"
    work = run.root / "work"
    assert launch.cwd == work and (work / "models").is_dir()
    assert {k: launch.env[k] for k in ("HOLOSCAN_INPUT_PATH", "HOLOSCAN_OUTPUT_PATH", "HOLOSCAN_WORKDIR",
                                       "HOLOSCAN_MODEL_PATH", "OMP_NUM_THREADS", "PATH")} == {
        "HOLOSCAN_INPUT_PATH": str(run.inputs), "HOLOSCAN_OUTPUT_PATH": str(run.outputs),
        "HOLOSCAN_WORKDIR": str(work), "HOLOSCAN_MODEL_PATH": str(work / "models"), "OMP_NUM_THREADS": "2",
        "PATH": "/usr/bin"}


def test_every_executor_hands_the_configured_model_folders_to_the_job(tmp_path: Path) -> None:
    """``processing.models``: the folder itself (in-process), links in work/models (subprocess), read-only
    mounts under /var/holoscan/models over the image's own (container); an ensemble as several entries."""
    one, fold0, fold1 = (tmp_path / "site" / n for n in ("liver", "fold0", "fold1"))
    other = tmp_path / "elsewhere" / "fold0"  # same folder name as fold0: gets its own name in the layout
    for folder in (one, fold0, fold1, other):
        folder.mkdir(parents=True)
    models = {"model_seg": [one], "lesions": [fold0, fold1, other]}
    run = JobRun(5, "model_seg", tmp_path / "jobs" / "5")
    assert InProcessExecutor(["radnode-run"], {}, models).launch(run).env == {"HOLOSCAN_MODEL_PATH": str(one)}
    ensemble = JobRun(6, "lesions", tmp_path / "jobs" / "6")
    env = InProcessExecutor(["radnode-run"], {}, models).launch(ensemble).env
    links = Path(env["HOLOSCAN_MODEL_PATH"])
    assert links == ensemble.root / "models"
    assert {p.name: p.resolve() for p in links.iterdir()} == {"fold0": fold0, "fold1": fold1, "fold0-2": other}
    assert InProcessExecutor(["radnode-run"], {}, models).launch(JobRun(7, "ct_tissue", tmp_path / "j7")).env == {}

    launch = SubprocessExecutor({}, models).launch(run)
    work_models = run.root / "work" / "models"
    assert launch.env["HOLOSCAN_MODEL_PATH"] == str(work_models)
    assert [(p.name, p.resolve()) for p in work_models.iterdir()] == [("liver", one)]

    ensemble.outputs.mkdir(parents=True)
    pairs = _options(_container_executor(tmp_path, models).command(ensemble, "img", "sha256:" + "ab" * 32).argv)
    assert [v for k, v in pairs if k == "-v"][4:] == [f"{fold0}:/var/holoscan/models/fold0:ro",
                                                      f"{fold1}:/var/holoscan/models/fold1:ro",
                                                      f"{other}:/var/holoscan/models/fold0-2:ro"]
    assert "HOLOSCAN_MODEL_PATH=/var/holoscan/models" in [v for k, v in pairs if k == "-e"]
    brain = JobRun(8, "mri_brain", tmp_path / "jobs" / "8")
    brain.outputs.mkdir(parents=True)
    plain = _container_executor(tmp_path, models).command(brain, "img", "sha256:" + "ab" * 32)
    assert "HOLOSCAN_MODEL_PATH=/opt/holoscan/models" in plain.argv  # the image's own models


def test_every_executor_tells_a_rerun_whose_report_went_out_that_it_reissues_it(tmp_path: Path) -> None:
    """A job whose study's report was already delivered runs with RADNODE_REISSUE (the report stage then writes a
    ``corrected`` DiagnosticReport under the same identifiers); a first run does not."""
    first, again = JobRun(9, "ct_tissue", tmp_path / "j9"), JobRun(9, "ct_tissue", tmp_path / "j9", reissue=True)
    for folder in (first.inputs, first.outputs):  # the job's folders, as the worker prepares them
        folder.mkdir(parents=True)
    for executor in (InProcessExecutor(["radnode-run"], {}), SubprocessExecutor({})):
        assert REISSUE_ENV not in executor.launch(first).env
        assert executor.launch(again).env[REISSUE_ENV] == "1"
    container = _container_executor(tmp_path)
    assert f"{REISSUE_ENV}=1" not in container.command(first, "img", "sha256:" + "ab" * 32).argv
    assert f"{REISSUE_ENV}=1" in container.command(again, "img", "sha256:" + "ab" * 32).argv


def test_configured_model_folders_are_checked_when_the_node_starts(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "liver").mkdir()

    def refusal(models: dict) -> str:
        with pytest.raises(ConfigError) as refused:
            Node(node_config(tmp_path, processing={"models": models})).start()
        return str(refused.value)

    assert refusal({"model_seg": str(tmp_path / "missing")}) == \
        f"processing.models.model_seg: {tmp_path / 'missing'}: not a folder"
    assert refusal({"liver": str(tmp_path / "liver")}).startswith(
        "processing.models.liver: unknown pipeline 'liver' (known: ct_tissue, model_seg, mri_brain")
    assert refusal({"ct_tissue": str(tmp_path / "liver")}) == ("processing.models.ct_tissue: pipeline 'ct_tissue' "
                                                               "runs no model folder of yours (those that do: model_seg)")
    monkeypatch.setenv("RADNODE_PIPELINES", "liver=radnode.apps.model_seg.app:ModelSegApp")
    assert get_pipeline("liver").takes_model
    check_models(node_config(tmp_path, processing={"models": {"liver": str(tmp_path / "liver")}}))


def test_the_timeout_comes_from_the_route_then_the_map_then_the_node() -> None:
    node = Timeout(60, "processing.job_timeout_seconds")
    assert resolve_timeout(ExecutionMode.SUBPROCESS, "ct_tissue", 5, 60) == Timeout(5, "route")
    assert resolve_timeout(ExecutionMode.SUBPROCESS, "ct_tissue", None, 60) == Timeout(900, "MAP app.json")
    assert resolve_timeout(ExecutionMode.CONTAINER, "mri_brain", None, 60) == Timeout(900, "MAP app.json")
    assert resolve_timeout(ExecutionMode.IN_PROCESS, "ct_tissue", None, 60) == node
    assert resolve_timeout(ExecutionMode.IN_PROCESS, "ct_tissue", 5, 60) == Timeout(5, "route")



def test_a_site_name_on_a_built_in_app_shares_its_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One name per model on model_seg's class: model_seg's MAP timeout, command and image, and the job's own
    name handed to the app (its manifest records ``liver``, not ``model_seg``)."""
    monkeypatch.setenv("RADNODE_PIPELINES", "liver=radnode.apps.model_seg.app:ModelSegApp, own=site.app:App")
    assert get_pipeline("liver").built_in_app == "model_seg" and get_pipeline("own").built_in_app is None
    assert resolve_timeout(ExecutionMode.SUBPROCESS, "liver", None, 60) == \
        resolve_timeout(ExecutionMode.SUBPROCESS, "model_seg", None, 60) == Timeout(1800, "MAP app.json")
    run = JobRun(9, "liver", tmp_path / "jobs" / "9")
    launch = SubprocessExecutor({}).launch(run)
    assert launch.argv == SubprocessExecutor({}).launch(JobRun(10, "model_seg", tmp_path / "jobs" / "10")).argv
    assert launch.env["RADNODE_PIPELINE"] == "liver"
    executor = _container_executor(tmp_path)
    run.outputs.mkdir(parents=True)
    assert executor.image("liver") == "radnode-model_seg:0.1.0"
    assert "RADNODE_PIPELINE=liver" in executor.command(run, "img", "sha256:" + "ab" * 32).argv

def test_a_container_route_is_refused_at_load_without_an_engine(tmp_path: Path) -> None:
    rules = _rules(tmp_path, "rules:\n  - name: ct\n    when: {Modality: CT}\n    pipelines: [ct_tissue]\n"
                             "    execution:\n      mode: container\n")
    with pytest.raises(RuleError) as refused:
        Node(node_config(tmp_path).model_copy(update={"rules": rules})).load_rules()
    assert refused.value.line == 6
    assert refused.value.reason == ("rule 'ct': execution mode 'container' is not available on this node (available: "
                                    "in-process, subprocess); set containers.engine (podman or docker) "
                                    "to run MAP containers")
    with_engine = node_config(tmp_path, containers={"engine": "podman"}).model_copy(update={"rules": rules})
    (rule,) = Node(with_engine).load_rules().rules  # type: ignore[union-attr]
    assert rule.decision.execution == Execution(ExecutionMode.CONTAINER)


def test_execution_keys_are_checked_with_line_numbers() -> None:
    def reason(execution: str) -> str:
        text = f"rules:\n  - name: r\n    when: {{Modality: CT}}\n    pipelines: [ct_tissue]\n" \
               f"    execution: {execution}\n"
        with pytest.raises(RuleError) as refused:
            parse_rules(text, "r.yaml")
        return str(refused.value)

    assert reason("{mode: docker}").startswith("r.yaml:5: rule 'r': 'execution.mode': Input should be 'in-process'")
    assert reason("{timeout_seconds: 0}").startswith("r.yaml:5: rule 'r': 'execution.timeout_seconds': Input should "
                                                     "be greater than 0")
    assert reason("{timout_seconds: 5}") == ("r.yaml:5: rule 'r': unknown key 'execution.timout_seconds'; did you "
                                             "mean 'timeout_seconds'?; expected one of: mode, timeout_seconds")


def test_a_stored_container_route_fails_its_job_when_the_node_has_no_engine(tmp_path: Path) -> None:
    config = node_config(tmp_path)
    store = JobStore(tmp_path / "data" / "radnode.db")
    path = write_study(tmp_path / "study", n=1)[0]
    ds = pydicom.dcmread(path)
    instance = Instance(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), "P1", "CT",
                        str(ds.SOPClassUID), str(path))
    route = SeriesDecision(("ct_tissue",), execution=Execution(ExecutionMode.CONTAINER, 30))
    _, job_id = store.record_instance(instance, route)
    store.queue_job(job_id, "test")
    store.close()
    store = JobStore(tmp_path / "data" / "radnode.db")  # as after a restart
    assert store.job(job_id).execution == Execution(ExecutionMode.CONTAINER, 30)  # type: ignore[union-attr]
    scheduler = Scheduler(config, store, Egress(config, store), ["unused"], tmp_path / "node-config.yaml")
    scheduler.tick()
    job = store.job(job_id)
    assert job is not None and job.state is JobState.FAILED
    assert job.reason == ("the route asks for container execution, which this node cannot do "
                          "(containers.engine is not set)")
    store.close()


def test_site_pipelines_are_registered_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADNODE_PIPELINES", "body_comp=site_apps.body_comp.app:BodyCompApp, other=pkg:App")
    assert get_pipeline("body_comp").map_module == "site_apps.body_comp"
    assert get_pipeline("other").map_module == "pkg"
    for bad in ("ct_tissue=site.app:App", "nameless", "x=module_without_class"):
        monkeypatch.setenv("RADNODE_PIPELINES", bad)
        with pytest.raises(PipelineRegistryError, match="RADNODE_PIPELINES"):
            get_pipeline("x")


@pytest.mark.slow
def test_two_ct_tissue_runs_in_one_process_report_each_runs_own_phase_times(tmp_path: Path) -> None:
    """Phase times belong to each run's application, not to the process: had the second run inherited the first's,
    its phases would add up to more than its own wall time. Each manifest reads back as written. Both runs share a
    fresh process of their own (the test process's resident memory, whatever earlier tests left in it, would hide
    the phases' own peaks)."""
    for name, slices in (("first", 40), ("second", 24)):
        write_chest_phantom(tmp_path / name, slices, seed=slices)
    runs = textwrap.dedent(f"""
        from pathlib import Path
        from radnode.execution import RunManifest, run_app
        for name in ("first", "second"):
            out = Path({str(tmp_path)!r}) / f"{{name}}-out"
            manifest = run_app("ct_tissue", Path({str(tmp_path)!r}) / name, out)
            assert RunManifest.read(out) == manifest, name
    """)
    done = subprocess.run([sys.executable, "-c", runs], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifests = [RunManifest.read(tmp_path / f"{name}-out") for name in ("first", "second")]
    for manifest in manifests:
        assert list(manifest.phases) == ["load", "select_series", "build_volume", "segment", "measure", "write_seg",
                                         "write_sr", "write_report_fhir"]
        assert all(phase.seconds > 0 and phase.cpu_seconds > 0 for phase in manifest.phases.values())
        # the SEG's frames are written in a child process beside the SR and report writers: its wall time
        # overlaps theirs; every other phase runs after the one before, and all within the run's own time
        assert [name for name, phase in manifest.phases.items() if phase.in_child] == ["write_seg"]
        assert sum(phase.seconds for phase in manifest.phases.values() if not phase.in_child) <= manifest.seconds
        first_start = min(phase.started_at for phase in manifest.phases.values())
        assert max(phase.started_at + phase.seconds for phase in manifest.phases.values()) - first_start \
            <= manifest.seconds
        starts = [phase.started_at for phase in manifest.phases.values()]
        assert starts == sorted(starts) and manifest.seconds > starts[-1] - starts[0] > 0
        peaks = [phase.peak_rss_bytes for phase in manifest.phases.values()]
        assert all(peak > 0 for peak in peaks) and manifest.peak_rss_bytes >= max(peaks)
    # each phase's own peak: the segmentation's masks and temporaries come after the load phase's peak
    assert manifests[0].phases["segment"].peak_rss_bytes > manifests[0].phases["select_series"].peak_rss_bytes
