"""End to end: a phantom CT study in over DICOM → SEG + SR to a DCMTK storescp and the FHIR Bundle to a
FHIR server, per phase, with the job process's peak memory.

Phases come from three clocks: storescu's wall time (``receive``), the job's event log (``wait`` until the
job runs, ``send`` from the results staged until every delivery is done) and the run manifest the job
process writes (each operator's ``compute`` time and peak RSS, the process's peak RSS). ``job_other`` is the
rest of the job process's life: interpreter and imports (done ahead in a warm process), reading the outputs
back, reaping; ``job_start`` is from the job queued to its first phase reading the input.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from radnode.benchmarks import send_files
from radnode.config import Config
from radnode.execution import RunManifest
from radnode.node.egress import outbox_dir
from radnode.node.service import Node
from radnode.node.store import JobState
from radnode.peers import FhirServer, StoreSCP
from radnode.viewer import ORTHANC_STORAGE_ROOT


def _wait_finished(node: Node, timeout: float) -> int:
    """The job's id once it is done; raises with its last event if it failed or ran out of time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = node.jobs()
        if jobs and jobs[0].state in (JobState.DONE, JobState.FAILED):
            if jobs[0].state is JobState.FAILED:
                raise RuntimeError(f"job failed: {node.events(jobs[0].id)[-1].message}")
            return jobs[0].id
        time.sleep(0.05)
    raise TimeoutError(f"the job did not finish within {timeout:.0f} s")


def run_study(files: list[Path], pixel_bytes: int, work: Path, timeout: float = 1800) -> dict:
    """One study through a fresh node with real DICOM and FHIR destinations; seconds per phase."""
    with StoreSCP(work / "pacs", ae_title="PACS") as pacs, FhirServer(work / "fhir") as fhir:
        config = Config.model_validate({
            "data_dir": str(work / "node"), "ingress": {"host": "127.0.0.1", "port": 0},
            "egress": {"destinations": {"pacs": pacs.destination, "ehr": fhir.destination}}})
        with Node(config) as node:
            receive = send_files(node.port, config.ingress.ae_title, files)
            sent_at = time.time()
            job_id = _wait_finished(node, timeout)
            at = {e.kind: e.at for e in node.events(job_id)}
            manifest = RunManifest.read(outbox_dir(node.config, job_id))
            delivered = len(pacs.received())
    process_seconds = at["finished"] - at["running"]
    job_phases = {name: phase.seconds for name, phase in manifest.phases.items()}
    phases = {"receive": receive, "wait": at["running"] - sent_at, **job_phases,
              "job_other": process_seconds - sum(job_phases.values()), "send": at["done"] - at["finished"]}
    slowest = max((k for k in phases if k != "job_other"), key=phases.__getitem__)
    first_read = next(iter(manifest.phases.values())).started_at
    return {"slices": len(files), "phases": {k: round(v, 3) for k, v in phases.items()},
            "job_start_seconds": round(first_read - at["queued"], 3),
            "phase_peak_rss_mb": {name: round(phase.peak_rss_bytes / 1e6, 1)
                                  for name, phase in manifest.phases.items()},
            "phase_cpu_seconds": {name: round(phase.cpu_seconds, 3) for name, phase in manifest.phases.items()},
            "total_seconds": round(at["done"] - sent_at + receive, 3), "slowest_phase": slowest,
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
