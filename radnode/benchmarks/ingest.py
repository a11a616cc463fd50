"""Ingest: one CT study sent by DCMTK storescu over loopback to radnode's SCP and to the receivers
hospitals use today, with 1 and with N concurrent senders (the study's files split between them).

Every receiver starts fresh (empty storage) for every send, the peers take turns within each round (the
order rotates between rounds) and each send is checked: the receiver must hold every instance afterwards.

radnode is compared with the minimal pynetdicom SCP like for like: ``radnode`` (fsync on) with
``pynetdicom_minimal_fsync``, which makes the same promise (the instance's bytes and its file name on disk
before the answer: the file and its folder fsync'd), and ``radnode_no_fsync`` with ``pynetdicom_minimal``
(bytes written, nothing flushed). Both minimal SCPs receive into a file as radnode's SCP does. A third,
``pynetdicom_minimal_log``, keeps the promise with an append log per association, the issue's other design.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from radnode.benchmarks import BENCH_API, send_files, summary
from radnode.config import Config
from radnode.node.service import Node
from radnode.peers import StoreSCP
from radnode.viewer import ORTHANC_STORAGE_ROOT, OrthancServer

MINIMAL_PROCESSES = 8
"""Processes of the shared-port minimal SCP: one per sender of the benchmark's concurrent send."""
RADNODE_RECEIVERS = 4
"""``ingress.receivers`` of ``radnode_receivers``: as the shipped deploy configurations set it (on these 2 cores
2 to 6 receivers take 8 senders at about the same rate, 8 slightly slower)."""

PEERS = ("radnode", "radnode_receivers", "radnode_no_fsync", "pynetdicom_minimal_fsync", "pynetdicom_minimal",
         "pynetdicom_minimal_log", "pynetdicom_minimal_fsync_processes", "dcmtk_storescp", "orthanc")
"""``radnode``: the node as shipped (fsync per instance, SQLite index, completeness); ``radnode_receivers``: the
same with ``ingress.receivers:`` :data:`RADNODE_RECEIVERS` (receiver processes on the node's port);
``radnode_no_fsync``: the node with ``ingress.sync_spool: false``; ``pynetdicom_minimal``: a pynetdicom SCP that
only writes the bytes;
``pynetdicom_minimal_fsync``: the same, each file and its folder fsync'd before the answer;
``pynetdicom_minimal_log``: the same SCP durable the other way the issue names, an append log per association
(:class:`_AppendLog`);
``pynetdicom_minimal_fsync_processes``: that one in :data:`MINIMAL_PROCESSES` processes sharing the port, the
ceiling of a Python receiver with many senders on this machine."""

LIKE_FOR_LIKE = {"fsync": ("radnode", "pynetdicom_minimal_fsync"), "no_fsync": ("radnode_no_fsync", "pynetdicom_minimal")}
"""radnode's ratio to the minimal SCP, each pair making the same durability promise."""

IN_PROCESS = ("radnode", "radnode_no_fsync", "pynetdicom_minimal", "pynetdicom_minimal_fsync", "pynetdicom_minimal_log")
"""Receivers running in the benchmark's process: their CPU time per instance is measured too (the figure the
machine's load does not change, where wall times on a shared machine do)."""

Receiver = tuple[int, str, Callable[[], int]]
"""(DICOM port, called AE title, how many instances the receiver holds now)."""


def _minimal_handler(folder: Path, fsync: bool) -> Callable[[Event], int]:
    """The minimal SCP's C-STORE handler: copy the received file into ``folder`` (and flush it and the folder)."""
    def on_store(event: Event) -> int:
        target = folder / f"{event.request.AffectedSOPInstanceUID}.dcm"
        shutil.copyfile(event.dataset_path, target)  # the Part 10 file pynetdicom received, copied by the kernel
        if fsync:
            _fsync(target, os.O_RDONLY)
            _fsync(folder, os.O_RDONLY | os.O_DIRECTORY)
        return 0x0000
    return on_store


def _minimal_ae() -> AE:
    """pynetdicom's AE as the minimal SCP runs it: every storage SOP class, unlimited PDU, receiving into files."""
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    ae = AE(ae_title="MINIMAL")
    ae.maximum_pdu_size = 0
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    return ae


