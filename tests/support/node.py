"""Running the node in tests: its configuration, the stand-in job command, waiting for jobs, ``radnode serve``.

Jobs of the node tests run a stand-in job command (a real Python subprocess written by the test, see
``STAND_IN`` and the ``stand_in`` fixture) unless the test runs the real ``radnode run``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml

from factories import PATIENT_BUNDLE
from radnode.config import Config
from radnode.node.service import Node
from radnode.node.store import FINAL_STATES, Job, JobState, JobStore
from radnode.peers import FhirServer, StoreSCP, free_port
from radnode.security.privacy import IdentitySeal, SiteKey
from support.dicom_tools import ECHOSCU, STORESCU
from support.waiting import wait_until

STAND_IN = textwrap.dedent('''
    """Stand-in for `radnode run INPUT --output OUT --pipeline NAME`: one derived result per study."""
    import argparse, json, os, pathlib, sys, time
    import pydicom
    from pydicom.uid import generate_uid

    parser = argparse.ArgumentParser()
    parser.add_argument("input")
    parser.add_argument("--output", required=True)
    parser.add_argument("--pipeline")
    args = parser.parse_args()
    out = pathlib.Path(args.output)
    (out.parent / "pid").write_text(str(os.getpid()))
    images = [ds for ds in map(pydicom.dcmread, sorted(pathlib.Path(args.input).iterdir())) if "PixelData" in ds]
    if not images:
        print("loading the input", file=sys.stderr)
        print("no image series in the input", file=sys.stderr)
        sys.exit(3)
    time.sleep(float(os.environ.get("STAND_IN_SECONDS_" + str(images[0].PatientID), "0")))
    if gate := os.environ.get("STAND_IN_GATE_" + str(images[0].PatientID)):
        while not pathlib.Path(gate).exists():
            time.sleep(0.05)
    if failure := (os.environ.get("STAND_IN_FAIL_" + str(images[0].PatientID))
                   or os.environ.get("STAND_IN_FAIL_PIPELINE_" + str(args.pipeline))):
        print(failure, file=sys.stderr)
        sys.exit(3)
    result = images[0]
    result.SOPInstanceUID = result.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    result.SeriesInstanceUID, result.SeriesDescription = generate_uid(), "stand-in result"
    result.save_as(out / "result.dcm")
    (out / "fhir-bundle.json").write_text(json.dumps(PATIENT_BUNDLE))
    (out / "manifest.json").write_text(json.dumps({"inputs": len(images)}))
'''.replace("PATIENT_BUNDLE", repr(PATIENT_BUNDLE)))
"""The stand-in job command's script: copies the first image as its result, writes the bundle and a manifest.

``STAND_IN_SECONDS_<PatientID>`` makes it sleep first, ``STAND_IN_GATE_<PatientID>`` wait until that file
exists; a study without images fails with exit status 3, and so does one whose patient has
``STAND_IN_FAIL_<PatientID>`` set, or run as a pipeline with ``STAND_IN_FAIL_PIPELINE_<pipeline>`` set (its value
is the reason, as a pipeline refusing a bad study writes it).
"""


SEG_STAND_IN = textwrap.dedent('''
    """Stand-in for a segmentation pipeline with uncertainty: the phantom's structures as radnode's SEG.

    Run as `COMMAND INPUT --output OUT --pipeline NAME`. The segments are the phantom's true masks
    (factories.phantom_result) written by radnode's own SEG writer; each segment's boundary uncertainty is
    $SEG_STAND_IN_UNCERTAINTY_<StudyInstanceUID> (default 0.1), in the manifest as the uncertainty-scoring
    pipelines write it, and the study is flagged for review above 0.5.
    """
    import argparse, os, pathlib, sys
    sys.path.insert(0, TESTS)
    from factories import phantom_result
    from radnode.execution import OutputFile, ReviewDecision, RunManifest
    from radnode.imaging.series import VolumeCriteria, load_volume
    from radnode.outputs.algorithm import AlgorithmInfo
    from radnode.outputs.seg import build_segmentation

    parser = argparse.ArgumentParser()
    parser.add_argument("input")
    parser.add_argument("--output", required=True)
    parser.add_argument("--pipeline")
    args = parser.parse_args()
    out = pathlib.Path(args.output)
    volume, _ = load_volume(args.input, VolumeCriteria())
    seg = build_segmentation(volume, phantom_result(volume).segments, AlgorithmInfo("seg_stand_in", "2.0"),
                             uid_root="1.2.826.0.1.3680043.8.498.")
    seg.save_as(out / "seg.dcm")
    score = float(os.environ.get("SEG_STAND_IN_UNCERTAINTY_" + str(seg.StudyInstanceUID), "0.1"))
    measurements = [{"seg_sop_instance_uid": str(seg.SOPInstanceUID), "segment_number": int(item.SegmentNumber),
                     "concept": {"value": "UNC-BOUNDARY", "scheme_designator": "99RADNODE"}, "value": score}
                    for item in seg.SegmentSequence]
    review = ReviewDecision(needs_review=score > 0.5, reasons=[f"boundary uncertainty {score} > 0.5"] if score > 0.5
                            else [], exceeded=[], thresholds={"max_boundary": 0.5})
    RunManifest(pipeline=args.pipeline, version="2.0", input=args.input,
                outputs=[OutputFile("seg.dcm", "dicom", str(seg.SOPClassUID), str(seg.SOPInstanceUID),
                                    str(seg.SeriesInstanceUID), "SEG")],
                measurements=measurements, seconds=0.0, study_instance_uid=str(seg.StudyInstanceUID),
                review=review).write(out)
'''.replace("TESTS", repr(str(Path(__file__).resolve().parents[1]))))
"""A job command writing a real radnode SEG of the phantom's structures with a chosen uncertainty per study."""


