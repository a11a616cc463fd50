"""radnode as a site installs it: a wheel built from the tree, in a fresh virtualenv, run from outside the tree.

Everything radnode needs at run time is package data found with ``importlib.resources`` (radnode/resources.py),
so the wheel alone must run ``radnode run``, ``radnode map build`` and the demo's phantom writer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from radnode.outputs.layout import outputs_of

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib, importlib.metadata as md, json, sys
names = ["radnode", "radnode.apps", "radnode.apps.ct_tissue.app", "radnode.operators.result_writers",
         "radnode.pipelines.rules", "radnode.deploy_map", "radnode.deploy_ohif", "radnode.report.findings",
         "radnode.console.dashboard"]
modules = {name: importlib.import_module(name) for name in names}
from radnode.pipelines.rules import DEFAULT_RULES
from radnode.report.findings import REFERENCE_RANGES_FILE
from radnode.console.dashboard import STATIC, TEMPLATES
from radnode.resources import source_checkout
dist = md.distribution("radnode")
print(json.dumps({
    "files": {name: getattr(m, "__file__", None) or list(m.__path__)[0] for name, m in modules.items()},
    "data": [str(DEFAULT_RULES), str(REFERENCE_RANGES_FILE), str(TEMPLATES / "login.html"), str(STATIC / "console.js")],
    "sys_path": sys.path,
    "meta_path": [f"{getattr(f, '__module__', '')}.{getattr(f, '__name__', type(f).__name__)}" for f in sys.meta_path],
    "editable_finder_loaded": [m for m in sys.modules if "__editable__" in m],
    "distribution": str(dist.locate_file("")),
    "direct_url": json.loads(dist.read_text("direct_url.json") or "{}"),
    "source_checkout": str(source_checkout()),
}))
"""


def _tree_copy(target: Path) -> Path:
    """The files git knows (tracked, or new and not ignored) of this checkout, copied: the wheel is built from them,
    never in the checkout (no build/ or *.egg-info left there)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    return target


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_a_wheel_in_a_fresh_virtualenv_runs_radnode_run_map_build_and_the_phantom_writer(tmp_path: Path) -> None:
    """The wheel (``pip wheel --no-deps``) goes into a new virtualenv under /tmp, not editable, and the three
    commands run from a folder outside the tree, with radnode imported from that virtualenv's site-packages.

    Its dependencies are shared from the bootstrap virtualenv through a ``.pth`` line naming that site-packages:
    installing them into a truly fresh virtualenv took 239 s here (torch 85 s, the rest 154 s, pip cache warm,
    2 busy cores), above this test's share of the suite. A path line in a ``.pth`` only extends ``sys.path``; the
    ``.pth`` files inside the named folder are not run, so the editable install's finder
    (``__editable__.radnode-*.pth``) never loads: the probe below proves that, and that every radnode package and
    data file comes from the new site-packages while no folder of the source tree is on ``sys.path``."""
    source = _tree_copy(tmp_path / "src")
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
          str(source)], cwd=tmp_path, env=os.environ.copy())
    (wheel,) = wheels.glob("radnode-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, env=os.environ.copy())
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path, env=os.environ.copy()).stdout.strip())
    shared = Path(sysconfig.get_paths()["purelib"])
    (site / "radnode-shared-dependencies.pth").write_text(f"{shared}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path, env=env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = json.loads(_run([str(python), "-c", PROBE], cwd=elsewhere, env=env).stdout)
    assert probe["distribution"] == str(site)
    assert "editable" not in json.dumps(probe["direct_url"]) and probe["source_checkout"] == "None"
    for name, file in {**probe["files"], **dict.fromkeys(probe["data"])}.items():
        assert Path(file or name).is_relative_to(site), f"{name} comes from {file or name}, not {site}"
    assert all(Path(data).is_file() for data in probe["data"]), "package data shipped in the wheel"
    assert not probe["editable_finder_loaded"] and not any("editable" in f.lower() for f in probe["meta_path"])
    for entry in probe["sys_path"]:  # the only entry inside the checkout is the shared site-packages
        where = (elsewhere / entry).resolve()  # '' (the probe's current folder) is elsewhere
        assert not where.is_relative_to(REPO) or where == shared, entry

    radnode = str(venv / "bin" / "radnode")
    _run([str(python), "-c", "import sys; from pathlib import Path; from radnode.phantom import make_ct_phantom, "
          "write_ct_series; write_ct_series(make_ct_phantom(n_slices=24, size=128), Path(sys.argv[1]))", "study"],
         cwd=elsewhere, env=env)
    _run([radnode, "run", "study", "--output", "out"], cwd=elsewhere, env=env)  # the shipped rules choose ct_tissue
    written = sorted(p.name for p in (elsewhere / "out").iterdir())
    assert written == sorted(o.file for o in outputs_of("ct_tissue"))
    assert json.loads((elsewhere / "out" / "manifest.json").read_text())["pipeline"] == "ct_tissue"

    _run([radnode, "map", "build", "ct_tissue", "--output", "map"], cwd=elsewhere, env=env)
    context = elsewhere / "map"
    assert sorted(json.loads((context / "app.json").read_text())["output"]["format"]["files"]) == written
    assert (context / "Dockerfile").is_file() and (context / "app" / "__main__.py").is_file()
    assert (context / "docs" / "README.md").is_file() and os.access(context / "tools", os.X_OK)
    # The context's wheel is the installed distribution repacked: the same files, byte for byte, as the built one.
    (repacked,) = (context / "dist").glob("radnode-*.whl")
    with zipfile.ZipFile(wheel) as built, zipfile.ZipFile(repacked) as packed:
        names = sorted(n for n in built.namelist() if not n.endswith("/RECORD"))
        assert names == sorted(n for n in packed.namelist() if not n.endswith("/RECORD"))
        assert all(built.read(n) == packed.read(n) for n in names)
    assert zipfile.ZipFile(repacked).testzip() is None
