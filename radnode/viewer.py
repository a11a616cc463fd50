"""Showing results in OHIF: a local Orthanc (DICOMweb) and the prebuilt OHIF viewer served in front of it.

The npm package ``@ohif/app`` ships a production build in ``dist/`` whose asset paths are absolute
(``/app.bundle.….js``, ``window.PUBLIC_URL="/"``), so it must be served at the site root. The viewer
reads DICOM over DICOMweb; serving ``/dicom-web`` from the same origin (a reverse proxy to Orthanc's
DICOMweb plugin) avoids CORS, which Orthanc does not answer. Standard library only: ``radnode demo
--viewer`` and the browser test use it without a web server package.
"""

from __future__ import annotations

import base64
import json
import logging
import mimetypes
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from importlib.resources import files
from importlib.resources.abc import Traversable

from radnode.peers import free_port
from radnode.resources import source_checkout

log = logging.getLogger(__name__)

OHIF_VERSION = "3.13.2"
"""The ``@ohif/app`` release ``deploy/ohif/install.sh`` unpacks; the app-config template is written for it."""
OHIF_DIST_ENV = "RADNODE_OHIF_DIST"
APP_CONFIG_TEMPLATE = files("radnode.deploy_ohif") / "app-config.template.js"
"""Package data (``deploy/ohif`` in the source tree)."""
DICOMWEB_PREFIX = "/dicom-web"

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_STORAGE_ROOT = Path("/var/tmp")
"""Orthanc's SQLite index misbehaved (lock errors) under /tmp on this kind of machine; /var/tmp works."""

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "host", "content-length"}


class ViewerUnavailableError(RuntimeError):
    """OHIF's build or Orthanc is not installed; the message says which install step is missing."""


def find_ohif_dist(version: str = OHIF_VERSION) -> Path:
    """The OHIF ``dist/`` folder: $RADNODE_OHIF_DIST, else the one ``deploy/ohif/install.sh`` unpacked into the
    checkout of an editable install (``.cache/ohif``). The viewer is npm's build, not radnode's package data."""
    if os.environ.get(OHIF_DIST_ENV):
        candidate = Path(os.environ[OHIF_DIST_ENV])
    elif (checkout := source_checkout()) is not None:
        candidate = checkout / ".cache" / "ohif" / version / "package" / "dist"
    else:
        raise ViewerUnavailableError(f"no OHIF build: set {OHIF_DIST_ENV} to an @ohif/app {version} dist/ folder "
                                     f"(`npm pack @ohif/app@{version}` and unpack it; deploy/ohif/install.sh does "
                                     "this in a radnode checkout)")
    if not (candidate / "index.html").is_file():
        raise ViewerUnavailableError(f"OHIF build not found at {candidate}; run deploy/ohif/install.sh "
                                     f"(or set {OHIF_DIST_ENV} to an @ohif/app dist/ folder)")
    return candidate


def check_viewer_installed() -> Path:
    """OHIF's dist/ when it and Orthanc with DICOMweb are installed; else ViewerUnavailableError saying how."""
    dist = find_ohif_dist()
    if not ORTHANC_BINARY.exists() or not ORTHANC_DICOMWEB_PLUGIN.exists():
        raise ViewerUnavailableError("Orthanc or its DICOMweb plugin is missing: apt-get install orthanc "
                                     "orthanc-dicomweb (scripts/bootstrap.sh installs them)")
    return dist


def render_app_config(dicomweb_root: str = DICOMWEB_PREFIX, *, template: Traversable = APP_CONFIG_TEMPLATE,
                      name: str = "radnode") -> str:
    """``app-config.js`` for OHIF with its one data source pointed at ``dicomweb_root`` (same origin)."""
    text = template.read_text()
    return text.replace("{{DICOMWEB_ROOT}}", dicomweb_root.rstrip("/")).replace("{{SOURCE_NAME}}", name)


# --------------------------------------------------------------------------------------------- Orthanc

