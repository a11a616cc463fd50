"""One test process at a time for a step every process of the machine shares: fetching data into ``.cache``,
starting the local PostgreSQL. The suite runs in two pytest-xdist workers (``scripts/test.sh``), and each
checks "is it there yet?" itself; without the lock both would fetch, and one could read the other's half-written
file."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCKS = Path(__file__).resolve().parents[2] / ".cache" / "locks"


@contextmanager
def one_process_at_a_time(name: str) -> Iterator[None]:
    """Hold the machine-wide lock ``name`` (a file under ``.cache/locks``) for the block."""
    LOCKS.mkdir(parents=True, exist_ok=True)
    with open(LOCKS / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