@contextlib.contextmanager
def minimal_scp(folder: Path, fsync: bool = False) -> Iterator[Receiver]:
    """A pynetdicom Storage SCP that writes each received instance's bytes to a file, nothing else (with
    ``fsync``: the file, then its folder, flushed to disk before the answer, the promise radnode's spool makes).

    Same PDU setting as radnode's SCP (unlimited) and the same receiving into a file
    (``STORE_RECV_CHUNKED_DATASET``, which radnode's SCP turns on for the process), so the two differ only in
    what they do per instance.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ae = _minimal_ae()
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, _minimal_handler(folder, fsync))])
    try:
        yield server.server_address[1], "MINIMAL", lambda: sum(1 for _ in folder.glob("*.dcm"))
    finally:
        server.shutdown()
        ae.shutdown()


class _AppendLog:
    """The minimal SCP made durable by an append log instead of a file per instance: each association's
    instances go into one log file (its folder fsync'd once, when the log is made), each appended as its length
    and its bytes and flushed (``fdatasync``) before the answer. What this design costs by itself tells how
    much of the minimal SCP's rate a receiver keeping it has left for everything else."""

    HEADER = struct.Struct("<Q")

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._logs: dict[Association, list[int]] = {}
        """Per association: the log's descriptor and where its next record goes."""

    def on_store(self, event: Event) -> int:
        log = self._logs.get(event.assoc)
        if log is None:
            descriptor = os.open(self.folder / f"{uuid.uuid4().hex}.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            _fsync(self.folder, os.O_RDONLY | os.O_DIRECTORY)
            log = self._logs[event.assoc] = [descriptor, 0]
        data = Path(event.dataset_path).read_bytes()
        log[1] += os.pwritev(log[0], [self.HEADER.pack(len(data)), data], log[1])
        os.fdatasync(log[0])
        return 0x0000

    def on_end(self, event: Event) -> None:
        log = self._logs.pop(event.assoc, None)
        if log is not None:
            os.close(log[0])

    def held(self) -> int:
        """The records in the logs."""
        count = 0
        for path in self.folder.glob("*.log"):
            with open(path, "rb") as f:
                while header := f.read(self.HEADER.size):
                    f.seek(self.HEADER.unpack(header)[0], os.SEEK_CUR)
                    count += 1
        return count


def _fsync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def minimal_log_scp(folder: Path) -> Iterator[Receiver]:
    """:func:`minimal_scp` durable through an :class:`_AppendLog`."""
    folder.mkdir(parents=True, exist_ok=True)
    logs = _AppendLog(folder)
    ae = _minimal_ae()
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
        (evt.EVT_C_STORE, logs.on_store), (evt.EVT_RELEASED, logs.on_end), (evt.EVT_ABORTED, logs.on_end)])
    try:
        yield server.server_address[1], "MINIMAL", logs.held
    finally:
        server.shutdown()
        ae.shutdown()


class _SharedPortServer(ThreadedAssociationServer):
    """pynetdicom's association server bound with SO_REUSEPORT, so several processes listen on one port."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def _serve_minimal(port: int, folder: str, fsync: bool) -> None:
    """One process of :func:`minimal_scp_processes`: says ``listening`` on its standard output, then serves."""
    server = _minimal_ae().make_server(("127.0.0.1", port), server_class=_SharedPortServer,
                                       evt_handlers=[(evt.EVT_C_STORE, _minimal_handler(Path(folder), fsync))])
    print("listening", flush=True)
    server.serve_forever()


@contextlib.contextmanager
def minimal_scp_processes(folder: Path, fsync: bool = True, processes: int = MINIMAL_PROCESSES) -> Iterator[Receiver]:
    """The minimal SCP in ``processes`` processes sharing one port (SO_REUSEPORT: the kernel spreads the
    associations over them), so no Python process serves more than one of the senders: the most a pynetdicom
    receiver making radnode's promise reaches on this machine, whatever it does between the bytes and the disk."""
    folder.mkdir(parents=True, exist_ok=True)
    reserve = socket.socket()  # holds the port (bound, never listening) until the servers listen on it
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserve.bind(("127.0.0.1", 0))
    port = reserve.getsockname()[1]
    code = f"from radnode.benchmarks.ingest import _serve_minimal; _serve_minimal({port}, {str(folder)!r}, {fsync})"
    workers: list[subprocess.Popen] = []
    try:
        for _ in range(processes):
            workers.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True))
        for worker in workers:
            if worker.stdout is None or worker.stdout.readline().strip() != "listening":
                raise RuntimeError(f"minimal SCP process {worker.pid} did not start (exit status {worker.poll()})")
        reserve.close()
        yield port, "MINIMAL", lambda: sum(1 for _ in folder.glob("*.dcm"))
    finally:
        reserve.close()
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(30)
            if worker.stdout is not None:
                worker.stdout.close()


@contextlib.contextmanager
def radnode_scp(folder: Path, sync_spool: bool, receivers: int = 1) -> Iterator[Receiver]:
    """The node with its full bookkeeping (receiving in ``receivers`` processes when above 1); jobs run
    ``/bin/true`` so no pipeline competes for the CPU, and the feedback thread does not preload MONAI's metrics
    (``feedback.preload_metrics``: tens of CPU-seconds of imports right after the start, which would overlap the
    send: start-up, not ingest)."""
    config = Config.model_validate({"data_dir": str(folder),
                                    "ingress": {"host": "127.0.0.1", "port": 0, "sync_spool": sync_spool,
                                                "receivers": receivers},
                                    "api": BENCH_API, "feedback": {"preload_metrics": False}})
    with Node(config, job_command=["/bin/true"]) as node:
        spool = node.config.data_dir / "spool"
        yield node.port, config.ingress.ae_title, lambda: sum(1 for _ in spool.glob("*/*/*.dcm"))


