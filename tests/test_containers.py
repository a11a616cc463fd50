"""MAP containers for real, with podman: images built offline from the build context on the offline Debian
bookworm base, run on a study folder as a site runs them and by the node's container executor (locked
down), giving the same results as ``radnode run`` (and so as the MAP command outside a container, which
``tests/test_map.py`` compares with ``radnode run`` on the same study).

The images are built once per session; podman's layer cache (and the base image, keyed by its inputs)
keeps them between runs. How podman is called here (runc, cgroupfs, no default ulimits: what this
sandbox needs) is configuration, passed like a site's ``containers:`` section.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml
from fhir.resources.R4B.bundle import Bundle

from factories import restore_totalseg_dicom, write_lesion_case
from radnode.config import ContainersConfig
from radnode.container_engine import Engine
from radnode.map_image import bookworm_base
from radnode.node.executors import node_label
from radnode.node.service import Node
from radnode.node.store import Job, JobState
from radnode.outputs.sr import read_measurements
from radnode.peers import FhirServer, StoreSCP
from radnode.phantom import make_ct_phantom, write_ct_series
from support.dicom_tools import storescu
from support.node import ServeProcess, final_job, node_config
from support.waiting import wait_until

pytestmark = pytest.mark.slow

CT_IMAGE = "localhost/radnode-ct_tissue:test"
MODEL_IMAGE = "localhost/radnode-model_seg-tiny:test"
PROBE_IMAGE = "localhost/radnode-probe:test"
MAP_UID = 1000
"""The MAP image's user (``holoscan``); a site hands the output folder to it, as the node does."""


# --- the engine and the images, once per session ------------------------------------------------------------

@pytest.fixture(scope="session")
def containers(tmp_path_factory: pytest.TempPathFactory) -> ContainersConfig:
    """podman as this sandbox needs it, as configuration: runc (crun is refused), cgroupfs, no default ulimits."""
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    return ContainersConfig(engine="podman", command=["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"],
                            environment={"CONTAINERS_CONF": str(conf)})


@pytest.fixture(scope="session")
def engine(containers: ContainersConfig) -> Engine:
    return Engine.from_config(containers)


@pytest.fixture(scope="session")
def base_image(engine: Engine) -> str:
    return bookworm_base(engine)


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    image_id: str
    context: Path
    report: dict


