"""MAP images: the build context's dependencies as wheels gathered on the host, built by the engine offline.

``radnode map build APP --output DIR --image`` writes the build context (``radnode.map``), adds the wheels
of exactly what the app imports at run time (``apps/<app>/requirements.txt``, the packager's convention;
versions pinned to this environment's, the tested set) with a sha256 lock, and builds the image with
``--network none``: nothing is fetched while it builds. The base is a build argument: the offline Debian
bookworm base (``deploy/map/base/bookworm.sh``) for an app that requests no GPU, NVIDIA's CUDA runtime on
that base (``deploy/map/base/Containerfile.cuda``) for one that does, or any image given.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from importlib.resources import files
from pathlib import Path
from typing import Any, TextIO

from radnode.container_engine import Engine, EngineError
from radnode.map import APPS_PACKAGE, MAP_FILES_PACKAGE, AppMetadata, MapError
from radnode.resources import package_file

REQUIREMENTS_FILE = "requirements.txt"
"""``apps/<app>/requirements.txt``: the distributions the app imports when it runs (names; versions are this
environment's). The Holoscan packager installs the same file from an app folder."""
BASE_DIR = package_file(MAP_FILES_PACKAGE, "base")
"""The bases' build inputs (``deploy/map/base`` in the source tree)."""
BOOKWORM_SCRIPT = BASE_DIR / "bookworm.sh"
CUDA_CONTAINERFILE = BASE_DIR / "Containerfile.cuda"
CUDA_IMAGE = "nvcr.io/nvidia/cuda:13.1.1-runtime-ubuntu24.04"
"""NVIDIA's published CUDA 13 runtime (holoscan-cu13 and cupy-cuda13x are CUDA 13 builds)."""


def wheel_cache() -> Path:
    """Where wheels gathered for images are kept, by file name (a wheel's name carries its version: it never
    changes), for every checkout and install of this user: ``$XDG_CACHE_HOME/radnode/map-wheels``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "radnode" / "map-wheels"


@dataclass(frozen=True)
class Wheel:
    """One locked dependency: distribution, version, wheel file in the context, its sha256."""

    name: str
    version: str
    path: Path
    sha256: str

    def lock_line(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


def app_requirements(app: str) -> list[str]:
    """The entries of ``apps/<app>/requirements.txt``: distribution names, or ``name==version`` for one that is
    not installed in this environment's site-packages (comments and blanks skipped)."""
    path = files(APPS_PACKAGE) / app / REQUIREMENTS_FILE
    if not path.is_file():
        raise MapError(f"{path}: missing; list the distributions the app imports, one per line")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(==[A-Za-z0-9.+!-]+)?", line):
            raise MapError(f"{path}:{number}: {line!r}: expected a distribution name, or name==version")
        entries.append(line)
    return entries


def pinned(entries: list[str]) -> list[tuple[str, str]]:
    """Each entry with its version: the one installed here (what the tests ran), or the entry's own ``==``
    pin; MapError naming any name that is neither installed nor pinned."""
    pins, missing = [], []
    for entry in entries:
        name, _, version = entry.partition("==")
        if version:
            pins.append((name, version))
            continue
        try:
            pins.append((metadata.distribution(name).metadata["Name"], metadata.version(name)))
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise MapError(f"not installed in this environment, so no tested version to pin: {', '.join(missing)}")
    return pins


def with_cuda_libraries(names: list[str]) -> list[str]:
    """``names`` and the NVIDIA CUDA library wheels (``nvidia-*``) they require as installed here, recursively:
    a CUDA torch's cuDNN, cuBLAS, … (none with a CPU torch). Nothing else is added: the list is complete."""
    from packaging.requirements import Requirement

    out, stack = list(names), [n.partition("==")[0] for n in names]
    while stack:
        try:
            requires = metadata.distribution(stack.pop()).requires or []
        except metadata.PackageNotFoundError:
            continue
        for spec in requires:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if req.name.lower().startswith("nvidia-") and req.name not in out:
                try:
                    metadata.distribution(req.name)
                except metadata.PackageNotFoundError:
                    continue
                out.append(req.name)
                stack.append(req.name)
    return out


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _cached_wheel(cache: Path, name: str, version: str) -> Path | None:
    prefix = f"{_normal(name)}-{version}-"
    return next((p for p in sorted(cache.glob("*.whl")) if p.name.lower().startswith(prefix.lower())), None)


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def gather_wheels(pins: list[tuple[str, str]], target: Path, cache: Path | None = None) -> list[Wheel]:
    """A wheel per pin in ``target`` (hard-linked from ``cache``): fetched by this environment's pip
    (``pip download``, its index and mirrors), else built from the source distribution (``pip wheel``)."""
    cache = cache or wheel_cache()
    cache.mkdir(parents=True, exist_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:  # one build at a time fills the cache: no half-written wheel is linked
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _gather_locked(pins, target, cache)


def _gather_locked(pins: list[tuple[str, str]], target: Path, cache: Path) -> list[Wheel]:
    wanted = [(n, v) for n, v in pins if _cached_wheel(cache, n, v) is None]
    if wanted:  # one resolver-free download for all, then one by one with a build fallback for the rest
        _pip("download", "-q", "--no-deps", "--only-binary", ":all:", "--dest", str(cache),
             *[f"{n}=={v}" for n, v in wanted])
    wheels = []
    for name, version in pins:
        path = _cached_wheel(cache, name, version)
        if path is None:
            built = _pip("wheel", "-q", "--no-deps", "--wheel-dir", str(cache), f"{name}=={version}")
            path = _cached_wheel(cache, name, version)
            if path is None:
                raise MapError(f"no wheel for {name}=={version}: pip download and pip wheel failed: "
                               f"{(built.stderr.strip().splitlines() or ['?'])[-1]}")
        linked = target / path.name
        if not linked.exists():
            try:
                os.link(path, linked)
            except OSError:
                shutil.copy2(path, linked)
        wheels.append(Wheel(name, version, linked, hashlib.sha256(linked.read_bytes()).hexdigest()))
    return wheels


def shared_requirements() -> list[str]:
    """The entries every packaged app lists: installed first, as a layer of their own, which is then the
    same in every app's image (the engine builds it once and a node stores it once)."""
    from radnode.map import packaged_apps

    lists = [app_requirements(app) for app in packaged_apps() if (files(APPS_PACKAGE) / app / REQUIREMENTS_FILE).is_file()]
    common = set.intersection(*(set(entries) for entries in lists)) if lists else set()
    return sorted(common, key=str.lower)


def _write_lock(path: Path, header: str, wheels: list[Wheel]) -> None:
    path.write_text(header + "".join(f"{w.lock_line()}\n" for w in sorted(wheels, key=lambda w: w.name.lower())))


def write_image_inputs(app: str, context: Path, cache: Path | None = None) -> list[Wheel]:
    """``wheels/`` (the app's dependencies and pip, which runs from its wheel in the build), the app's complete
    lock ``requirements.txt`` and ``requirements-shared.txt``, the part every app's image shares (name==version
    with sha256, installed with ``--require-hashes --no-deps``)."""
    shutil.rmtree(context / "wheels", ignore_errors=True)
    wheels = gather_wheels(pinned(with_cuda_libraries(app_requirements(app))), context / "wheels", cache)
    gather_wheels(pinned(["pip"]), context / "wheels", cache)
    shared = {name for name, _ in pinned(shared_requirements())}
    _write_lock(context / "requirements.txt",
                f"# What {app} imports when it runs, pinned to the environment radnode was tested in; installed\n"
                f"# offline from wheels/ with --require-hashes --no-deps (the list is complete: nothing is resolved).\n",
                wheels)
    _write_lock(context / "requirements-shared.txt",
                "# The part of requirements.txt that every radnode app's image installs first (a shared layer).\n",
                [w for w in wheels if w.name in shared])
    return wheels


def pip_wheel_name(context: Path) -> str:
    """The pip wheel in the context's ``wheels/`` (the build runs pip from it)."""
    found = sorted((context / "wheels").glob("pip-*.whl"))
    if not found:
        raise MapError(f"{context / 'wheels'}: no pip wheel")
    return found[-1].name


def needs_gpu(meta: AppMetadata) -> bool:
    """Whether the app requests a GPU (``resources.gpu``): its image then gets the CUDA base."""
    return float(meta.resources.get("gpu") or 0) > 0


def bookworm_base(engine: Engine) -> str:
    """The offline Debian bookworm base (built once per engine store, keyed by its inputs); its name."""
    result = subprocess.run(["bash", str(BOOKWORM_SCRIPT), *engine.argv], env=engine.env, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise MapError(f"{BOOKWORM_SCRIPT}: {result.stderr.strip()[-800:]}")
    return result.stdout.strip().splitlines()[-1]


def cuda_base(engine: Engine, cuda_image: str = CUDA_IMAGE) -> str:
    """The GPU base: NVIDIA's CUDA runtime libraries over the bookworm base's Python 3.11
    (``deploy/map/base/Containerfile.cuda``); pulls ``cuda_image`` from NVIDIA's registry unless present."""
    python_base = bookworm_base(engine)
    key = hashlib.sha256(CUDA_CONTAINERFILE.read_bytes() + f"{cuda_image} {python_base}".encode()).hexdigest()[:12]
    image = f"localhost/radnode-map-base:cuda13-{key}"
    if engine.image_id(image):
        return image
    try:
        engine.run("build", "--network", "none", "-f", str(CUDA_CONTAINERFILE), "--build-arg",
                   f"CUDA_IMAGE={cuda_image}", "--build-arg", f"PYTHON_BASE={python_base}", "-t", image,
                   str(BASE_DIR), timeout=3600)
    except EngineError as e:
        raise MapError(f"GPU base from {cuda_image}: {e} (pull it where NVIDIA's registry is reachable, or "
                       "give --base-image)") from None
    return image


def resolve_base(choice: str, meta: AppMetadata, engine: Engine) -> str:
    """``--base-image``: ``auto`` (CUDA base when the app requests a GPU, else bookworm), ``bookworm``,
    ``cuda``, or an image reference used as it is."""
    if choice == "auto":
        choice = "cuda" if needs_gpu(meta) else "bookworm"
    if choice == "bookworm":
        return bookworm_base(engine)
    if choice == "cuda":
        return cuda_base(engine)
    return choice


def build_image(engine: Engine, context: Path, tag: str, base_image: str, options: list[str] | None = None,
                log: TextIO = sys.stderr) -> str:
    """``ENGINE build --network none`` of the context; returns the image ID. The engine's layer cache makes
    a rebuild of unchanged inputs quick."""
    args = ["build", "--network", "none", "--build-arg", f"BASE_IMAGE={base_image}", "-t", tag,
            "-f", str(context / "Dockerfile"), *(options or []), str(context)]
    started = time.monotonic()
    print(f"radnode map build: {' '.join(engine.command(*args))}", file=log)
    try:
        engine.run(*args, timeout=3600)
    except EngineError as e:
        raise MapError(f"image build failed: {e}") from None
    image_id = engine.image_id(tag)
    if image_id is None:
        raise MapError(f"the engine built {tag} but does not list it")
    print(f"radnode map build: built {tag} ({image_id[:19]}) in {time.monotonic() - started:.0f} s", file=log)
    return image_id


SIZE_PROBE = r"""
import json, sys
from importlib import metadata
from pathlib import Path
sizes = {}
for dist in metadata.distributions():
    total = 0
    for f in dist.files or []:
        try:
            total += f.locate().lstat().st_size
        except OSError:
            pass
    sizes[dist.metadata["Name"]] = total
def tree(path):
    p = Path(path)
    return sum(f.lstat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink()) if p.exists() else 0
print(json.dumps({"python_packages": sizes, "models": tree(sys.argv[1]), "app": tree(sys.argv[2]),
                  "venv": tree(sys.prefix)}))
"""


def image_report(engine: Engine, image: str, base_image: str) -> dict[str, Any]:
    """What the image is made of: total, the base's share, the Python environment by distribution (largest
    first), the models and the app, as measured inside the image."""
    from radnode.map import APP_DIR, MODELS_DIR

    probe = engine.run("run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c", SIZE_PROBE,
                       MODELS_DIR, APP_DIR, timeout=300)
    inside = json.loads(probe.stdout.strip().splitlines()[-1])
    total = engine.image_size(image)
    base = engine.image_size(base_image) if engine.image_id(base_image) else None
    packages = sorted(inside["python_packages"].items(), key=lambda kv: -kv[1])
    return {"image": image, "base_image": base_image, "total_bytes": total, "base_bytes": base,
            "python_environment_bytes": inside["venv"], "models_bytes": inside["models"], "app_bytes": inside["app"],
            "python_packages": [{"name": n, "bytes": b} for n, b in packages]}


def print_report(report: dict[str, Any], out: TextIO = sys.stdout, top: int = 12) -> None:
    """The size report as a short table (MB = 10⁶ bytes)."""
    mb = lambda b: f"{b / 1e6:8.1f} MB" if b is not None else "       ?   "  # noqa: E731
    print(f"{report['image']}: {mb(report['total_bytes']).strip()}", file=out)
    print(f"  {mb(report['base_bytes'])}  base {report['base_image']}", file=out)
    print(f"  {mb(report['python_environment_bytes'])}  Python environment, of which:", file=out)
    for pkg in report["python_packages"][:top]:
        print(f"      {mb(pkg['bytes'])}  {pkg['name']}", file=out)
    rest = sum(p["bytes"] for p in report["python_packages"][top:])
    print(f"      {mb(rest)}  {len(report['python_packages'][top:])} more", file=out)
    unlisted = report["python_environment_bytes"] - sum(p["bytes"] for p in report["python_packages"])
    print(f"      {mb(unlisted)}  compiled bytecode (.pyc), which no package lists", file=out)
    print(f"  {mb(report['models_bytes'])}  models", file=out)
    print(f"  {mb(report['app_bytes'])}  app source", file=out)
