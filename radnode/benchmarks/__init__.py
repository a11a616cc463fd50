"""The benchmarks behind ``radnode bench``: each module measures one thing against its peers in the same run.

Shared here: sending with DCMTK storescu, phantom studies cached per size, and summary statistics.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from radnode.phantom import make_ct_phantom, write_ct_series

STORESCU = "/usr/bin/storescu"
"""DCMTK's sender (the venv has pynetdicom's command of the same name)."""
BENCH_API = {"host": "127.0.0.1", "port": 0}
"""The web service of every node a bench starts: on a free port, never the default one a running node holds."""


def send_files(port: int, called_ae: str, files: Sequence[Path], senders: int = 1) -> float:
    """Send ``files`` with ``senders`` concurrent storescu processes (one association each); wall seconds."""
    chunks = [list(files[i::senders]) for i in range(senders)]
    started = time.perf_counter()
    processes = [subprocess.Popen([STORESCU, "-aet", "BENCH", "-aec", called_ae, "127.0.0.1", str(port),
                                   *map(str, chunk)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for chunk in chunks if chunk]
    errors = [p.communicate()[1].decode(errors="replace") for p in processes]
    elapsed = time.perf_counter() - started
    if failed := [e for p, e in zip(processes, errors) if p.returncode != 0]:
        raise RuntimeError(f"storescu failed: {failed[0][-500:]}")
    return elapsed


class Studies:
    """Phantom CT series written once per slice count under ``root`` and reused by every benchmark."""

    def __init__(self, root: Path, size: int = 512) -> None:
        self.root, self.size = root, size
        self._written: dict[int, list[Path]] = {}

    def ct(self, n_slices: int) -> list[Path]:
        """The files of an ``n_slices`` phantom CT (16-bit, Explicit VR Little Endian, uncompressed)."""
        if n_slices not in self._written:
            folder = self.root / f"ct-{n_slices}x{self.size}"
            self._written[n_slices] = sorted(write_ct_series(make_ct_phantom(n_slices, self.size), folder))
        return self._written[n_slices]

    def pixel_bytes(self, n_slices: int) -> int:
        """Size of the series' pixel data (16 bits per voxel)."""
        return n_slices * self.size * self.size * 2


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median, best and worst of repeated measurements."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}
