"""MONAI Application Package (MAP) build contexts for the apps under ``apps/``.

``map_build(app, output)`` writes a folder that ``podman build`` / ``docker build`` turns into a MAP, with
nothing to fetch: the manifests ``app.json``/``pkg.json`` exactly as they sit in ``/etc/holoscan/``, the
app's ``app.yaml`` (at ``HOLOSCAN_CONFIG_PATH``), the app source (``/opt/holoscan/app``), its models
(``/opt/holoscan/models``), a radnode wheel, the wheels of what the app imports with their hash lock
(``radnode.map_image``), the MAP ``tools`` entrypoint and a Dockerfile (a base image build argument,
non-root user ``holoscan``); with ``image`` it builds the image too. Everything comes from radnode's
installed packages (``importlib.resources``: ``radnode.apps``, ``radnode.deploy_map``), so a wheel install
builds the same context as a checkout; the files the app writes are the output layout's
(:mod:`radnode.outputs.layout`).

Why not the SDK's packager: ``monai-deploy package`` / ``holoscan package`` (holoscan-cli ≤ 3.x) renders
these files and then immediately runs ``docker buildx`` on an NVIDIA CUDA base image; there is no
render-only mode and no container engine on the build machines, and holoscan-cli 4/5 (the one
monai-deploy-app-sdk 4 pulls in) no longer ships the packager at all. So the manifests are produced
here with the packager's own field set, defaults and layout (holoscan-cli 3.11 ``DefaultValues`` and
``ApplicationConfiguration.populate_app_manifest``/``populate_package_manifest``), and
``tests/test_map.py`` checks them field by field against that packager code run on the same app.yaml.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import yaml

from radnode.outputs.layout import outputs_of
from radnode.resources import DISTRIBUTION, copy_package_tree, installed_distribution, package_file, source_checkout

if TYPE_CHECKING:
    from radnode.config import ContainersConfig

APPS_PACKAGE = "radnode.apps"
"""The apps, one folder each (``apps/<name>`` in the source tree)."""
MAP_FILES_PACKAGE = "radnode.deploy_map"
"""The build context's templates and docs (``deploy/map`` in the source tree)."""
APP_METADATA_FILE = "app.yaml"

# The MAP layout: holoscan-cli 3.11 packager DefaultValues / EnvironmentVariables (the producer the
# MONAI Deploy App SDK documents), and the MAP specification's table of important paths.
MAP_API_VERSION = "1.0.0"
SDK_NAME = "monai-deploy"
APP_DIR = "/opt/holoscan/app"
MODELS_DIR = "/opt/holoscan/models"
DOCS_DIR = "/opt/holoscan/docs"
WORK_DIR = "/var/holoscan"
INPUT_DIR = "input/"
OUTPUT_DIR = "output/"
CONFIG_PATH = "/var/holoscan/app.yaml"
LOGS_DIR = "/var/holoscan/logs"
APP_MANIFEST_PATH = "/etc/holoscan/app.json"
PKG_MANIFEST_PATH = "/etc/holoscan/pkg.json"
MAP_USER = "holoscan"
PLATFORM_CONFIG = "dgpu"
"""What the packager records for an x86_64 target; the app itself needs no GPU (``resources.gpu: 0``)."""
VENV_DIR = "/opt/holoscan/venv"
"""The app's Python environment in the image (first on its PATH, so ``python3`` in the MAP command is it)."""
BOOKWORM_BASE = "localhost/radnode-map-base:bookworm"
"""The offline Debian bookworm base (``deploy/map/base/bookworm.sh``): for apps that request no GPU."""
CUDA_BASE = "localhost/radnode-map-base:cuda13"
"""The GPU base: NVIDIA's CUDA 13 runtime over that base's Python 3.11 (``deploy/map/base/Containerfile.cuda``)."""

SOURCE_DATE_EPOCH = "1700000000"
"""Fixed timestamps in radnode's wheel: the same sources give the same bytes, so an image build's layer cache holds."""

_MEMORY = re.compile(r"^\d+(\.\d+)?(Mi|Gi)$")


class MapError(ValueError):
    """An app that cannot be packaged as it stands; the message says what to fix."""


def app_folder(app: str) -> Path:
    """The app's folder in the installed ``radnode.apps`` package."""
    return package_file(APPS_PACKAGE, app)


