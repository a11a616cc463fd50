"""End to end: a phantom CT study in over DICOM → SEG + SR to a DCMTK storescp and the FHIR Bundle to a
FHIR server, each phase's wall time and CPU time, with the job process's peak memory and the machine's load.

The figure the target is about is **last instance → results delivered** (``total_seconds``): from storescu
returning (its last C-STORE answered, the association released) to the last delivery recorded done. Before it,
``receive`` (storescu's wall time) is printed beside it, and ``study_in_to_delivered_seconds`` is both.

The node runs with its default configuration, as a site does that sets nothing: the study-completeness quiet
time (``ingress.study_quiet_seconds``) and the series grace after release are the defaults and are printed with
the figure; the bench never shortens them. The study is sent once the node is settled, as on a node that has been up:
its warm spare ready and its start-up work done (the feedback thread's preload of MONAI's metrics takes
several CPU-seconds once per start, which would otherwise land on the first study).

Phases, and whose clock each comes from:

* ``receive``: storescu's wall time; CPU: the node's process (this one) plus storescu's.
* ``completeness_wait``: the node's last instance received → job queued (node clock: the quiet time starts at the
  release, after the last instance, so it is never shorter than the quiet time; storescu's exit comes later).
* ``pick_up``: queued → running (the scheduler's tick, preparing ``in/``, handing the job to the spare).
* ``job_start``: running → the job's first phase began (the warm process reading its job, composing the app).
* each operator phase from the run manifest (``load`` … ``write_report_fhir``): wall and CPU of the job process
  (``write_seg``: of the child process encoding the SEG's frames beside ``write_sr`` and ``write_report_fhir``).
* ``job_end``: the last phase ended → the job recorded finished (outputs described, manifest written, the
  process exiting and reaped).
* ``send``: finished → the last delivery done (C-STORE to the PACS and the FHIR POST); CPU: the node's.

CPU seconds per phase are the process's over all its threads (beside the wall time: how many cores it kept
busy). ``cpu_seconds_total`` is everything the node, its job process, its spare and the destinations' servers
used from the last instance to the delivery, measured from /proc: on a loaded machine the wall times stretch,
the CPU seconds do not.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path

from radnode.benchmarks import BENCH_API, send_files
from radnode.config import Config
from radnode.execution import RunManifest
from radnode.node.egress import outbox_dir
from radnode.node.service import Node
from radnode.node.store import Job, JobState
from radnode.node.warm import READY, warm_log
from radnode.peers import FhirServer, StoreSCP
from radnode.viewer import ORTHANC_STORAGE_ROOT

PIPELINE = "ct_tissue"
LOADED = 0.5
"""Load average per core above which the machine counts as loaded: the run then also prints a quiet machine's
estimate (the job's phases taking their CPU seconds, :func:`_serial_cpu`; the rest as measured)."""
_TICKS = os.sysconf("SC_CLK_TCK")


def _wait_finished(node: Node, timeout: float) -> Job:
    """The job once it is done; raises with its last event if it failed or ran out of time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = node.jobs()
        if jobs and jobs[0].state in (JobState.DONE, JobState.FAILED):
            if jobs[0].state is JobState.FAILED:
                raise RuntimeError(f"job failed: {node.events(jobs[0].id)[-1].message}")
            return jobs[0]
        time.sleep(0.1)  # the figures come from the job's event times, not from this poll
    raise TimeoutError(f"the job did not finish within {timeout:.0f} s")


def _wait_ready(log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not (log.exists() and READY in log.read_text()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no warm {PIPELINE} process got ready within {timeout:.0f} s")
        time.sleep(0.05)


def _wait_settled(timeout: float, quiet_cpu: float = 0.15) -> float:
    """Wait until the node's process has finished its start-up work (the feedback thread's preload of highdicom
    and MONAI, ``feedback.preload_metrics``: several CPU-seconds once per node start) and idles, using under
    ``quiet_cpu`` CPU-seconds a second: a node that has been up. Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = _own_cpu()
        time.sleep(1.0)
        if _own_cpu() - before < quiet_cpu:
            break
    return time.monotonic() - started


def _descendants(pid: int) -> list[int]:
    """Living descendants of ``pid`` (from /proc's children lists)."""
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                stack.append(child)
    return found


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of a living process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


class TreeCpu:
    """CPU seconds used by this process and every process under it, living or reaped: what the node, its job
    processes and the destinations' servers cost, whatever else the machine runs. (A grandchild that exits
    between two readings loses what it used since the first: the node reaps its own children.)"""

    def __call__(self) -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        living = sum(_process_cpu(pid) for pid in _descendants(os.getpid()))
        return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime + living


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _serial_cpu(phases: dict) -> float:
    """The job's phases as one core would run them, each taking its CPU seconds, a phase in a child process
    running beside the phases after it (the longer of the two counts)."""
    total, beside = 0.0, None
    for phase in phases.values():
        if phase.in_child:
            beside = [phase.cpu_seconds, 0.0]
        elif beside is not None:
            beside[1] += phase.cpu_seconds
        else:
            total += phase.cpu_seconds
    return total + (max(beside) if beside else 0.0)


