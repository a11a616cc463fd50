"""Soak: many studies through one node for a bounded time, with random faults; counts what went wrong.

    .venv/bin/python bench/soak.py [--studies 200] [--minutes 30] [--seed 1]

Studies (small CT series from ``radnode.imaging.synthetic``) are sent by DCMTK storescu at random moments over
the run, some in two associations with a random pause (0.5 to 12 s) between them. Faults, at random: the PACS
(DCMTK storescp) stopped for 5 to 20 s, a running job's process SIGKILLed (retried by the node). The job command
is a small script copying one input image as the study's result and counting its input, so the run measures the
node's machinery (ingress, completeness, scheduling, retries, supersession, egress), not a pipeline.

At the end (after a drain of up to two minutes) it prints:

* **lost**: studies with no job done for them;
* **duplicated**: SOP Instance UIDs the PACS received more than once, and studies with more than one result
  not withdrawn by a rejection note;
* **stuck**: jobs not final;
* **wrong**: studies whose last result was computed on fewer instances than were sent;
* the node's resident memory (VmRSS) sampled every 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

from radnode.config import Config
from radnode.imaging.series import CT_IMAGE_STORAGE
from radnode.imaging.synthetic import SeriesIdentity, write_image_series
from radnode.node.service import Node
from radnode.node.store import FINAL_STATES, JobState
from radnode.peers import StoreSCP, free_port

JOB = textwrap.dedent('''
    import json, os, pathlib, sys, time
    import pydicom
    from pydicom.uid import generate_uid
    inputs, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[3])
    (out.parent / "pid").write_text(str(os.getpid()))
    images = [pydicom.dcmread(p) for p in sorted(inputs.iterdir())]
    time.sleep(1.0)
    result = images[0]
    result.SOPInstanceUID = result.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    result.SeriesInstanceUID, result.Modality = generate_uid(), "OT"
    result.Manufacturer, result.ImageComments = "soak", json.dumps({"inputs": len(images)})
    result.save_as(out / "result.dcm")
''')
"""The soak's job: one derived object per study whose ImageComments say how many instances it was made from."""


def write_study(folder: Path, n: int) -> list[Path]:
    """An ``n``-slice 16×16 CT series of a new study."""
    pixels = np.stack([(np.arange(256, dtype=np.int16) * k).reshape(16, 16) for k in range(1, n + 1)])
    positions = np.array([[0.0, 0.0, 2.5 * k] for k in range(1, n + 1)])
    identity = SeriesIdentity(patient_id=folder.name, patient_name="Soak^Patient", accession="", study_uid=generate_uid(),
                              series_uid=generate_uid(), frame_of_reference_uid=generate_uid(),
                              study_description="soak", series_description="axial", series_number=1, body_part="",
                              model_name="Soak CT")
    return write_image_series(pixels, positions, (1, 0, 0, 0, 1, 0), (1.0, 1.0), folder, sop_class_uid=CT_IMAGE_STORAGE,
                              modality="CT", image_type=["ORIGINAL", "PRIMARY", "AXIAL"], identity=identity,
                              modality_attributes={"SliceThickness": 2.5, "RescaleIntercept": 0, "RescaleSlope": 1},
                              uid_root=PYDICOM_ROOT_UID, file_name=lambda _, uid: f"{uid}.dcm")