@dataclass(frozen=True)
class AppMetadata:
    """An app's ``apps/<app>/app.yaml``: the packager's ``--config`` file plus radnode's timeout."""

    name: str
    title: str
    version: str
    input_formats: list[str]
    output_formats: list[str]
    timeout: int
    resources: dict[str, Any]
    models: dict[str, str] = field(default_factory=dict)
    """Model name → folder relative to the app folder, copied to ``/opt/holoscan/models/<name>``."""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def output_files(self) -> list[str]:
        """The files the app writes (``app.json#output.format.files``): its outputs in the output layout."""
        return [output.file for output in outputs_of(self.name)]

    @classmethod
    def load(cls, app: str) -> "AppMetadata":
        path = app_folder(app) / APP_METADATA_FILE
        if not path.is_file():
            raise MapError(f"{path}: missing; every packaged app needs its MAP metadata there")
        raw = yaml.safe_load(path.read_text()) or {}
        application, resources = raw.get("application"), raw.get("resources")
        if not isinstance(application, dict) or not isinstance(resources, dict):
            raise MapError(f"{path}: needs an 'application' and a 'resources' mapping")
        for key in ("title", "version"):
            if not application.get(key):
                raise MapError(f"{path}: application.{key} is required")
        for key in ("memory", "gpuMemory", "sharedMemory"):
            if key in resources and not _MEMORY.match(str(resources[key])):
                raise MapError(f"{path}: resources.{key}={resources[key]!r}; expected e.g. '4Gi' or '512Mi'")
        for key in ("cpu", "gpu"):
            if key in resources and (not isinstance(resources[key], (int, float)) or resources[key] < 0):
                raise MapError(f"{path}: resources.{key} must be a number ≥ 0")
        if "output-files" in application:
            raise MapError(f"{path}: application.output-files is not read; the files an app writes are listed "
                           "once, in radnode/outputs/layout.py")
        timeout = application.get("timeout", 0)
        if not isinstance(timeout, int) or timeout < 0:
            raise MapError(f"{path}: application.timeout must be whole seconds ≥ 0")
        return cls(name=app, title=str(application["title"]), version=str(application["version"]),
                    input_formats=list(application.get("input-formats") or ["file"]),
                    output_formats=list(application.get("output-formats") or ["file"]),
                    timeout=timeout, resources=dict(resources), models=dict(raw.get("models") or {}), raw=raw)


def packaged_apps() -> list[str]:
    """Registered pipelines, in registry order; each must be a folder ``apps/<name>`` with a ``__main__``."""
    from radnode.pipelines.registry import PIPELINES

    return list(PIPELINES)


def app_command(app: str) -> list[str]:
    """The MAP command (argv form): the app's ``__main__`` honours the HOLOSCAN_* variables."""
    return ["python3", "-m", f"radnode.apps.{app}"]


def map_environment() -> dict[str, str]:
    """``app.json#environment``: the HOLOSCAN_* contract, valued as the packager writes it."""
    return {
        "HOLOSCAN_APPLICATION": APP_DIR,
        "HOLOSCAN_INPUT_PATH": INPUT_DIR,
        "HOLOSCAN_OUTPUT_PATH": OUTPUT_DIR,
        "HOLOSCAN_WORKDIR": WORK_DIR,
        "HOLOSCAN_MODEL_PATH": MODELS_DIR,
        "HOLOSCAN_CONFIG_PATH": CONFIG_PATH,
        "HOLOSCAN_APP_MANIFEST_PATH": APP_MANIFEST_PATH,
        "HOLOSCAN_PKG_MANIFEST_PATH": PKG_MANIFEST_PATH,
        "HOLOSCAN_DOCS_PATH": DOCS_DIR,
        "HOLOSCAN_LOGS_PATH": LOGS_DIR,
    }


def app_manifest(meta: AppMetadata) -> dict[str, Any]:
    """``/etc/holoscan/app.json``.

    ``command`` is the JSON-encoded argv string, as the packager writes it (the spec's "shell command").
    ``output`` carries both the packager's ``formats`` list and the spec's required ``format`` object
    (which names the files the app writes).
    """
    return {
        "apiVersion": MAP_API_VERSION,
        "command": json.dumps(app_command(meta.name)),
        "environment": map_environment(),
        "input": {"path": INPUT_DIR, "formats": meta.input_formats},
        "liveness": None,
        "output": {"path": OUTPUT_DIR, "formats": meta.output_formats,
                   "format": {"type": meta.output_formats[0] if meta.output_formats else "file",
                              "files": meta.output_files}},
        "readiness": None,
        "sdk": SDK_NAME,
        "sdkVersion": metadata.version("monai-deploy-app-sdk"),
        "timeout": meta.timeout,
        "version": meta.version,
        "workingDirectory": WORK_DIR,
    }


