"""One test process at a time for a step the test processes share: fetching data into ``.cache``, starting the
local PostgreSQL. The suite runs in two pytest-xdist workers (``scripts/test.sh``), and each checks "is it there
yet?" itself; without the lock both would fetch, and one could read the other's half-written file. The locks are
the machine's (the temporary folder), not the checkout's: PostgreSQL is one server for every checkout."""

from __future__ import annotations

import fcntl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCKS = Path(tempfile.gettempdir()) / "radnode-test-locks"


@contextmanager
def one_process_at_a_time(name: str) -> Iterator[None]:
    """Hold the machine-wide lock ``name`` (a file under ``LOCKS``) for the block; closing the file releases it."""
    LOCKS.mkdir(parents=True, exist_ok=True)
    with open(LOCKS / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