def storescu(port: int, files: list[Path]) -> None:
    """Send with DCMTK storescu, retrying a refused association as a modality does."""
    for _ in range(10):
        if subprocess.run(["/usr/bin/storescu", "-aet", "SOAK", "-aec", "RADNODE", "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True).returncode == 0:
            return
        time.sleep(1)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="radnode-soak-"))
    (work / "job.py").write_text(JOB)
    pacs_port = free_port()
    rules = work / "rules.yaml"
    rules.write_text("rules:\n  - name: ct\n    when: {Modality: CT}\n    pipelines: [ct_tissue]\n")
    config = Config.model_validate({
        "data_dir": str(work / "data"), "rules": str(rules),
        "ingress": {"host": "127.0.0.1", "port": 0, "study_idle_seconds": 2, "study_quiet_seconds": 1},
        "egress": {"destinations": {"pacs": f"PACS@127.0.0.1:{pacs_port}"}, "retry_initial_seconds": 1,
                   "retry_max_seconds": 5, "max_attempts": 1000},
        "processing": {"max_concurrent_jobs": 2, "job_timeout_seconds": 120}})
    command = [sys.executable, str(work / "job.py")]
    sent: dict[str, int] = {}
    memory: list[tuple[float, float]] = []
    pacs_holder: dict[str, StoreSCP] = {}
    pacs_lock = threading.Lock()
    start = time.monotonic()
    duration = args.minutes * 60
    pacs_holder["pacs"] = StoreSCP(work / "pacs", port=pacs_port).__enter__()
    received: list[Path] = []
    with Node(config, job_command=command, poll_seconds=0.1) as node:
        def send_one(k: int) -> None:
            files = write_study(work / "studies" / f"S{k:04d}", rng.randint(4, 12))
            sent[str(pydicom.dcmread(files[0]).StudyInstanceUID)] = len(files)
            if rng.random() < 0.3:
                cut = rng.randint(1, len(files) - 1)
                storescu(node.port, files[:cut])
                time.sleep(rng.uniform(0.5, 12))
                storescu(node.port, files[cut:])
            else:
                storescu(node.port, files)

        def faults() -> None:
            while time.monotonic() - start < duration:
                time.sleep(rng.uniform(20, 60))
                if rng.random() < 0.5:
                    with pacs_lock:
                        pacs = pacs_holder.pop("pacs")
                        received.extend(pacs.received())
                        pacs.__exit__(None, None, None)
                    time.sleep(rng.uniform(5, 20))
                    with pacs_lock:
                        pacs_holder["pacs"] = StoreSCP(work / f"pacs-{time.monotonic():.0f}", port=pacs_port).__enter__()
                else:
                    for job in node.jobs(JobState.RUNNING)[:1]:
                        pid = config.data_dir.resolve() / "jobs" / str(job.id) / "pid"
                        try:
                            os.kill(int(pid.read_text()), signal.SIGKILL)
                        except (OSError, ValueError):
                            pass

        def sample() -> None:
            while time.monotonic() - start < duration + 120:
                memory.append((time.monotonic() - start, rss_mb()))
                time.sleep(10)

        threads = [threading.Thread(target=faults, daemon=True), threading.Thread(target=sample, daemon=True)]
        for thread in threads:
            thread.start()
        senders = []
        for k in range(args.studies):
            at = start + duration * k / args.studies
            time.sleep(max(0.0, at - time.monotonic()))
            sender = threading.Thread(target=send_one, args=(k,))
            sender.start()
            senders.append(sender)
        for sender in senders:
            sender.join()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(j.state in FINAL_STATES for j in node.jobs()):
            time.sleep(1)
        jobs = node.jobs()
        stuck = [j.id for j in jobs if j.state not in FINAL_STATES]
        deliveries = {j.id: node.deliveries(j.id) for j in jobs}
    with pacs_lock:
        pacs = pacs_holder.pop("pacs")
        received.extend(pacs.received())
        pacs.__exit__(None, None, None)
    datasets = [pydicom.dcmread(p) for p in received]
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    repeated = sorted({u for u in uids if uids.count(u) > 1})
    rejected = {str(i.ReferencedSOPInstanceUID) for ds in datasets if ds.Modality == "KO"
                for s in ds.CurrentRequestedProcedureEvidenceSequence for r in s.ReferencedSeriesSequence
                for i in r.ReferencedSOPSequence}
    lost, wrong, doubled = [], [], []
    for study, count in sent.items():
        done = [j for j in jobs if j.study_instance_uid == study and j.state is JobState.DONE]
        if not done:
            lost.append(study)
            continue
        results = [ds for ds in datasets if ds.StudyInstanceUID == study and ds.Modality == "OT"]
        current = [ds for ds in results if str(ds.SOPInstanceUID) not in rejected]
        if len({str(ds.SOPInstanceUID) for ds in current}) > 1:
            doubled.append(study)
        latest = max(done, key=lambda j: j.id)
        made_from = [json.loads(ds.ImageComments)["inputs"] for ds in results
                     if str(ds.SOPInstanceUID) in {d.sent_uid for d in deliveries[latest.id]}]
        if made_from != [count]:
            wrong.append(study)
    print(f"soak: {len(sent)} studies over {args.minutes:g} min (seed {args.seed}); {len(jobs)} jobs; "
          f"{len(received)} objects at the PACS")
    print(f"lost {len(lost)}, duplicated {len(repeated)} objects + {len(doubled)} studies with two live results, "
          f"stuck {len(stuck)}, wrong {len(wrong)}")
    print("memory (s, MB): " + ", ".join(f"{t:.0f}:{m:.0f}" for t, m in memory))
    return 0 if not (lost or repeated or doubled or stuck or wrong) else 1


if __name__ == "__main__":
    sys.exit(main())