def run_study(files: list[Path], pixel_bytes: int, work: Path, timeout: float = 1800) -> dict:
    """One study through a fresh node with real DICOM and FHIR destinations; wall and CPU seconds per phase."""
    with StoreSCP(work / "pacs", ae_title="PACS") as pacs, FhirServer(work / "fhir") as fhir:
        config = Config.model_validate({
            "data_dir": str(work / "node"), "ingress": {"host": "127.0.0.1", "port": 0},
            "egress": {"destinations": {"pacs": pacs.destination, "ehr": fhir.destination}}, "api": BENCH_API})
        with Node(config) as node:
            _wait_ready(warm_log(config.data_dir, PIPELINE), timeout)
            settled = _wait_settled(timeout)
            load_before = os.getloadavg()
            tree = TreeCpu()
            node_cpu = [_own_cpu()]
            receive_children = resource.getrusage(resource.RUSAGE_CHILDREN)
            receive = send_files(node.port, config.ingress.ae_title, files)
            sent_at = time.time()
            after_receive = resource.getrusage(resource.RUSAGE_CHILDREN)
            node_cpu.append(_own_cpu())
            tree_at_last_instance = tree()
            job = _wait_finished(node, timeout)
            job_id = job.id
            tree_at_done = tree()
            node_cpu.append(_own_cpu())
            load_after = os.getloadavg()
            events = node.events(job_id)
            at = {e.kind: e.at for e in events}
            delivered_at = max((e.at for e in events if e.kind == "delivered"), default=at["done"])
            manifest = RunManifest.read(outbox_dir(node.config, job_id))
            delivered = len(pacs.received())
    storescu_cpu = (after_receive.ru_utime + after_receive.ru_stime
                    - receive_children.ru_utime - receive_children.ru_stime)
    job_phases = manifest.phases
    first = next(iter(job_phases.values()))
    last_end = max(p.started_at + p.seconds for p in job_phases.values())
    phases: dict[str, dict] = {
        "receive": {"wall": receive, "cpu": node_cpu[1] - node_cpu[0] + storescu_cpu, "where": "node + storescu"},
        "completeness_wait": {"wall": at["queued"] - job.last_instance_at, "where": "node"},
        "pick_up": {"wall": at["running"] - at["queued"], "where": "node"},
        "job_start": {"wall": first.started_at - at["running"], "where": "job"},
        **{name: {"wall": p.seconds, "cpu": p.cpu_seconds,
                  "where": "job, child process beside the next phases" if p.in_child else "job"}
           for name, p in job_phases.items()},
        "job_end": {"wall": at["finished"] - last_end, "where": "job + node"},
        "send": {"wall": delivered_at - at["finished"], "where": "node"},
    }
    total = delivered_at - sent_at
    slowest = max((k for k in phases if k != "receive"), key=lambda k: phases[k]["wall"])
    ingress = config.ingress
    job_cpu = sum(p.cpu_seconds for p in job_phases.values())
    waits = phases["completeness_wait"]["wall"]
    return {"slices": len(files),
            "phases": {k: {f: (round(v, 3) if isinstance(v, float) else v) for f, v in row.items()}
                       for k, row in phases.items()},
            "job_start_seconds": round(first.started_at - at["queued"], 3),
            "phase_peak_rss_mb": {name: round(phase.peak_rss_bytes / 1e6, 1) for name, phase in job_phases.items()},
            "phase_cpu_seconds": {name: round(phase.cpu_seconds, 3) for name, phase in job_phases.items()},
            "total_seconds": round(total, 3),
            "study_in_to_delivered_seconds": round(total + receive, 3),
            "cpu_seconds_total": round(tree_at_done - tree_at_last_instance, 3),
            "cpu_seconds_node": round(node_cpu[2] - node_cpu[1], 3),
            "job_phase_cpu_seconds": round(job_cpu, 3),
            "quiet_machine_estimate_seconds": round(total - (last_end - first.started_at) + _serial_cpu(job_phases), 3)
            if load_before[0] > LOADED * (os.cpu_count() or 1) else None,
            "completeness": {"study_quiet_seconds": ingress.study_quiet_seconds,
                             "series_grace_seconds": ingress.association_grace_seconds,
                             "study_idle_seconds": ingress.study_idle_seconds, "defaults": True,
                             "waited_seconds": round(waits, 3)},
            "node_settled_after_seconds": round(settled, 1),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
            "slowest_phase": slowest,
            "peak_rss_mb": round(manifest.peak_rss_bytes / 1e6, 1), "pixel_mb": round(pixel_bytes / 1e6, 1),
            "peak_rss_over_pixel_data": round(manifest.peak_rss_bytes / pixel_bytes, 2),
            "dicom_delivered": delivered}


def run(studies: dict[int, tuple[list[Path], int]]) -> dict:
    """:func:`run_study` for each slice count (``{slices: (files, pixel bytes)}``)."""
    results = {}
    for slices, (files, pixel_bytes) in studies.items():
        with tempfile.TemporaryDirectory(dir=ORTHANC_STORAGE_ROOT, prefix="radnode-e2e-") as tmp:
            results[str(slices)] = run_study(files, pixel_bytes, Path(tmp))
    return results
