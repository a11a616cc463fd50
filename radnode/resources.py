"""Where radnode's own files are: package data through ``importlib.resources``, and the checkout of an editable install.

Everything radnode needs at run time is package data of its installed packages — the apps' ``app.yaml``
(``radnode.apps``), the default rules (``radnode.pipelines``), the reference ranges (``radnode.report``), the
MAP build-context templates (``radnode.deploy_map``, from ``deploy/map``) and the OHIF app-config template
(``radnode.deploy_ohif``, from ``deploy/ohif``) — so a wheel install runs exactly as a checkout does. Only
development conveniences ask for the source checkout (building radnode's wheel from the tree being edited, the
OHIF build ``deploy/ohif/install.sh`` unpacks into it), and they learn it from the installer's own record of an
editable install (PEP 610 ``direct_url.json``), never by walking up from a module's file.
"""

from __future__ import annotations

import atexit
import json
from collections.abc import Callable
from contextlib import ExitStack
from importlib import metadata
from importlib.resources import as_file, files
from importlib.resources.abc import Traversable
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

DISTRIBUTION = "radnode"

_extracted = ExitStack()
atexit.register(_extracted.close)


def package_file(package: str, *parts: str) -> Path:
    """A file (or folder) shipped in one of radnode's packages as a path on disk: the installed one itself (a
    temporary copy of a file, kept until the process exits, only were the package imported from a zip archive)."""
    return _extracted.enter_context(as_file(files(package).joinpath(*parts)))


def copy_package_tree(source: Traversable, target: Path, skip: Callable[[str], bool] = lambda name: False) -> None:
    """Copy a folder of package data (``files(package) / name``) to ``target``, leaving out names ``skip`` accepts."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if skip(entry.name):
            continue
        if entry.is_dir():
            copy_package_tree(entry, target / entry.name, skip)
        else:
            (target / entry.name).write_bytes(entry.read_bytes())


def installed_distribution() -> metadata.Distribution:
    """radnode's distribution as an installer recorded it (a ``.dist-info`` with its RECORD). Not the first one
    ``importlib.metadata`` meets: from a source tree's root that is setuptools' ``radnode.egg-info`` build record
    there, which knows nothing of the install. PackageNotFoundError when radnode is not installed."""
    for dist in metadata.distributions(name=DISTRIBUTION):
        if dist.read_text("RECORD") is not None:
            return dist
    raise metadata.PackageNotFoundError(DISTRIBUTION)


def source_checkout() -> Path | None:
    """The source tree of an editable install (``pip install -e``), as its installer recorded it; None for a
    regular install (a wheel), whose files are all in site-packages."""
    try:
        record = installed_distribution().read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    if not record:
        return None
    direct_url = json.loads(record)
    if not direct_url.get("dir_info", {}).get("editable"):
        return None
    url = urlsplit(direct_url.get("url", ""))
    if url.scheme != "file":
        return None
    tree = Path(url2pathname(url.path))
    return tree if (tree / "pyproject.toml").is_file() else None