def model_names(models: Sequence[Path]) -> list[tuple[str, Path]]:
    """Each model folder (absolute) with its name in a MAP's models folder: its own, ``NAME-2``… when taken."""
    named: list[tuple[str, Path]] = []
    for model in models:
        name, n = Path(model).name, 1
        while any(name == taken for taken, _ in named):
            n += 1
            name = f"{Path(model).name}-{n}"
        named.append((name, Path(model).resolve()))
    return named


def package_manifest(meta: AppMetadata, extra_models: Sequence[str] = ()) -> dict[str, Any]:
    """``/etc/holoscan/pkg.json``; ``models`` maps name → absolute path, as the packager writes it (the app's
    own models, then ``extra_models``: the names of the folders given with ``--model``)."""
    return {
        "apiVersion": MAP_API_VERSION,
        "applicationRoot": APP_DIR,
        "modelRoot": MODELS_DIR,
        "models": {name: f"{MODELS_DIR}/{name}" for name in [*meta.models, *extra_models]},
        "resources": meta.resources,
        "version": meta.version,
        "platformConfig": PLATFORM_CONFIG,
    }


def package_dirs(checkout: Path) -> dict[str, str]:
    """pyproject's ``[tool.setuptools] package-dir``: package → folder (what the wheel is built from)."""
    import tomllib

    config = tomllib.loads((checkout / "pyproject.toml").read_text())
    return dict(config["tool"]["setuptools"].get("package-dir") or {"radnode": "radnode"})


def build_wheel(target: Path) -> Path:
    """radnode's wheel in ``target``: built from the checkout of an editable install (the tree being edited), else
    repacked from the installed distribution (:func:`repack_installed_wheel`: what this interpreter runs)."""
    checkout = source_checkout()
    return build_wheel_from_tree(checkout, target) if checkout else repack_installed_wheel(target)


def build_wheel_from_tree(checkout: Path, target: Path) -> Path:
    """Build radnode's wheel from a source tree into ``target`` (no network: the venv's setuptools), with fixed
    timestamps (the same sources give the same bytes, so an image build's layer cache holds).

    The sources are copied to a scratch folder first, so setuptools' ``build/`` and ``*.egg-info``
    never land in the checkout.
    """
    target.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (checkout / name).is_file():
                shutil.copy2(checkout / name, src / name)
        for folder in sorted(set(package_dirs(checkout).values())):
            shutil.copytree(checkout / folder, src / folder, ignore=ignore)
        out = Path(tmp) / "wheel"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(out), str(src)], check=True, capture_output=True, text=True,
                       env={**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH})
        wheels = list(out.glob("radnode-*.whl"))
        if len(wheels) != 1:
            raise MapError(f"expected one radnode wheel, pip wrote {[w.name for w in wheels]}")
        return Path(shutil.copy2(wheels[0], target / wheels[0].name))


_NOT_REPACKED = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
"""Files an installer adds to the ``.dist-info`` folder; a wheel has none of them (RECORD is written anew)."""


def _record_hash(data: bytes) -> str:
    """A RECORD hash (PEP 376/427): ``sha256=`` and the URL-safe base64 digest without padding."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def repack_installed_wheel(target: Path) -> Path:
    """radnode's wheel rebuilt from its installed files (a regular install has no source tree to build from).

    Every file the installer recorded inside site-packages goes in (byte code and the installer's own files
    left out), each checked against its RECORD hash first, so a file changed after installation is refused
    rather than packaged; the wheel's RECORD is written anew, as PEP 427 lays it out (``.dist-info`` last)."""
    dist = installed_distribution()
    wheel_meta = (dist.read_text("WHEEL") or "").splitlines()
    tag = next((line.split(":", 1)[1].strip() for line in wheel_meta if line.startswith("Tag:")), "py3-none-any")
    entries = [f for f in dist.files or [] if not f.parts[0] == ".." and "__pycache__" not in f.parts
               and not (f.parts[0].endswith(".dist-info") and f.name in _NOT_REPACKED)]
    if not any(f.parts[0].endswith(".dist-info") for f in entries):
        raise MapError(f"the installed {DISTRIBUTION} {dist.version} has no RECORD of its files; reinstall it")
    entries.sort(key=lambda f: (f.parts[0].endswith(".dist-info"), str(f)))
    dist_info = next(f.parts[0] for f in entries if f.parts[0].endswith(".dist-info"))
    target.mkdir(parents=True, exist_ok=True)
    wheel = target / f"{DISTRIBUTION}-{dist.version}-{tag}.whl"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for entry in entries:
            data = Path(entry.locate()).read_bytes()
            digest = _record_hash(data)
            if entry.hash is not None and f"{entry.hash.mode}={entry.hash.value}" != digest:
                raise MapError(f"{entry.locate()}: changed since {DISTRIBUTION} was installed (its RECORD hash "
                               "differs); reinstall radnode before packaging it")
            archive.writestr(entry.as_posix(), data)
            writer.writerow([entry.as_posix(), digest, len(data)])
        writer.writerow([f"{dist_info}/RECORD", "", ""])
        archive.writestr(f"{dist_info}/RECORD", record.getvalue())
    return wheel


