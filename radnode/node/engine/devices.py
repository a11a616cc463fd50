"""The GPUs of a worker host, and the workers as ``radnode workers`` and ``GET /api/workers`` show them."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from radnode.node.store import WorkerInfo


def visible_gpus() -> list[str]:
    """Indices of the GPUs ``nvidia-smi -L`` lists (none without the tool or a GPU: the worker uses the CPU)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(line for line in listing.splitlines() if line.startswith("GPU "))]


def worker_state(worker: WorkerInfo, lease_seconds: float, now: float | None = None) -> str:
    """``stopped``; ``lost`` once its heartbeat is older than a lease; else ``busy`` or ``idle``."""
    now = time.time() if now is None else now
    if worker.stopped_at is not None:
        return "stopped"
    if now - worker.heartbeat_at > lease_seconds:
        return "lost"
    return "busy" if worker.current_job is not None else "idle"


def worker_record(worker: WorkerInfo, lease_seconds: float) -> dict[str, Any]:
    """One worker as JSON (the API)."""
    return {"name": worker.name, "host": worker.host, "queues": list(worker.queues), "gpus": worker.gpus,
            "pid": worker.pid, "state": worker_state(worker, lease_seconds), "current_job": worker.current_job,
            "last_heartbeat": worker.heartbeat_at, "started_at": worker.started_at}


def workers_table(workers: Sequence[WorkerInfo], lease_seconds: float) -> str:
    """The workers as a text table, one line each."""
    if not workers:
        return "no workers have reported (start one with: radnode worker --config FILE)"
    now = time.time()
    rows = [("WORKER", "HOST", "QUEUES", "GPUS", "STATE", "JOB", "LAST HEARTBEAT")]
    rows += [(w.name, w.host, ",".join(w.queues), w.gpus, worker_state(w, lease_seconds, now),
              str(w.current_job) if w.current_job is not None else "-", f"{now - w.heartbeat_at:.0f} s ago")
             for w in workers]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
