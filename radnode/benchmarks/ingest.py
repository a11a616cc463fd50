"""Ingest: one CT study sent by DCMTK storescu over loopback to radnode's SCP and to the receivers
hospitals use today, with 1 and with N concurrent senders (the study's files split between them).

Every receiver starts fresh (empty storage) for every send, the peers take turns within each round (the
order rotates between rounds) and each send is checked: the receiver must hold every instance afterwards.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event

from radnode.benchmarks import send_files, summary
from radnode.config import Config
from radnode.node.service import Node
from radnode.peers import StoreSCP
from radnode.viewer import ORTHANC_STORAGE_ROOT, OrthancServer

PEERS = ("radnode", "radnode_no_fsync", "pynetdicom_minimal", "dcmtk_storescp", "orthanc")
"""``radnode``: the node as shipped (fsync per instance, SQLite index, completeness); ``radnode_no_fsync``:
the same with ``ingress.sync_spool: false``; ``pynetdicom_minimal``: a pynetdicom SCP that only writes the bytes."""

Receiver = tuple[int, str, Callable[[], int]]
"""(DICOM port, called AE title, how many instances the receiver holds now)."""


@contextlib.contextmanager
def minimal_scp(folder: Path) -> Iterator[Receiver]:
    """A pynetdicom Storage SCP that writes each received instance's bytes to a file, nothing else.

    Same PDU setting as radnode's SCP (unlimited), so the two differ only in what they do per instance.
    """
    folder.mkdir(parents=True, exist_ok=True)

    def on_store(event: Event) -> int:
        target = folder / f"{event.request.AffectedSOPInstanceUID}.dcm"
        try:  # pynetdicom received it into a file (radnode's SCP turns that on for the process)
            shutil.copyfile(event.dataset_path, target)
            return 0x0000
        except AttributeError:
            pass
        with open(target, "wb") as f:
            f.write(b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta))
            f.write(event.request.DataSet.getbuffer())
        return 0x0000

    ae = AE(ae_title="MINIMAL")
    ae.maximum_pdu_size = 0
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield server.server_address[1], "MINIMAL", lambda: sum(1 for _ in folder.glob("*.dcm"))
    finally:
        server.shutdown()
        ae.shutdown()


@contextlib.contextmanager
def radnode_scp(folder: Path, sync_spool: bool) -> Iterator[Receiver]:
    """The node with its full bookkeeping; jobs run ``/bin/true`` so no pipeline competes for the CPU."""
    config = Config.model_validate({"data_dir": str(folder),
                                    "ingress": {"host": "127.0.0.1", "port": 0, "sync_spool": sync_spool}})
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
            "radnode_no_fsync": lambda: radnode_scp(folder, sync_spool=False),
            "pynetdicom_minimal": lambda: minimal_scp(folder),
            "dcmtk_storescp": lambda: dcmtk_storescp(folder),
            "orthanc": lambda: orthanc(folder)}[peer]()


def run(files: list[Path], senders: tuple[int, ...] = (1, 8), repeats: int = 3,
        peers: tuple[str, ...] = PEERS) -> dict:
    """Instances/s and MB/s per peer and sender count (median of ``repeats``), and radnode's ratios."""
    total_bytes = sum(f.stat().st_size for f in files)
    seconds: dict[int, dict[str, list[float]]] = {n: {p: [] for p in peers} for n in senders}
    for round_ in range(repeats):
        order = peers[round_ % len(peers):] + peers[:round_ % len(peers)]
        for n in senders:
            for peer in order:
                with tempfile.TemporaryDirectory(dir=ORTHANC_STORAGE_ROOT, prefix="radnode-ingest-") as tmp:
                    with receiver(peer, Path(tmp) / peer) as (port, aet, held):
                        elapsed = send_files(port, aet, files, n)
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
        reference = rows["radnode"]["instances_per_s"] if "radnode" in rows else None
        for peer, row in rows.items():
            row["radnode_ratio"] = round(reference / row["instances_per_s"], 2) if reference else None
        results["senders"][str(n)] = rows
    return results