def node_config(tmp_path: Path, port: int = 0, **sections: dict) -> Config:
    """Small idle and retry times so each test takes seconds."""
    data: dict = {"data_dir": str(tmp_path / "data"),
                  "ingress": {"host": "127.0.0.1", "port": port, "study_idle_seconds": 0.5,
                              "study_quiet_seconds": 0.2},
                  "egress": {"retry_initial_seconds": 0.2, "retry_max_seconds": 0.5, "max_attempts": 50,
                             "timeouts": {"connect_seconds": 5, "acse_seconds": 5, "dimse_seconds": 5,
                                          "network_seconds": 5}},
                  "processing": {"job_timeout_seconds": 60},
                  "api": {"port": 0},
                  "feedback": {"preload_metrics": False}}  # only the feedback tests' nodes need them
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return Config.model_validate(data)


def final_job(node: Node, job_id: int, timeout: float = 30) -> Job:
    """Wait until the job is done or failed, and return it."""
    wait_until(lambda: node.job(job_id).state in (JobState.DONE, JobState.FAILED), timeout)  # type: ignore[union-attr]
    job = node.job(job_id)
    assert job is not None
    return job


def jobs_by_patient(node: Node, expected: int) -> dict[str, Job]:
    """Wait until the node has ``expected`` jobs, and return them by Patient ID."""
    wait_until(lambda: len(node.jobs()) == expected)
    return {job.patient_id: job for job in node.jobs()}


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (a job's process must not outlive its node)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def patients(fhir: FhirServer) -> int:
    """How many Patient resources the FHIR server holds: one per delivery of ``PATIENT_BUNDLE``."""
    return int(fhir.search("Patient", "_summary=count")["total"])


class ServeProcess:
    """``radnode serve`` started as a user would, with a config file; stopped with SIGTERM."""

    def __init__(self, data_dir: Path, pacs: StoreSCP, fhir: FhirServer, idle: float = 2.0,
                 rules: Path | None = None, late_instances: str = "ignore", settings: dict | None = None,
                 fhir_url: str | None = None) -> None:
        """``rules``: the routing rule file (unset: the shipped rules, the node's default); ``settings``:
        further sections of the configuration file (e.g. ``containers``); ``fhir_url``: where the node sends
        its Bundles when not straight to ``fhir`` (e.g. a slow proxy in front of it). A node started again on
        the same ``data_dir`` appends to its log."""
        self.data_dir, self.port, self.api_port = data_dir, free_port(), free_port()
        config = data_dir.parent / f"{data_dir.name}.yaml"
        config.write_text(yaml.safe_dump({"ingress": {"host": "127.0.0.1", "study_idle_seconds": idle,
                                                      "late_instances": late_instances},
                                          "api": {"port": self.api_port},  # never the fixed default 8765
                                          "processing": {"max_concurrent_jobs": 2, "job_timeout_seconds": 300},
                                          "feedback": {"preload_metrics": False},
                                          **({"rules": str(rules)} if rules else {}), **(settings or {})}))
        self.log = (data_dir.parent / f"{data_dir.name}.log").open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "radnode", "-v", "serve", "--config", str(config), "--port", str(self.port),
             "--data-dir", str(data_dir), "--destination", pacs.address, "--fhir-url", fhir_url or fhir.base_url],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "HOLOSCAN_LOG_LEVEL": "WARN"})
        deadline = time.monotonic() + 60
        while subprocess.run([ECHOSCU, "-aec", "RADNODE", "127.0.0.1", str(self.port)],
                             capture_output=True).returncode != 0:
            assert self.process.poll() is None, "radnode serve exited at start"
            assert time.monotonic() < deadline, "radnode serve did not answer C-ECHO"
            time.sleep(0.3)

    def send(self, *paths: Path, calling_ae: str = "CT_SCANNER", options: tuple[str, ...] = ("-xv",)) -> None:
        """Send files with DCMTK storescu. The default ``-xv`` proposes JPEG 2000 lossless, as the real series is
        stored (sent as it is, never transcoded); ``-R`` proposes the files' own SOP classes and transfer syntaxes
        (results: SEG is not in storescu's default list)."""
        result = subprocess.run([STORESCU, *options, "-aet", calling_ae, "-aec", "RADNODE",
                                 "127.0.0.1", str(self.port), *map(str, paths)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr

    def jobs_when_final(self, expected: int, timeout: float = 420, own_results: int = 0) -> list:
        """Every job with its events once ``expected`` jobs are final (holding ``own_results`` instances of
        the node's own results)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.data_dir / "radnode.db").exists():
                store = JobStore(self.data_dir / "radnode.db", seal=IdentitySeal(SiteKey.load(None, self.data_dir)))
                try:
                    jobs = store.jobs()
                    if (len(jobs) >= expected and all(j.state in FINAL_STATES for j in jobs)
                            and sum(j.own_results for j in jobs) >= own_results):
                        return [(j, store.events(j.id)) for j in jobs]
                finally:
                    store.close()
            assert self.process.poll() is None, "radnode serve died"
            time.sleep(0.5)
        raise AssertionError(f"jobs not final within {timeout} s")

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a power cut ends the node: no shutdown code runs."""
        self.process.kill()
        self.process.wait(timeout=60)
        self.log.close()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()
