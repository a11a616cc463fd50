"""Real peers started on loopback for the demo and the tests: DCMTK storescp as a PACS, sekmet as an EHR.

They are real programs (not stand-ins): the node talks DICOM and FHIR to them exactly as it would to a
hospital's PACS and FHIR server.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from radnode.config import DicomPeer

STORESCP = "/usr/bin/storescp"  # DCMTK's, not pynetdicom's command of the same name in the venv


def free_port() -> int:
    """A TCP port on loopback that nothing uses now, below the kernel's ephemeral range: a port from that range
    (what binding port 0 gives) can be taken by any outgoing connection before the caller listens on it."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(PORTS_BELOW_EPHEMERAL, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every one tried is taken: an ephemeral one, as before
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORTS_BELOW_EPHEMERAL = 20000
"""The lowest port :func:`free_port` hands out (above the well-known and the usual service ports)."""


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (``ip_local_port_range``; Linux's default 32768)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(low, PORTS_BELOW_EPHEMERAL + 1000)


def _wait_until(ready, process: subprocess.Popen, what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log.read_text()[-1500:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not become ready within {timeout:.0f} s")
        time.sleep(0.2)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class _Peer:
    """A peer process with its log, stopped on exit."""

    process: subprocess.Popen
    log_path: Path

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class StoreSCP(_Peer):
    """DCMTK ``storescp`` writing every received instance into ``folder``: a PACS that is real DICOM.

    Each reception gets its own file (``+uf``), so an instance sent twice shows up twice.
    """

    def __init__(self, folder: Path, ae_title: str = "PACS", port: int | None = None,
                 tls: tuple[Path, Path, Path] | None = None, require_client_certificate: bool = False) -> None:
        """``tls``: (private key, certificate, CA bundle) PEM files: listen with TLS only (``+tls``), checking a
        client's certificate against the CA when ``require_client_certificate``."""
        if not Path(STORESCP).exists():
            raise RuntimeError(f"{STORESCP} not found: install Debian's dcmtk (scripts/bootstrap.sh does)")
        self.folder, self.ae_title, self.port = Path(folder), ae_title, port or free_port()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log_path = self.folder.parent / f"{self.folder.name}-storescp.log"
        log = self.log_path.open("w")
        secure = [] if tls is None else ["+tls", str(tls[0]), str(tls[1]), "+cf", str(tls[2]),
                                         "-rc" if require_client_certificate else "-ic"]
        self.tls = tls
        self.process = subprocess.Popen(
            [STORESCP, "--aetitle", ae_title, "--output-directory", str(self.folder), "--unique-filenames",
             "--filename-extension", ".dcm", *secure, str(self.port)],
            stdout=log, stderr=subprocess.STDOUT)
        _wait_until(lambda: _port_open(self.port), self.process, "storescp", self.log_path, 15)

    @property
    def address(self) -> str:
        """``AET@HOST:PORT`` as the node's command line takes it."""
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    @property
    def peer(self) -> DicomPeer:
        """The receiver as a known peer of the node's configuration (return-to-sender)."""
        return DicomPeer(ae_title=self.ae_title, host="127.0.0.1", port=self.port)

    @property
    def destination(self) -> dict[str, object]:
        """The receiver as a destination of the node's configuration (``egress.destinations.NAME``)."""
        return {"type": "dicom", "ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}

    def received(self) -> list[Path]:
        """Every file received so far, repeats included."""
        return sorted(self.folder.glob("*.dcm"))

    def received_uids(self) -> list[str]:
        """SOP Instance UIDs of every reception, repeats included."""
        import pydicom

        return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.received()]


class FhirServer(_Peer):
    """A real FHIR R4 server (the sekmet-fhir package) with strict validation of what it is sent."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        executable = Path(sys.executable).with_name("sekmet")
        if not executable.exists() and not (found := shutil.which("sekmet")):
            raise RuntimeError("sekmet not found: pip install sekmet-fhir (the test extras include it)")
        executable = executable if executable.exists() else Path(found)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/fhir"
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        settings = folder / "settings.yaml"
        settings.write_text(f"base_url: {self.base_url}\ndata_dir: {folder / 'data'}\n"
                            "simulator:\n  enabled: false\nvalidation:\n  inbound: strict\n")
        self.log_path = folder / "server.log"
        log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [str(executable), "serve", "--config", str(settings), "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=folder, stdout=log, stderr=subprocess.STDOUT)
        _wait_until(self._ready, self.process, "sekmet FHIR server", self.log_path, 60)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/metadata", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    @property
    def destination(self) -> dict[str, object]:
        """The server as a destination of the node's configuration (``egress.destinations.NAME``)."""
        return {"type": "fhir", "url": self.base_url}

    def search(self, resource_type: str, query: str = "") -> dict:
        """A FHIR search, returned as the Bundle's JSON."""
        import json

        with urllib.request.urlopen(f"{self.base_url}/{resource_type}?{query}", timeout=10) as r:
            return json.loads(r.read())
