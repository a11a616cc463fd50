"""MAP packaging: every registered app's build context holds spec-conformant manifests that agree with the
Holoscan/MONAI Deploy packager, and the MAP command run as a hosting service would gives the same
results as ``radnode run``. ``model_seg`` is packaged with the small bundle the tests train (``--model``)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from factories import write_lesion_case
from radnode import map as radmap
from radnode.pipelines.registry import PIPELINES

REPO = Path(__file__).resolve().parents[1]
HOLOSCAN_CLI_PACKAGER = "holoscan-cli==3.11.0"
"""The last holoscan-cli with the MAP packager (``holoscan package``/``monai-deploy package``)."""
PACKAGER_VENV = REPO / ".cache" / "holoscan-cli-3.11" / "venv"
SEMVER = re.compile(r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.+-]+)?$")
MEMORY = re.compile(r"^\d+(\.\d+)?(Mi|Gi)$")
MAP_ENVIRONMENT = ("HOLOSCAN_INPUT_PATH", "HOLOSCAN_OUTPUT_PATH", "HOLOSCAN_WORKDIR", "HOLOSCAN_MODEL_PATH",
                   "HOLOSCAN_CONFIG_PATH", "HOLOSCAN_APP_MANIFEST_PATH", "HOLOSCAN_PKG_MANIFEST_PATH",
                   "HOLOSCAN_DOCS_PATH", "HOLOSCAN_LOGS_PATH")
APPS = list(PIPELINES)


@pytest.fixture(scope="session")
def radnode_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One radnode wheel for every build context in the session (building it takes a few seconds)."""
    return radmap.build_wheel(tmp_path_factory.mktemp("wheel"))


def _models(app: str, bundle: Path) -> list[Path]:
    """What an app is packaged with: the site's model for the app that runs one, nothing for the others."""
    return [bundle] if PIPELINES[app].takes_model else []


@pytest.fixture(scope="session")
def contexts(radnode_wheel: Path, tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("map")
    return {app: radmap.write_build_context(app, root / app, wheel=radnode_wheel, models=_models(app, tiny_bundle))
            for app in APPS}


def _load(context: Path) -> tuple[dict, dict]:
    return json.loads((context / "app.json").read_text()), json.loads((context / "pkg.json").read_text())


def _is_abs(value: object) -> bool:
    return isinstance(value, str) and value.startswith("/")


@pytest.mark.parametrize("app", APPS)
def test_app_manifest_has_required_fields_with_spec_types(contexts: dict[str, Path], app: str) -> None:
    manifest, _ = _load(contexts[app])
    assert SEMVER.match(manifest["apiVersion"])
    argv = json.loads(manifest["command"])  # the packager's form: a JSON argv list as a string
    assert isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)
    assert argv == ["python3", "-m", f"radnode.apps.{app}"]
    env = manifest["environment"]
    assert isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    assert set(MAP_ENVIRONMENT) <= set(env)
    assert env["HOLOSCAN_MODEL_PATH"] == "/opt/holoscan/models"
    assert isinstance(manifest["input"], dict) and isinstance(manifest["input"]["path"], str)
    assert isinstance(manifest["input"]["formats"], list) and manifest["input"]["formats"]
    assert isinstance(manifest["output"], dict) and isinstance(manifest["output"]["path"], str)
    assert isinstance(manifest["output"]["format"], dict) and manifest["output"]["format"]["type"] == "file"
    assert {"seg.dcm", "sr.dcm", "fhir-bundle.json", "manifest.json"} <= set(manifest["output"]["format"]["files"])
    assert manifest.get("readiness") is None or isinstance(manifest["readiness"].get("type"), str)
    assert manifest["sdk"] == "monai-deploy" and SEMVER.match(manifest["sdkVersion"])
    assert isinstance(manifest["timeout"], int) and not isinstance(manifest["timeout"], bool)
    assert manifest["timeout"] > 0
    assert SEMVER.match(manifest["version"])
    assert manifest["version"] == str(PIPELINES[app].load_app_class().version)
    assert _is_abs(manifest["workingDirectory"])