@dataclass
class OrthancServer:
    """A private Orthanc with the DICOMweb plugin on loopback ports, its own storage; a context manager.

    Storage lives under /var/tmp (see ORTHANC_STORAGE_ROOT) and is removed on exit unless ``keep``.
    """

    http_port: int = 0
    dicom_port: int = 0
    aet: str = "RADNODEPACS"
    storage: Path | None = None
    keep: bool = False
    node_url: str | None = None
    """With a URL, the radnode plugin runs and sends its events to the node there."""
    event_token_file: Path | None = None
    """The plugin's token for the node (the node's ``orthanc.event_token_file``)."""
    stable_age: int = 1
    modalities: dict[str, list] = field(default_factory=dict)
    """Orthanc's DicomModalities: name → [AET, host, port]."""
    users: dict[str, str] = field(default_factory=dict)
    """Orthanc's RegisteredUsers: with any, HTTP basic authentication is required (REST and DICOMweb)."""
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _own_storage: bool = field(default=False, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict:
        """Orthanc's configuration: loopback only, DICOMweb at /dicom-web/, authentication only with ``users``."""
        from radnode.orthanc_config import orthanc_settings

        assert self.storage is not None
        settings = orthanc_settings(self.storage, self.http_port, self.dicom_port, aet=self.aet,
                                    node_url=self.node_url, token_file=self.event_token_file,
                                    stable_age=self.stable_age, modalities=self.modalities,
                                    name="radnode-viewer")
        if self.users:
            settings |= {"AuthenticationEnabled": True, "RegisteredUsers": self.users}
        return settings

    def _request(self, url: str, **kwargs: Any) -> urllib.request.Request:
        """A request to this Orthanc, with the first registered user's credentials when it has users."""
        request = urllib.request.Request(url, **kwargs)
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        return request

    def start(self, timeout: float = 30.0) -> "OrthancServer":
        """Start Orthanc and wait until its REST API and the DICOMweb plugin answer."""
        if not ORTHANC_BINARY.exists() or not ORTHANC_DICOMWEB_PLUGIN.exists():
            raise ViewerUnavailableError("Orthanc or its DICOMweb plugin is missing: "
                                         "apt-get install orthanc orthanc-dicomweb")
        self.http_port = self.http_port or free_port()
        self.dicom_port = self.dicom_port or free_port()
        if self.storage is None:
            self.storage = Path(tempfile.mkdtemp(prefix="radnode-orthanc-", dir=ORTHANC_STORAGE_ROOT))
            self._own_storage = True
        self.storage.mkdir(parents=True, exist_ok=True)
        config_path = self.storage / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        log_path = self.storage / "orthanc.log"
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen([str(ORTHANC_BINARY), str(config_path)], stdout=log_file,
                                            stderr=subprocess.STDOUT, cwd=self.storage)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.process.returncode}): "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(self._request(f"{self.dicomweb_url}/studies"), timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL) and remove storage it created."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        if self._own_storage and not self.keep and self.storage is not None:
            shutil.rmtree(self.storage, ignore_errors=True)

    def upload(self, paths: list[Path]) -> list[dict]:
        """Store DICOM files through the REST API (``POST /instances``); Orthanc's answers, in order."""
        answers = []
        for path in paths:
            request = self._request(f"{self.url}/instances", data=Path(path).read_bytes(),
                                    headers={"Content-Type": "application/dicom"}, method="POST")
            with urllib.request.urlopen(request, timeout=60) as r:
                answers.append(json.loads(r.read()))
        return answers

    def get_json(self, path: str) -> object:
        """GET a REST resource (``/studies``, ``/dicom-web/studies/…/series``) as JSON."""
        with urllib.request.urlopen(self._request(f"{self.url}{path}"), timeout=30) as r:
            return json.loads(r.read())

    def __enter__(self) -> "OrthancServer":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------- OHIF server