@contextlib.contextmanager
def dcmtk_storescp(folder: Path) -> Iterator[Receiver]:
    """DCMTK storescp with its default options, writing into ``folder``."""
    with StoreSCP(folder / "in", ae_title="STORESCP") as scp:
        yield scp.port, scp.ae_title, lambda: len(scp.received())


@contextlib.contextmanager
def orthanc(folder: Path) -> Iterator[Receiver]:
    """Debian's Orthanc as :class:`OrthancServer` starts it (Orthanc's defaults for storage and the index)."""
    with OrthancServer(storage=folder, node_url=None, aet="ORTHANC") as server:
        def count() -> int:
            with urllib.request.urlopen(f"{server.url}/statistics", timeout=30) as r:
                return int(json.loads(r.read())["CountInstances"])
        yield server.dicom_port, server.aet, count


def receiver(peer: str, folder: Path) -> contextlib.AbstractContextManager[Receiver]:
    """A fresh receiver of the named kind storing under ``folder``."""
    return {"radnode": lambda: radnode_scp(folder, sync_spool=True),
            "radnode_receivers": lambda: radnode_scp(folder, sync_spool=True, receivers=RADNODE_RECEIVERS),
            "radnode_no_fsync": lambda: radnode_scp(folder, sync_spool=False),
            "pynetdicom_minimal": lambda: minimal_scp(folder),
            "pynetdicom_minimal_fsync": lambda: minimal_scp(folder, fsync=True),
            "pynetdicom_minimal_log": lambda: minimal_log_scp(folder),
            "pynetdicom_minimal_fsync_processes": lambda: minimal_scp_processes(folder, fsync=True),
            "dcmtk_storescp": lambda: dcmtk_storescp(folder),
            "orthanc": lambda: orthanc(folder)}[peer]()


def run(files: list[Path], senders: tuple[int, ...] = (1, 8), repeats: int = 3,
        peers: tuple[str, ...] = PEERS) -> dict:
    """Instances/s and MB/s per peer and sender count (median of ``repeats``), and radnode's ratios."""
    total_bytes = sum(f.stat().st_size for f in files)
    seconds: dict[int, dict[str, list[float]]] = {n: {p: [] for p in peers} for n in senders}
    cpu: dict[int, dict[str, list[float]]] = {n: {p: [] for p in peers} for n in senders}
    for round_ in range(repeats):
        order = peers[round_ % len(peers):] + peers[:round_ % len(peers)]
        for n in senders:
            for peer in order:
                with tempfile.TemporaryDirectory(dir=ORTHANC_STORAGE_ROOT, prefix="radnode-ingest-") as tmp:
                    with receiver(peer, Path(tmp) / peer) as (port, aet, held):
                        cpu_before = time.process_time()
                        elapsed = send_files(port, aet, files, n)
                        cpu[n][peer].append(time.process_time() - cpu_before)
                        if (count := held()) != len(files):
                            raise RuntimeError(f"{peer} holds {count} of {len(files)} instances after the send")
                seconds[n][peer].append(elapsed)
    results: dict = {"instances": len(files), "megabytes": round(total_bytes / 1e6, 1), "repeats": repeats,
                     "senders": {}}
    for n in senders:
        rows = {}
        for peer in peers:
            best = summary(seconds[n][peer])
            rows[peer] = {"seconds": [round(s, 3) for s in seconds[n][peer]],
                          "instances_per_s": round(len(files) / best["median"], 1),
                          "mb_per_s": round(total_bytes / 1e6 / best["median"], 1)}
            if peer in IN_PROCESS:  # all the process's threads (radnode's scheduler and egress loops included)
                rows[peer]["cpu_ms_per_instance"] = round(1000 * summary(cpu[n][peer])["median"] / len(files), 2)
        reference = rows["radnode"]["instances_per_s"] if "radnode" in rows else None
        for peer, row in rows.items():
            row["radnode_ratio"] = round(reference / row["instances_per_s"], 2) if reference else None
        results["senders"][str(n)] = rows
        results.setdefault("like_for_like", {})[str(n)] = {
            kind: round(rows[ours]["instances_per_s"] / rows[theirs]["instances_per_s"], 2)
            for kind, (ours, theirs) in LIKE_FOR_LIKE.items() if ours in rows and theirs in rows}
        if "pynetdicom_minimal_log" in rows and "pynetdicom_minimal" in rows:
            results.setdefault("append_log_vs_minimal", {})[str(n)] = round(
                rows["pynetdicom_minimal_log"]["instances_per_s"] / rows["pynetdicom_minimal"]["instances_per_s"], 2)
        if n > 1 and "pynetdicom_minimal_fsync_processes" in rows and "orthanc" in rows:  # one sender: one process
            results.setdefault("ceiling_vs_orthanc", {})[str(n)] = round(
                rows["pynetdicom_minimal_fsync_processes"]["instances_per_s"] / rows["orthanc"]["instances_per_s"], 2)
    return results