DOCKERFILE_TEMPLATE = files(MAP_FILES_PACKAGE) / "Dockerfile.template"
TOOLS_SCRIPT = files(MAP_FILES_PACKAGE) / "tools.sh"
MAP_README = files(MAP_FILES_PACKAGE) / "README.md"


def render_dockerfile(meta: AppMetadata, wheel_name: str, pip_wheel: str) -> str:
    """The MAP Dockerfile from ``deploy/map/Dockerfile.template`` (``{{KEY}}`` placeholders); its ``BASE_IMAGE``
    build argument defaults to the GPU base for an app that requests a GPU, the bookworm base otherwise."""
    env = map_environment() | {"HOLOSCAN_INPUT_PATH": f"{WORK_DIR}/{INPUT_DIR}",
                               "HOLOSCAN_OUTPUT_PATH": f"{WORK_DIR}/{OUTPUT_DIR}",
                               "HOLOSCAN_TIMEOUT": str(meta.timeout)}
    gpu = float(meta.resources.get("gpu") or 0) > 0
    values = {
        "BASE_IMAGE": CUDA_BASE if gpu else BOOKWORM_BASE, "TITLE": meta.title, "VENV": VENV_DIR,
        "CUDA_RUNTIME_DIR": f"{VENV_DIR}/lib/python3.11/site-packages/nvidia/cu13/lib",
        "PIP_WHEEL": pip_wheel, "VERSION": meta.version, "APP": meta.name,
        "SDK_VERSION": metadata.version("monai-deploy-app-sdk"), "USER": MAP_USER, "WHEEL": wheel_name,
        "ENV": "\n".join(f"ENV {k}={v}" for k, v in env.items()),
        "APP_DIR": APP_DIR, "MODELS_DIR": MODELS_DIR, "DOCS_DIR": DOCS_DIR, "WORK_DIR": WORK_DIR,
        "INPUT_PATH": env["HOLOSCAN_INPUT_PATH"], "OUTPUT_PATH": env["HOLOSCAN_OUTPUT_PATH"],
        "LOGS_DIR": LOGS_DIR, "CONFIG_PATH": CONFIG_PATH, "APP_MANIFEST": APP_MANIFEST_PATH,
        "PKG_MANIFEST": PKG_MANIFEST_PATH, "COMMAND": json.dumps(app_command(meta.name)),
    }
    text = DOCKERFILE_TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    leftover = re.findall(r"\{\{[A-Z_]+\}\}", text)
    if leftover:
        raise MapError(f"{DOCKERFILE_TEMPLATE}: unknown placeholders {leftover}")
    return text


