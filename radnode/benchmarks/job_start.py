"""Job start: from the job queued (its study complete) to the job's process reading its first file, with the
warm job process (``processing.warm_start``, the default) and cold (a fresh interpreter per job), taking turns.

Each sample is one small CT study into a fresh node running the real job command; the warm node has its spare
ready (its line in ``jobs/warm/ct_tissue.log``) before the study is sent, as a node that has been up has. The
clocks: the job's ``queued`` event (node) and the start of the job's first phase, ``load``, from the run manifest
(job process), both wall time on this machine.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from radnode.benchmarks import BENCH_API, send_files, summary
from radnode.config import Config
from radnode.execution import RunManifest
from radnode.node.egress import outbox_dir
from radnode.node.service import Node
from radnode.node.store import JobState
from radnode.node.warm import READY, warm_log
from radnode.viewer import ORTHANC_STORAGE_ROOT

PIPELINE = "ct_tissue"


def _wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f} s")
        time.sleep(0.02)


def start_once(files: list[Path], work: Path, warm: bool, timeout: float = 600) -> dict:
    """One study through a fresh node: seconds from queued to the first file read, and to the process running."""
    config = Config.model_validate({"data_dir": str(work / "node"), "ingress": {"host": "127.0.0.1", "port": 0},
                                    "processing": {"warm_start": warm}, "api": BENCH_API})
    log = warm_log(config.data_dir, PIPELINE)
    with Node(config) as node:
        if warm:
            _wait(lambda: log.exists() and READY in log.read_text(), timeout, "no warm process got ready")
        send_files(node.port, config.ingress.ae_title, files)
        _wait(lambda: bool(node.jobs()) and node.jobs()[0].state in (JobState.DONE, JobState.FAILED), timeout,
              "the job did not finish")
        job = node.jobs()[0]
        if job.state is JobState.FAILED:
            raise RuntimeError(f"job failed: {job.reason}")
        at = {e.kind: e.at for e in node.events(job.id)}
        manifest = RunManifest.read(outbox_dir(node.config, job.id))
    first_read = next(iter(manifest.phases.values())).started_at
    return {"queued_to_first_read": first_read - at["queued"], "queued_to_running": at["running"] - at["queued"]}


def run(files: list[Path], repeats: int = 3) -> dict:
    """:func:`start_once` ``repeats`` times warm and cold, alternating; medians and warm ÷ cold."""
    samples: dict[str, list[dict]] = {"warm": [], "cold": []}
    for i in range(repeats):
        for mode in (("warm", "cold") if i % 2 == 0 else ("cold", "warm")):
            with tempfile.TemporaryDirectory(dir=ORTHANC_STORAGE_ROOT, prefix="radnode-start-") as tmp:
                samples[mode].append(start_once(files, Path(tmp), warm=mode == "warm"))
    results: dict = {"slices": len(files), "pipeline": PIPELINE, "repeats": repeats, "modes": {}}
    for mode, rows in samples.items():
        first = [r["queued_to_first_read"] for r in rows]
        results["modes"][mode] = {"queued_to_first_read_s": [round(s, 3) for s in first],
                                  **{k: round(v, 3) for k, v in summary(first).items()},
                                  "queued_to_running_median_s": round(summary(
                                      [r["queued_to_running"] for r in rows])["median"], 3)}
    results["warm_over_cold"] = round(results["modes"]["warm"]["median"] / results["modes"]["cold"]["median"], 3)
    return results
