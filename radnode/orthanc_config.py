"""Orthanc's configuration for running in front of the node (``radnode orthanc-config``).

One function builds the settings, used by the command (a folder with ``orthanc.json``, the plugin
script and the storage) and by :class:`radnode.viewer.OrthancServer` (tests, demo). Orthanc listens on
loopback for HTTP, on all interfaces for DICOM; DICOMweb is on at ``/dicom-web/``; the radnode plugin
sends its events to the node's HTTP API.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PLUGIN_SCRIPT = REPO / "orthanc" / "radnode_plugin.py"
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")
DICOMWEB_PLUGIN = ORTHANC_PLUGINS / "libOrthancDicomWeb.so"
PYTHON_PLUGIN = ORTHANC_PLUGINS / "libOrthancPython.so"
DEFAULT_NODE_URL = "http://127.0.0.1:8765"
DEFAULT_STABLE_AGE = 2
"""Seconds without a new instance before Orthanc calls a study stable (its default, 60, is far too slow
for triggering; the plugin's per-instance events and the node's own rules do the rest)."""


def orthanc_settings(storage: Path, http_port: int = 8042, dicom_port: int = 4242, *, aet: str = "ORTHANC",
                     node_url: str | None = DEFAULT_NODE_URL, plugin_script: Path | None = PLUGIN_SCRIPT,
                     stable_age: int = DEFAULT_STABLE_AGE, modalities: dict[str, list[Any]] | None = None,
                     dicomweb_servers: dict[str, Any] | None = None, name: str = "radnode-orthanc",
                     remote_access: bool = False, token_file: Path | str | None = None) -> dict[str, Any]:
    """Orthanc's JSON settings; ``node_url`` None leaves the radnode plugin out (a plain DICOMweb Orthanc);
    ``token_file``: the file with the token the plugin sends the node (the node's ``orthanc.event_token_file``)."""
    plugins = [str(DICOMWEB_PLUGIN)]
    settings: dict[str, Any] = {
        "Name": name,
        "StorageDirectory": str(storage / "db"),
        "IndexDirectory": str(storage / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": remote_access,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "DicomServerEnabled": True,
        "DicomAlwaysAllowStore": True,
        "HttpThreadsCount": 8,
        "StableAge": stable_age,
        "DicomModalities": modalities or {},
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full", "Servers": dicomweb_servers or {}},
    }
    if node_url is not None and plugin_script is not None:
        plugins.append(str(PYTHON_PLUGIN))
        settings["PythonScript"] = str(plugin_script)
        settings["PythonVerbose"] = False
        settings["RadNode"] = {"NodeUrl": node_url.rstrip("/"), "EarlyTrigger": True}
        if token_file is not None:
            settings["RadNode"]["TokenFile"] = str(token_file)
    settings["Plugins"] = plugins
    return settings


TOKEN_FILE = "radnode-event-token"
"""The plugin's token, written by :func:`write_orthanc_config` beside ``orthanc.json`` (owner-only)."""


def write_event_token(path: Path) -> str:
    """A new random token for the plugin's events, in an owner-only file (kept when one is there)."""
    if path.is_file() and len(path.read_text().strip()) >= 32:
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def write_orthanc_config(output: Path, http_port: int = 8042, dicom_port: int = 4242,
                         node_url: str = DEFAULT_NODE_URL, **options: Any) -> Path:
    """Write ``output/orthanc.json``, a copy of the plugin and the plugin's token file (``radnode-event-token``,
    owner-only) beside it; storage goes to ``output/db``.

    ``Orthanc output/orthanc.json`` then pairs with ``radnode serve --orthanc-url http://127.0.0.1:HTTP_PORT``
    with ``orthanc.event_token_file: output/radnode-event-token`` (its web service must listen at
    ``node_url``). Returns the configuration file's path.
    """
    output = output.resolve()
    (output / "db").mkdir(parents=True, exist_ok=True)
    plugin = output / PLUGIN_SCRIPT.name
    shutil.copyfile(PLUGIN_SCRIPT, plugin)
    config = output / "orthanc.json"
    token_file = output / TOKEN_FILE
    write_event_token(token_file)
    settings = orthanc_settings(output, http_port, dicom_port, node_url=node_url, plugin_script=plugin,
                                token_file=token_file, **options)
    config.write_text(json.dumps(settings, indent=2) + "\n")
    return config