def map_build(app: str, output: Path, *, wheel: Path | None = None, models: Sequence[Path] = (),
              image: bool = False, tag: str | None = None, base_image: str = "auto",
              config: "ContainersConfig | None" = None) -> int:
    """``radnode map build APP --output DIR [--model DIR] [--image [--tag T] [--base-image IMAGE]]``.

    Writes the MAP build context of ``app`` into ``output``; ``wheel`` reuses an already built radnode wheel,
    ``models`` are model folders for an app that runs one (``model_seg``), checked and copied into the image.
    With ``image`` the engine of ``config`` (``containers:``; podman, else docker, when unset) builds it
    offline as ``tag`` (default ``radnode-<app>:<version>``) on ``base_image`` (see
    :func:`radnode.map_image.resolve_base`) and the image's size and make-up are reported
    (``image-report.json`` in ``output`` too). Returns 0, or 2 with the reason on stderr.
    """
    from radnode.config import ContainersConfig
    from radnode.container_engine import Engine, EngineError

    try:
        context = write_build_context(app, Path(output), wheel=wheel, models=models)
    except (MapError, KeyError, subprocess.CalledProcessError, OSError) as e:
        detail = getattr(e, "stderr", None) or ""
        print(f"radnode map build: {e}{': ' + detail.strip() if detail else ''}", file=sys.stderr)
        return 2
    if not image:
        print(f"MAP build context for {app} in {context}; build the image with: radnode map build {app} "
              f"--output {context} --image")
        return 0
    from radnode.map_image import build_image, image_report, print_report, resolve_base

    meta = AppMetadata.load(app)
    containers = config or ContainersConfig()
    tag = tag or f"radnode-{app}:{meta.version}"
    try:
        engine = Engine.from_config(containers)
        base = resolve_base(base_image, meta, engine)
        build_image(engine, context, tag, base, containers.build_options)
        report = image_report(engine, tag, base)
    except (MapError, EngineError) as e:
        print(f"radnode map build: {e}", file=sys.stderr)
        return 2
    (context / "image-report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    return 0


def write_build_context(app: str, output: Path, *, wheel: Path | None = None, models: Sequence[Path] = ()) -> Path:
    """Write the build context (see the module docstring) and return its folder.

    ``models``: model folders copied to ``models/<name>`` (``/opt/holoscan/models/<name>`` in the image, listed
    in ``pkg.json``) after ``radnode models check``; only for an app that runs a model folder."""
    from radnode.pipelines.registry import get_pipeline

    spec = get_pipeline(app)  # unknown names fail with the list of known ones
    source = app_folder(app)
    if not (source / "__main__.py").is_file():
        raise MapError(f"{source}: no __main__.py; the MAP command runs `python -m radnode.apps.{app}`")
    meta = AppMetadata.load(app)
    if models and not spec.takes_model:
        raise MapError(f"{app} runs no model folder of yours; --model is for model_seg")
    site_models = model_names(models)
    if site_models:
        from radnode.models.loading import check_model_folder

        for name, folder in site_models:
            if name in meta.models:
                raise MapError(f"--model {folder}: the app has its own model named {name!r}")
            problems = check_model_folder(folder)
            if problems:
                raise MapError(f"--model: {problems[0]}")
    output.mkdir(parents=True, exist_ok=True)
    for stale in ("app", "models", "docs", "dist"):
        shutil.rmtree(output / stale, ignore_errors=True)

    (output / "app.json").write_text(json.dumps(app_manifest(meta), indent=4) + "\n")
    pkg = package_manifest(meta, [name for name, _ in site_models])
    (output / "pkg.json").write_text(json.dumps(pkg, indent=4) + "\n")
    (output / "app.yaml").write_bytes((source / APP_METADATA_FILE).read_bytes())
    copy_package_tree(source, output / "app", skip=lambda name: name in ("__pycache__", "models")
                      or name.endswith(".pyc"))
    models_dir = output / "models"
    models_dir.mkdir()
    for name, rel in meta.models.items():
        src = source.joinpath(*Path(rel).parts)
        if src.is_dir():
            copy_package_tree(src, models_dir / name)
        elif src.is_file():
            (models_dir / name).write_bytes(src.read_bytes())
        else:
            raise MapError(f"{source / APP_METADATA_FILE}: model {name!r} path {rel!r} does not exist")
    for name, folder in site_models:
        shutil.copytree(folder, models_dir / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    docs = output / "docs"
    docs.mkdir()
    (docs / "README.md").write_bytes(MAP_README.read_bytes())
    dist = output / "dist"
    dist.mkdir()
    wheel_path = Path(shutil.copy2(wheel, dist / Path(wheel).name)) if wheel else build_wheel(dist)
    from radnode.map_image import pip_wheel_name, write_image_inputs

    write_image_inputs(app, output)  # wheels/ and the hash-locked requirements.txt: the build fetches nothing
    (output / "tools").write_bytes(TOOLS_SCRIPT.read_bytes())
    (output / "tools").chmod(0o755)
    (output / ".dockerignore").write_text("**/__pycache__\n**/*.pyc\n")
    (output / "Dockerfile").write_text(render_dockerfile(meta, wheel_path.name, pip_wheel_name(output)))
    return output


def map_list(out: TextIO = sys.stdout) -> int:
    """List the packageable apps with version, resources and timeout; ``radnode map list``."""
    status = 0
    for app in packaged_apps():
        try:
            meta = AppMetadata.load(app)
        except MapError as e:
            print(f"{app:16} not packageable: {e}", file=out)
            status = 2
            continue
        r = meta.resources
        print(f"{app:16} {meta.version:8} cpu {r.get('cpu', 1)}, memory {r.get('memory', '1Gi')}, "
              f"gpu {r.get('gpu', 0)}, timeout {meta.timeout or 'none'} s  {meta.title}", file=out)
    return status
