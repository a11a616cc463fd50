"""Trigger latency: last instance received → pipeline started, for each ingress path and a fixed-timeout baseline.

    .venv/bin/python bench/trigger_latency.py [--repeats 5] [--slices 20]

Each run sends one phantom CT study in one association with DCMTK storescu and measures from the end of
storescu (the last instance was acknowledged then) to the job's ``running`` event. Paths:

* ``scp``            the node's own SCP: association released + ``association_grace_seconds`` (0.5 s)
* ``scp-fixed``      the same SCP with the release trigger off: the fixed idle timeout (``study_idle_seconds``, 3 s)
* ``orthanc``        Orthanc with the radnode plugin (StableAge 1 s): per-instance events, then stable-study
The job command is ``/bin/true``: only the trigger is measured.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from radnode.config import Config
from radnode.node.service import Node
from radnode.node.store import JobState
from radnode.orthanc_config import write_event_token
from radnode.phantom import make_ct_phantom, write_ct_series
from radnode.peers import free_port
from radnode.viewer import OrthancServer

STORESCU = "/usr/bin/storescu"
JOB_COMMAND = ["/bin/true"]


def send(port: int, folder: Path, called_ae: str) -> float:
    """Send a folder in one association; the time storescu ended."""
    subprocess.run([STORESCU, "-aet", "BENCH", "-aec", called_ae, "+sd", "127.0.0.1", str(port), str(folder)],
                   check=True, capture_output=True)
    return time.time()


def wait_running(node: Node, timeout: float = 60) -> float:
    """When the (only) job started running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job in node.jobs():
            if job.state is not JobState.RECEIVED and job.state is not JobState.QUEUED:
                return next(e.at for e in node.events(job.id) if e.kind == "running")
        time.sleep(0.01)
    raise TimeoutError("the job did not start")


def run_once(mode: str, study: Path, work: Path) -> float:
    ingress: dict = {"host": "127.0.0.1", "port": 0, "study_idle_seconds": 3.0}
    if mode == "scp-fixed":
        ingress["association_grace_seconds"] = 1e6
    data = {"data_dir": str(work / "data"), "ingress": ingress}
    if mode == "orthanc":
        api_port = free_port()
        token = work / "event-token"  # the plugin's events are refused without the node's token
        token.parent.mkdir(parents=True, exist_ok=True)
        write_event_token(token)
        with OrthancServer(node_url=f"http://127.0.0.1:{api_port}", stable_age=1, event_token_file=token) as orthanc:
            config = Config.model_validate({**data, "orthanc": {"url": orthanc.url, "results_to_orthanc": False,
                                                                "event_token_file": str(token)},
                                            "api": {"port": api_port}})
            with Node(config, job_command=JOB_COMMAND, poll_seconds=0.02) as node:
                sent = send(orthanc.dicom_port, study, orthanc.aet)
                return wait_running(node) - sent
    with Node(Config.model_validate({**data, "api": {"port": 0}}), job_command=JOB_COMMAND,
              poll_seconds=0.02) as node:
        sent = send(node.port, study, "RADNODE")
        return wait_running(node) - sent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--modes", nargs="+", default=["scp", "scp-fixed", "orthanc"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="radnode-bench-") as tmp:
        root = Path(tmp)
        print(f"{'path':10} {'median s':>9} {'min s':>7} {'max s':>7}   ({args.repeats} runs, {args.slices}-slice CT, "
              "one association)")
        for mode in args.modes:
            latencies = []
            for i in range(args.repeats):
                study = root / f"{mode}-{i}" / "ct"
                write_ct_series(make_ct_phantom(n_slices=args.slices, size=128), study)
                latencies.append(run_once(mode, study, root / f"{mode}-{i}"))
            print(f"{mode:10} {statistics.median(latencies):9.2f} {min(latencies):7.2f} {max(latencies):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