@pytest.mark.parametrize("app", APPS)
def test_package_manifest_has_required_fields_with_spec_types(contexts: dict[str, Path], app: str) -> None:
    _, pkg = _load(contexts[app])
    assert SEMVER.match(pkg["apiVersion"]) and SEMVER.match(pkg["version"])
    assert pkg["applicationRoot"] == "/opt/holoscan/app" and pkg["modelRoot"] == "/opt/holoscan/models"
    assert isinstance(pkg["models"], dict)
    assert all(_is_abs(p) and p.startswith(pkg["modelRoot"] + "/") for p in pkg["models"].values())
    resources = pkg["resources"]
    for key in ("cpu", "gpu"):
        assert isinstance(resources[key], (int, float)) and resources[key] >= 0
    for key in ("memory", "gpuMemory"):
        assert isinstance(resources[key], str) and MEMORY.match(resources[key])
    assert pkg["platformConfig"] in {"igpu", "dgpu", "cpu"}


@pytest.mark.parametrize("app", APPS)
def test_build_context_layout(contexts: dict[str, Path], app: str) -> None:
    """Dockerfile: a base build argument, non-root, manifests where the spec puts them, radnode from the wheel,
    the app's dependencies from hash-locked wheels in the context (nothing fetched while building)."""
    context = contexts[app]
    dockerfile = (context / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=localhost/radnode-map-base:bookworm$", dockerfile, re.M)  # resources.gpu 0
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.M)
    assert re.search(r"^USER holoscan$", dockerfile, re.M)
    for src, dest in (("app.json", "/etc/holoscan/app.json"), ("pkg.json", "/etc/holoscan/pkg.json"),
                      ("models", "/opt/holoscan/models"), ("app", "/opt/holoscan/app"),
                      ("app.yaml", "/var/holoscan/app.yaml")):
        assert re.search(rf"^COPY {re.escape(src)} {re.escape(dest)}$", dockerfile, re.M), src
        assert (context / src).exists(), src
    assert "{{" not in dockerfile
    wheels = list((context / "dist").glob("radnode-*.whl"))
    assert len(wheels) == 1 and f"dist/{wheels[0].name}" in dockerfile
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert f"radnode/apps/{app}/__main__.py" in names and f"radnode/apps/{app}/app.yaml" in names
    # The package data radnode finds at run time with importlib.resources travels in the wheel.
    assert {"radnode/deploy_map/Dockerfile.template", "radnode/deploy_map/tools.sh", "radnode/deploy_map/README.md",
            "radnode/deploy_map/base/bookworm.sh", "radnode/deploy_map/base/Containerfile.cuda",
            f"radnode/apps/{app}/requirements.txt",
            "radnode/deploy_ohif/app-config.template.js", "radnode/pipelines/default_rules.yaml",
            "radnode/report/reference_ranges.yaml"} <= set(names)
    locked = [line for line in (context / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    pins = dict(line.split(" --hash=sha256:")[0].split("==") for line in locked)
    assert all(re.fullmatch(r"\S+==\S+ --hash=sha256:[0-9a-f]{64}", line) for line in locked)
    wheels = {w.name for w in (context / "wheels").glob("*.whl")}
    assert len(wheels) == len(pins) + 1 and any(w.startswith("pip-") for w in wheels)  # pip runs from its wheel
    assert {"holoscan-cu13", "pydicom", "highdicom"} <= set(pins) and "monai-deploy-app-sdk" not in pins
    assert ("torch" in pins) == (app != "ct_tissue")  # ct_tissue never imports torch
    assert (context / "app" / "__main__.py").is_file() and os.access(context / "tools", os.X_OK)
    _, pkg = _load(context)
    assert sorted(pkg["models"]) == sorted(p.name for p in (context / "models").iterdir())
    if PIPELINES[app].takes_model:  # the bundle given with --model, at /opt/holoscan/models/<its name>
        assert pkg["models"] == {"tiny_bundle": "/opt/holoscan/models/tiny_bundle"}
        assert (context / "models" / "tiny_bundle" / "configs" / "metadata.json").is_file()
    result = subprocess.run(["bash", "-n", str(context / "tools")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _packager_python() -> Path:
    """A private venv with the holoscan-cli 3.11 packager (its dependencies are small; ~30 s the first time)."""
    python = PACKAGER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PACKAGER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", HOLOSCAN_CLI_PACKAGER], check=True)
    return python


PACKAGER_PROBE = """
import json, sys
from pathlib import Path
from holoscan_cli.common.enum_types import PlatformConfiguration, SdkType
from holoscan_cli.packager.config_reader import ApplicationConfiguration
from holoscan_cli.packager.parameters import PackageBuildParameters
params = PackageBuildParameters()
params.application = Path(sys.argv[1])
params.timeout = int(sys.argv[3])
if len(sys.argv) > 4:  # the packager's --models: a folder with one sub-folder per model
    from holoscan_cli.packager.models import Models
    params.models = Models().build(Path(sys.argv[4]))
reader = ApplicationConfiguration()
reader.read(Path(sys.argv[2]))
print(json.dumps({"app": reader.populate_app_manifest(params).data,
                  "pkg": reader.populate_package_manifest(params).data,
                  "sdks": [s.value for s in SdkType],
                  "platform_configs": [p.value for p in PlatformConfiguration]}, default=str))
"""


@pytest.mark.slow
@pytest.mark.parametrize("app", APPS)
def test_manifests_agree_with_the_holoscan_packager(contexts: dict[str, Path], app: str) -> None:
    """The packager's own code, fed the same app.yaml, writes the same manifest fields and values."""
    ours_app, ours_pkg = _load(contexts[app])
    models = [str(contexts[app] / "models")] if any((contexts[app] / "models").iterdir()) else []
    result = subprocess.run([str(_packager_python()), "-c", PACKAGER_PROBE, str(REPO / "apps" / app),
                             str(REPO / "apps" / app / "app.yaml"), str(ours_app["timeout"]), *models],
                            capture_output=True, text=True, check=True)
    theirs = json.loads(result.stdout)
    assert set(theirs["app"]) == set(ours_app)
    assert set(theirs["pkg"]) == set(ours_pkg)
    # Set later from platform detection by the packager (not by the config reader):
    assert ours_app["sdk"] in theirs["sdks"] and ours_pkg["platformConfig"] in theirs["platform_configs"]
    for key in ("sdk", "sdkVersion", "command"):
        theirs["app"].pop(key), ours_app.pop(key)
    ours_app["output"].pop("format")  # the spec's required object, which the packager does not write
    assert ours_app == theirs["app"]
    theirs["pkg"].pop("platformConfig"), ours_pkg.pop("platformConfig")
    assert ours_pkg == theirs["pkg"]


def test_map_list_names_every_app() -> None:
    out = io.StringIO()
    assert radmap.map_list(out) == 0
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == APPS
    assert "timeout 900 s" in lines[APPS.index("ct_tissue")]


def test_map_build_refuses_unknown_app(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert radmap.map_build("no_such_app", tmp_path / "ctx") == 2
    assert "no_such_app" in capsys.readouterr().err and not (tmp_path / "ctx").exists()


def test_map_build_checks_the_model_it_packages(tmp_path: Path, tiny_bundle: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert radmap.map_build("model_seg", tmp_path / "ctx", models=[tmp_path / "empty"]) == 2
    assert capsys.readouterr().err.startswith(f"radnode map build: --model: {tmp_path / 'empty'}: not a model folder")
    assert radmap.map_build("ct_tissue", tmp_path / "ctx", models=[tiny_bundle]) == 2
    assert "ct_tissue runs no model folder of yours" in capsys.readouterr().err
    assert not (tmp_path / "ctx").exists()


def _seg_summary(path: Path) -> tuple[list[tuple[int, str]], np.ndarray, list[str]]:
    ds = pydicom.dcmread(path)
    segments = [(int(s.SegmentNumber), str(s.SegmentLabel)) for s in ds.SegmentSequence]
    shared = ds.SharedFunctionalGroupsSequence[0]  # holds the segment when there is only one

    def segment(frame: pydicom.Dataset) -> int:
        return int((frame if "SegmentIdentificationSequence" in frame else shared)
                   .SegmentIdentificationSequence[0].ReferencedSegmentNumber)

    frame_refs = [f"{segment(f)}:{f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID}"
                  for f in ds.PerFrameFunctionalGroupsSequence]
    return segments, ds.pixel_array, frame_refs


def _measurements(path: Path) -> list[tuple]:
    from radnode.outputs.sr import read_measurements

    rows = read_measurements(pydicom.dcmread(path))
    return [(r["structure"], r["segment_number"], r["concept"]["value"], r["unit"], r["value"]) for r in rows]


def _study_for(app: str, real_ct_folder: Path, tmp_path: Path) -> Path:
    """A real study of the kind the app takes: the TotalSegmentator CT, or Colin27 written as a T1 MR series;
    for the site's model the synthetic CT it was trained for."""
    modalities = PIPELINES[app].modalities
    if PIPELINES[app].takes_model:
        return write_lesion_case(tmp_path / "lesion_ct", seed=100)
    if "CT" in modalities:
        return real_ct_folder
    if "MR" in modalities:
        from radnode.imaging.mri import nifti_to_axial_volume, write_mr_series

        write_mr_series(nifti_to_axial_volume("/usr/share/mricron/templates/ch2.nii.gz"), tmp_path / "t1")
        return tmp_path / "t1"
    raise AssertionError(f"no test study for {app} ({modalities})")


@pytest.mark.slow
@pytest.mark.parametrize("app", APPS)
def test_map_command_gives_the_same_results_as_radnode_run(contexts: dict[str, Path], app: str, tiny_bundle: Path,
                                                           real_ct_folder: Path, tmp_path: Path) -> None:
    """app.json#command with the HOLOSCAN_* variables (as a MAP host runs it) vs ``radnode run``.

    ``python3`` in the command is this venv's interpreter here; in the image it is the image's python3.
    """
    study = _study_for(app, real_ct_folder, tmp_path)
    manifest, _ = _load(contexts[app])
    by_run = tmp_path / "run"
    model_args = [a for m in _models(app, tiny_bundle) for a in ("--model", str(m))]
    result = subprocess.run([sys.executable, "-m", "radnode", "run", str(study), "--output", str(by_run),
                             "--pipeline", app, *model_args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    workdir = tmp_path / "holoscan"
    workdir.mkdir()
    argv = json.loads(manifest["command"])
    argv[0] = sys.executable
    env = os.environ | {"HOLOSCAN_INPUT_PATH": str(study), "HOLOSCAN_OUTPUT_PATH": str(workdir / "output"),
                        "HOLOSCAN_WORKDIR": str(workdir), "HOLOSCAN_MODEL_PATH": str(contexts[app] / "models")}
    result = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=manifest["timeout"])
    assert result.returncode == 0, result.stderr[-3000:]
    by_map = workdir / "output"

    files = sorted(p.name for p in by_run.iterdir() if not p.name.startswith("."))
    assert files == sorted(p.name for p in by_map.iterdir() if not p.name.startswith("."))
    # app.json lists exactly what the app really writes (the output layout's entries for it), nothing more or less.
    assert sorted(manifest["output"]["format"]["files"]) == files

    run_segments, run_masks, run_refs = _seg_summary(by_run / "seg.dcm")
    map_segments, map_masks, map_refs = _seg_summary(by_map / "seg.dcm")
    assert run_segments == map_segments and run_refs == map_refs
    assert run_masks.any() and np.array_equal(run_masks, map_masks)

    run_values, map_values = _measurements(by_run / "sr.dcm"), _measurements(by_map / "sr.dcm")
    assert run_values and run_values == map_values
    if "report.txt" in files:  # the same report text (it carries no UIDs or times)
        assert (by_run / "report.txt").read_text() == (by_map / "report.txt").read_text()
    run_manifest = json.loads((by_run / "manifest.json").read_text())
    map_manifest = json.loads((by_map / "manifest.json").read_text())
    assert run_manifest["pipeline"] == map_manifest["pipeline"] == app
    assert len(run_manifest["measurements"]) == len(map_manifest["measurements"]) == len(run_values)


def test_a_build_waits_while_another_fills_the_shared_wheel_cache(tmp_path: Path) -> None:
    """Two ``map build`` runs on one machine share the wheel cache: while one holds it (downloading, building a
    wheel), the other must not link a wheel from it, which could be half written."""
    import threading

    from radnode.map_image import gather_wheels, pinned

    cache = tmp_path / "cache"
    (pin,) = pinned(["pip"])
    gather_wheels([pin], tmp_path / "first", cache)  # the cache now holds pip's wheel
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(cache / '.lock')!r}, 'w'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = threading.Event()
        thread = threading.Thread(target=lambda: (gather_wheels([pin], tmp_path / "second", cache), done.set()))
        thread.start()
        assert not done.wait(1.5), "gathered from the cache while another build held it"
        holder.stdin.close()  # the other build is done with the cache
        assert done.wait(30)
        thread.join()
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in (tmp_path / "second").iterdir()] == [p.name for p in (tmp_path / "first").iterdir()]