def _build(containers: ContainersConfig, engine: Engine, base: str, app: str, tag: str, folder: Path,
           models: list[Path] = ()) -> BuiltImage:
    """``radnode map build APP --output DIR --image --tag TAG --base-image BASE`` as a site runs it, its
    ``containers:`` section (how this sandbox calls podman) in the configuration file it is given."""
    config = folder / "radnode.yaml"
    config.write_text(yaml.safe_dump({"containers": containers.model_dump(
        mode="json", include={"engine", "command", "environment"})}))
    context = folder / app
    result = subprocess.run([sys.executable, "-m", "radnode", "map", "build", app, "--output", str(context),
                             "--image", "--tag", tag, "--base-image", base, "--config", str(config),
                             *[arg for model in models for arg in ("--model", str(model))]],
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    image_id = engine.image_id(tag)
    assert image_id is not None
    report = json.loads((context / "image-report.json").read_text())
    assert f"{tag}: " in result.stdout  # the size report is printed too
    return BuiltImage(tag, image_id, context, report)


@pytest.fixture(scope="session")
def ct_image(containers: ContainersConfig, engine: Engine, base_image: str,
             tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return _build(containers, engine, base_image, "ct_tissue", CT_IMAGE, tmp_path_factory.mktemp("map-ct"))


@pytest.fixture(scope="session")
def torchscript_model(tiny_unet: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' tiny UNet as a site's TorchScript folder: ``model.ts`` and its ``model.yaml`` sidecar."""
    folder = tmp_path_factory.mktemp("models") / "tiny_lesion_ts"
    folder.mkdir()
    torch.jit.script(tiny_unet).save(str(folder / "model.ts"))
    (folder / "model.yaml").write_text(yaml.safe_dump({
        "name": "tiny lesion ts", "weights": "model.ts", "labels": {1: "lesion"},
        "input": {"patch_size": [16, 32, 32], "spacing": [3.0, 2.0, 2.0]}}))
    return folder


@pytest.fixture(scope="session")
def model_image(containers: ContainersConfig, engine: Engine, base_image: str, torchscript_model: Path,
                tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return _build(containers, engine, base_image, "model_seg", MODEL_IMAGE, tmp_path_factory.mktemp("map-model"),
                  [torchscript_model])


PROBE_APP = {
    "__init__.py": '"""A site pipeline that reports what its container lets it do (the node\'s lock-down, from inside)."""\n',
    "app.py": textwrap.dedent('''
        import json
        import os
        import socket
        import subprocess
        import sys
        import time
        from pathlib import Path

        from holoscan.conditions import CountCondition
        from holoscan.core import Application, Operator, OperatorSpec

        def attempt(action):
            try:
                action()
            except OSError as e:
                return f"refused: {e.strerror or e}"
            return "allowed"

        def write(path):
            Path(path).write_text("x")

        def connect():
            socket.create_connection(("192.0.2.1", 53), timeout=3).close()

        def memory_limit():
            for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
                if os.path.exists(path):
                    return Path(path).read_text().strip()
            return None

        def allocate(mib):
            code = f"b = bytearray({mib} * 2**20)\\nfor i in range(0, len(b), 4096): b[i] = 1"
            return subprocess.run([sys.executable, "-c", code]).returncode

        class ProbeOperator(Operator):
            def setup(self, spec: OperatorSpec) -> None:
                pass

            def compute(self, op_input, op_output, context) -> None:
                if os.environ["RADNODE_PIPELINE"] == "sleepy":
                    Path(os.environ["HOLOSCAN_WORKDIR"], "sleeping").write_text(str(os.getpid()))
                    time.sleep(600)
                status = dict(line.split(":\\t", 1) for line in Path("/proc/self/status").read_text().splitlines()
                              if ":\\t" in line)
                out = Path(os.environ["HOLOSCAN_OUTPUT_PATH"])
                limit = memory_limit()
                report = {
                    "interfaces": sorted(os.listdir("/sys/class/net")),
                    "connect": attempt(connect),
                    "resolve": attempt(lambda: socket.getaddrinfo("deb.debian.org", 80)),
                    "write_root": attempt(lambda: write("/probe")),
                    "write_app": attempt(lambda: write("/opt/holoscan/app/probe")),
                    "write_input": attempt(lambda: write(Path(os.environ["HOLOSCAN_INPUT_PATH"], "probe"))),
                    "write_output": attempt(lambda: write(out / "written")),
                    "write_workdir": attempt(lambda: write(Path(os.environ["HOLOSCAN_WORKDIR"], "written"))),
                    "write_tmp": attempt(lambda: write("/tmp/written")),
                    "capabilities": {k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
                    "no_new_privs": status["NoNewPrivs"].strip(),
                    "uid": os.getuid(), "gid": os.getgid(),
                    "memory_limit": limit,
                    "allocate_half_status": allocate(int(limit) // 2**21) if limit and limit.isdigit() else None,
                    "allocate_twice_status": allocate(2 * int(limit) // 2**20) if limit and limit.isdigit() else None,
                }
                (out / "probe.json").write_text(json.dumps(report))

        class ProbeApp(Application):
            version = "0.0.1"

            def compose(self) -> None:
                self.add_operator(ProbeOperator(self, CountCondition(self, 1), name="probe"))
    '''),
    "__main__.py": "from radnode.execution import prepare_holoscan_process\nfrom probeapp.app import ProbeApp\n\n"
                   "prepare_holoscan_process()\nProbeApp().run()\n",
}


@pytest.fixture(scope="session")
def probe_image(engine: Engine, ct_image: BuiltImage, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A site's own MAP on the ct_tissue image: its app.json command runs the probe application."""
    context = tmp_path_factory.mktemp("probe")
    (context / "probeapp").mkdir()
    for name, text in PROBE_APP.items():
        (context / "probeapp" / name).write_text(text)
    manifest = json.loads((ct_image.context / "app.json").read_text())
    manifest["command"] = json.dumps(["python3", "-m", "probeapp"])
    (context / "app.json").write_text(json.dumps(manifest))
    (context / "Containerfile").write_text(
        f"FROM {ct_image.image_id}\nUSER root\nCOPY probeapp /opt/probe/probeapp\nCOPY app.json /etc/holoscan/app.json\n"
        f"ENV PYTHONPATH=/opt/probe\nUSER holoscan\n")
    engine.run("build", "--network", "none", "-t", PROBE_IMAGE, "-f", str(context / "Containerfile"), str(context),
               timeout=600)
    return PROBE_IMAGE


# --- outputs compared as a reader sees them -----------------------------------------------------------------

def _seg_summary(path: Path) -> tuple[list[tuple[int, str]], np.ndarray, list[str]]:
    """Segment numbers and labels, the frames' pixels, and which source image and segment each frame is."""
    ds = pydicom.dcmread(path)
    segments = [(int(s.SegmentNumber), str(s.SegmentLabel)) for s in ds.SegmentSequence]
    shared = ds.SharedFunctionalGroupsSequence[0]

    def segment(frame: pydicom.Dataset) -> int:
        return int((frame if "SegmentIdentificationSequence" in frame else shared)
                   .SegmentIdentificationSequence[0].ReferencedSegmentNumber)

    refs = [f"{segment(f)}:{f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID}"
            for f in ds.PerFrameFunctionalGroupsSequence]
    return segments, ds.pixel_array, refs


def _measurements(path: Path) -> list[tuple]:
    rows = read_measurements(pydicom.dcmread(path))
    return [(r["structure"], r["segment_number"], r["concept"]["value"], r["unit"], r["value"]) for r in rows]


def _assert_same_results(expected: Path, actual: Path, files: list[str]) -> None:
    """The same files, SEG masks, measurements and report text (UIDs and times aside)."""
    names = sorted(p.name for p in expected.iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in actual.iterdir() if not p.name.startswith("."))
    assert set(files) <= set(names)
    seg_a, seg_b = _seg_summary(expected / "seg.dcm"), _seg_summary(actual / "seg.dcm")
    assert seg_a[0] == seg_b[0] and seg_a[2] == seg_b[2]
    assert seg_a[1].any() and np.array_equal(seg_a[1], seg_b[1])
    values = _measurements(expected / "sr.dcm")
    assert values and values == _measurements(actual / "sr.dcm")
    if "report.txt" in names:
        assert (expected / "report.txt").read_text() == (actual / "report.txt").read_text()
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (expected, actual)]
    without_uids = [[{k: v for k, v in m.items() if not k.endswith("uid")} for m in manifest["measurements"]]
                    for manifest in manifests]
    assert without_uids[0] == without_uids[1]


def _radnode_run(study: Path, out: Path, pipeline: str, *extra: str) -> None:
    result = subprocess.run([sys.executable, "-m", "radnode", "run", str(study), "--output", str(out),
                             "--pipeline", pipeline, *extra], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


def _podman_run(engine: Engine, image: str, study: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """The image run as a site runs a MAP: the study read-only at the input path, an output folder the image's
    user may write, nothing else (the defaults of the MAP: its entrypoint, paths and command)."""
    out.mkdir()
    os.chown(out, MAP_UID, MAP_UID)
    return engine.run("run", "--rm", "--network", "none", "-v", f"{study}:/var/holoscan/input:ro",
                      "-v", f"{out}:/var/holoscan/output", image, timeout=900)


# --- the images ---------------------------------------------------------------------------------------------

def test_the_ct_image_carries_the_map_manifests_a_non_root_user_and_only_what_the_app_imports(
        engine: Engine, ct_image: BuiltImage) -> None:
    for name in ("app.json", "pkg.json"):
        inside = engine.run("run", "--rm", "--entrypoint", "cat", CT_IMAGE, f"/etc/holoscan/{name}").stdout
        assert json.loads(inside) == json.loads((ct_image.context / name).read_text())
    manifest = json.loads((ct_image.context / "app.json").read_text())
    assert json.loads(manifest["command"]) == ["python3", "-m", "radnode.apps.ct_tissue"]
    assert manifest["sdk"] == "monai-deploy" and manifest["timeout"] == 900
    config = json.loads(engine.run("image", "inspect", "--format", "{{json .Config}}", CT_IMAGE).stdout)
    assert config["User"] == "holoscan" and config["Entrypoint"] == ["/var/holoscan/tools"]
    assert config["WorkingDir"] == "/var/holoscan"
    assert "HOLOSCAN_INPUT_PATH=/var/holoscan/input/" in config["Env"]
    assert engine.run("run", "--rm", "--entrypoint", "id", CT_IMAGE, "-u").stdout.strip() == str(MAP_UID)
    shown = engine.run("run", "--rm", CT_IMAGE, "show").stdout  # the MAP's own tools entrypoint
    assert "== app.json" in shown and '"modelRoot": "/opt/holoscan/models"' in shown

    report = ct_image.report
    packages = {p["name"] for p in report["python_packages"]}
    assert {"holoscan-cu13", "highdicom", "pydicom", "scipy", "radnode"} <= packages
    assert not packages & {"torch", "monai", "monai-deploy-app-sdk", "tritonclient", "cupy-cuda13x", "pip"}
    assert report["base_bytes"] and report["total_bytes"] > report["base_bytes"] + report["python_environment_bytes"] * 0.9
    print(f"\nct_tissue image: {report['total_bytes'] / 1e6:.0f} MB (base {report['base_bytes'] / 1e6:.0f} MB, "
          f"Python environment {report['python_environment_bytes'] / 1e6:.0f} MB)")


@dataclass(frozen=True)
class ReferenceRun:
    study: Path
    outputs: Path


@pytest.fixture(scope="module")
def real_ct_reference(totalseg_reference: Path, tmp_path_factory: pytest.TempPathFactory) -> ReferenceRun:
    """The real CT (JPEG 2000, UIDs restored once) and what ``radnode run`` writes for it: what every container
    run of the same study must write too."""
    folder = tmp_path_factory.mktemp("real_ct")
    restore_totalseg_dicom(totalseg_reference, folder / "study")
    _radnode_run(folder / "study", folder / "run", "ct_tissue")
    return ReferenceRun(folder / "study", folder / "run")


def test_podman_run_of_the_ct_image_writes_what_radnode_run_writes(
        engine: Engine, ct_image: BuiltImage, real_ct_reference: ReferenceRun, tmp_path: Path) -> None:
    """``podman run`` of the image as a site runs a MAP. (The MAP command outside a container gives what
    ``radnode run`` gives on the same study: ``tests/test_map.py``.)"""
    result = _podman_run(engine, CT_IMAGE, real_ct_reference.study, tmp_path / "container")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((ct_image.context / "app.json").read_text())
    _assert_same_results(real_ct_reference.outputs, tmp_path / "container", manifest["output"]["format"]["files"])


def test_the_model_image_runs_the_site_torchscript_model_it_carries_as_radnode_run_does(
        engine: Engine, model_image: BuiltImage, torchscript_model: Path, tmp_path: Path) -> None:
    pkg = json.loads((model_image.context / "pkg.json").read_text())
    assert pkg["models"] == {"tiny_lesion_ts": "/opt/holoscan/models/tiny_lesion_ts"}
    packages = {p["name"] for p in model_image.report["python_packages"]}
    assert {"torch", "monai", "holoscan-cu13"} <= packages
    assert not packages & {"monai-deploy-app-sdk", "tritonclient", "transformers", "cupy-cuda13x"}
    study = write_lesion_case(tmp_path / "study", seed=100)
    _radnode_run(study, tmp_path / "run", "model_seg", "--model", str(torchscript_model))
    result = _podman_run(engine, MODEL_IMAGE, study, tmp_path / "container")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_results(tmp_path / "run", tmp_path / "container",
                         json.loads((model_image.context / "app.json").read_text())["output"]["format"]["files"])


# --- the node runs them -------------------------------------------------------------------------------------

def _rules(folder: Path, text: str) -> Path:
    path = folder / "rules.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_radnode_serve_runs_a_container_route_and_delivers_seg_sr_and_fhir(
        containers: ContainersConfig, ct_image: BuiltImage, real_ct_reference: ReferenceRun, tmp_path: Path,
        peers: tuple[StoreSCP, FhirServer]) -> None:
    rules = _rules(tmp_path, """\
        rules:
          - name: ct-in-its-map
            when: {Modality: CT}
            pipelines: [ct_tissue]
            execution: {mode: container}
        """)
    pacs, fhir = peers
    node = ServeProcess(tmp_path / "node", pacs, fhir, rules=rules, settings={"containers": {
        **containers.model_dump(mode="json", include={"engine", "command", "environment"}),
        "images": {"ct_tissue": CT_IMAGE}}})
    try:
        node.send(*sorted(real_ct_reference.study.iterdir()))
        ((job, events),) = node.jobs_when_final(1)
    finally:
        node.stop()
    assert job.state is JobState.DONE, f"{job.reason}: {[e.message for e in events]}"
    received = {pydicom.dcmread(p).SOPClassUID.name for p in pacs.received()}
    assert received == {"Segmentation Storage", "Comprehensive 3D SR Storage", "Comprehensive SR Storage"}
    reports = fhir.search("DiagnosticReport")
    observations = Bundle.model_validate(fhir.search("Observation", "_count=200")).entry
    assert reports["total"] == 1 and len(observations) >= 8
    outbox = node.data_dir / "outbox" / str(job.id)
    _assert_same_results(real_ct_reference.outputs, outbox, ["seg.dcm", "sr.dcm", "fhir-bundle.json"])
    running = next(e.message for e in events if e.kind == "running")
    assert running.startswith("container: podman --runtime runc --cgroup-manager=cgroupfs run ")
    assert "--network none" in running and "(timeout 900 s, MAP app.json)" in running
    notes = [e.message for e in events if e.kind == "container"]
    assert notes[0] == f"image {CT_IMAGE} ({ct_image.image_id}) in container {_container_name(notes[0])}"
    assert notes[1] == f"container {_container_name(notes[0])} exited with status 0; removed"


def _container_name(note: str) -> str:
    return note.rsplit(" ", 1)[-1]


def _node(tmp_path: Path, containers: ContainersConfig, rules: Path, **container_settings: object) -> Node:
    """The node in this process (its job events at hand), with its SCP on a free port and a container route."""
    config = node_config(tmp_path, containers={
        **containers.model_dump(mode="json", include={"engine", "command", "environment"}), **container_settings})
    return Node(config.model_copy(update={"rules": rules}), poll_seconds=0.1)


def _only_job(node: Node, timeout: float = 300) -> Job:
    """The node's one job, once final."""
    wait_until(lambda: node.jobs(), timeout=60)
    return final_job(node, node.jobs()[0].id, timeout)


def _send_small_ct(node: Node, folder: Path) -> None:
    write_ct_series(make_ct_phantom(20, 128), folder)
    result = storescu(node.port, folder)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def site_pipelines(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe image's application, registered as two site pipelines (the node never imports it)."""
    monkeypatch.setenv("RADNODE_PIPELINES", "lockdown_probe=probeapp.app:ProbeApp sleepy=probeapp.app:ProbeApp")


def test_inside_the_job_container_there_is_no_network_no_writable_root_no_capability_and_the_memory_limit(
        containers: ContainersConfig, probe_image: str, tmp_path: Path, site_pipelines: None) -> None:
    rules = _rules(tmp_path, """\
        rules:
          - name: probe
            when: {Modality: CT}
            pipelines: [lockdown_probe]
            execution: {mode: container}
        """)
    limit = 384 * 2**20
    with _node(tmp_path, containers, rules, images={"lockdown_probe": probe_image},
               limits={"lockdown_probe": {"memory": "384Mi", "cpu": 1}}) as node:
        _send_small_ct(node, tmp_path / "study")
        job = _only_job(node)
        events = node.events(job.id)
    assert job.state is JobState.DONE, f"{job.reason}: {[e.message for e in events]}"
    probe = json.loads((tmp_path / "data" / "outbox" / str(job.id) / "probe.json").read_text())
    assert probe["interfaces"] == ["lo"]
    assert probe["connect"].startswith("refused") and probe["resolve"].startswith("refused")
    for path in ("write_root", "write_app", "write_input"):
        assert probe[path] == "refused: Read-only file system", path
    assert probe["write_output"] == probe["write_workdir"] == probe["write_tmp"] == "allowed"
    assert set(probe["capabilities"].values()) == {"0000000000000000"} and probe["no_new_privs"] == "1"
    assert probe["uid"] != 0 and probe["gid"] != 0
    assert int(probe["memory_limit"]) == limit
    assert probe["allocate_half_status"] == 0  # below the limit: runs
    assert probe["allocate_twice_status"] == -9  # past it: the kernel's OOM killer ends it
    notes = [e.message for e in events if e.kind == "container"]
    assert notes[-1].endswith("exited with status 0; removed")


def test_a_container_job_past_its_timeout_is_stopped_and_its_container_removed(
        containers: ContainersConfig, engine: Engine, probe_image: str, tmp_path: Path, site_pipelines: None) -> None:
    rules = _rules(tmp_path, """\
        rules:
          - name: sleepy
            when: {Modality: CT}
            pipelines: [sleepy]
            execution: {mode: container, timeout_seconds: 8}
        """)
    with _node(tmp_path, containers, rules, images={"sleepy": probe_image}) as node:
        _send_small_ct(node, tmp_path / "study")
        job = _only_job(node, timeout=120)
        events = node.events(job.id)
    assert job.state is JobState.FAILED and job.reason == "timed out after 8 s (container)"
    assert (tmp_path / "data" / "jobs" / str(job.id) / "work" / "sleeping").exists(), \
        "the app never reached its operator: the timeout did not hit a running container"
    notes = [e.message for e in events if e.kind == "container"]
    name = _container_name(notes[0])
    assert notes[1] == f"container {name} stopped; removed"
    assert not engine.container_exists(name)
    running, failed = (next(e for e in events if e.kind == kind) for kind in ("running", "failed"))
    assert 8 <= failed.at - running.at < 30


def test_a_cancelled_container_job_is_stopped_and_its_container_removed(
        containers: ContainersConfig, engine: Engine, probe_image: str, tmp_path: Path, site_pipelines: None) -> None:
    rules = _rules(tmp_path, """\
        rules:
          - name: sleepy
            when: {Modality: CT}
            pipelines: [sleepy]
            execution: {mode: container}
        """)
    with _node(tmp_path, containers, rules, images={"sleepy": probe_image}) as node:
        _send_small_ct(node, tmp_path / "study")
        wait_until(lambda: node.jobs(), timeout=60)
        job_id = node.jobs()[0].id
        sleeping = tmp_path / "data" / "jobs" / str(job_id) / "work" / "sleeping"
        wait_until(sleeping.exists, timeout=120)  # the app is inside its operator, in the container
        node.store.cancel_job(job_id, "operator", "wrong protocol")
        wait_until(lambda: len([e for e in node.events(job_id) if e.kind == "container"]) == 2, timeout=60)
        job, events = node.job(job_id), node.events(job_id)
    assert job is not None and job.state is JobState.FAILED and job.reason == "cancelled by operator: wrong protocol"
    notes = [e.message for e in events if e.kind == "container"]
    name = _container_name(notes[0])
    assert notes[1] == f"container {name} stopped; removed"
    assert not engine.container_exists(name)


def test_a_restarted_node_removes_the_containers_its_earlier_run_left_and_no_other_nodes(
        containers: ContainersConfig, engine: Engine, probe_image: str, tmp_path: Path, site_pipelines: None) -> None:
    rules = _rules(tmp_path, """\
        rules:
          - name: sleepy
            when: {Modality: CT}
            pipelines: [sleepy]
            execution: {mode: container}
        """)
    node = _node(tmp_path, containers, rules, images={"sleepy": probe_image})
    ours, theirs = f"radnode-job-1-{os.getpid()}", f"radnode-job-1-other-{os.getpid()}"
    for name, label in ((ours, node_label(node.config)), (theirs, "another-node")):
        engine.run("create", "--name", name, "--label", f"org.radnode.node={label}", probe_image)
    try:
        with node:
            pass
        assert not engine.container_exists(ours) and engine.container_exists(theirs)
    finally:
        engine.remove(ours), engine.remove(theirs)