class _ViewerHandler(BaseHTTPRequestHandler):
    """Static files from OHIF's dist/ (SPA fallback to index.html), app-config.js generated, /dicom-web proxied."""

    server: "_ViewerHTTPServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        log.debug("viewer: " + format, *args)

    # -- dispatch
    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._dispatch(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(head=True)

    def do_POST(self) -> None:  # noqa: N802
        if self._is_dicomweb():
            self._proxy()
        else:
            self.send_error(405)

    def _is_dicomweb(self) -> bool:
        path = urlsplit(self.path).path
        return path == DICOMWEB_PREFIX or path.startswith(DICOMWEB_PREFIX + "/")

    def _dispatch(self, head: bool) -> None:
        if self._is_dicomweb():
            self._proxy()
            return
        path = urlsplit(self.path).path
        if path == "/app-config.js":
            self._send_bytes(self.server.app_config.encode(), "application/javascript", head)
            return
        target = self._static_path(path)
        if target is None:  # client-side route such as /viewer?StudyInstanceUIDs=…: the SPA handles it
            target = self.server.dist / "index.html"
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if target.suffix == ".wasm":
            ctype = "application/wasm"
        self._send_bytes(target.read_bytes(), ctype, head)

    def _static_path(self, path: str) -> Path | None:
        """The file under dist/ for a URL path, or None; never a path outside dist/."""
        relative = path.lstrip("/")
        if not relative:
            return None
        candidate = (self.server.dist / relative).resolve()
        if self.server.dist not in candidate.parents or not candidate.is_file():
            return None
        return candidate

    def _send_bytes(self, body: bytes, ctype: str, head: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        # SharedArrayBuffer (multi-threaded decoders) needs cross-origin isolation.
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _proxy(self) -> None:
        """Forward the request to Orthanc's DICOMweb root and stream the answer back."""
        upstream = self.server.orthanc_url + self.path
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        request = urllib.request.Request(upstream, data=body, headers=headers, method=self.command)
        try:
            response = urllib.request.urlopen(request, timeout=120)
        except urllib.error.HTTPError as e:
            response = e
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            self.send_error(502, f"Orthanc unreachable: {e}")
            return
        with response:
            payload = response.read()
            self.send_response(response.status if hasattr(response, "status") else response.code)
            for k, v in response.headers.items():
                if k.lower() not in _HOP_BY_HOP:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)


class _ViewerHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], dist: Path, orthanc_url: str, app_config: str) -> None:
        super().__init__(address, _ViewerHandler)
        self.dist = dist.resolve()
        self.orthanc_url = orthanc_url.rstrip("/")
        self.app_config = app_config


@dataclass
class ViewerServer:
    """OHIF at ``http://host:port/`` with ``/dicom-web`` reverse-proxied to Orthanc; a context manager."""

    orthanc_url: str
    """Orthanc's base URL (``http://127.0.0.1:8042``); requests go to ``<it>/dicom-web/…``."""
    dist: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    _server: _ViewerHTTPServer | None = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def viewer_url(self, study_uid: str, mode: str = "viewer") -> str:
        """The OHIF route opening one study in a mode (``viewer`` = longitudinal, ``segmentation``, …)."""
        return f"{self.url}/{mode}?StudyInstanceUIDs={study_uid}"

    def start(self) -> "ViewerServer":
        dist = self.dist or find_ohif_dist()
        self._server = _ViewerHTTPServer((self.host, self.port), dist, self.orthanc_url, render_app_config())
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-viewer", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Run in the foreground until interrupted (``radnode demo --viewer``)."""
        if self._server is None:
            self.start()
        assert self._thread is not None
        try:
            while self._thread.is_alive():
                self._thread.join(1.0)
        finally:
            self.stop()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "ViewerServer":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# ------------------------------------------------------------------------------- one study, end to end

@dataclass(frozen=True)
class ServedStudy:
    """A study stored in a private Orthanc and shown by OHIF in front of it (see :func:`serve_study`)."""

    orthanc: OrthancServer
    viewer: ViewerServer
    study_uid: str

    @property
    def url(self) -> str:
        """The OHIF page that opens the study (CT, SEG and SR side by side in the study browser)."""
        return self.viewer.viewer_url(self.study_uid)


@contextmanager
def serve_study(files: Iterable[Path], *, port: int = 0, dist: Path | None = None) -> Iterator[ServedStudy]:
    """Store one study's DICOM files (source images and results) in a private Orthanc and serve OHIF for it
    on ``127.0.0.1:port`` (0: a free port) until the block ends; both stop and Orthanc's storage goes."""
    import pydicom

    files = [Path(f) for f in files]
    studies = {str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)
               for f in files}
    if len(studies) != 1:
        raise ValueError(f"serve_study shows one study; the files hold {len(studies)}")
    dist = dist or check_viewer_installed()
    with OrthancServer() as orthanc:
        orthanc.upload(files)
        with ViewerServer(orthanc.url, dist=dist, port=port) as viewer:
            yield ServedStudy(orthanc, viewer, studies.pop())
