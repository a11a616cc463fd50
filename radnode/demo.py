"""``radnode demo``: the main job end to end on the embedded default, with nothing set up beforehand.

A phantom CT study (512×512, ≥200 slices) goes over a real DICOM association to a running node; the
node runs the ct_tissue MONAI Deploy app in a job process and delivers the SEG and SR to a PACS (DCMTK
storescp) and the FHIR Bundle to an EHR (a sekmet FHIR R4 server), all on loopback. The demo then shows
where every output went, the measurements, and how well the SEG matches the phantom's truth. With
``viewer``, the study and what the PACS received go into a private Orthanc and OHIF shows them
(:func:`radnode.viewer.serve_study`) until Ctrl-C.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from radnode.config import Config, EgressConfig, IngressConfig
from radnode.execution import RunManifest
from radnode.node.egress import outbox_dir
from radnode.node.service import Node
from radnode.node.store import FINAL_STATES, JobState
from radnode.peers import FhirServer, StoreSCP, free_port
from radnode.phantom import make_ct_phantom, write_ct_series
from radnode.viewer import ServedStudy, ViewerUnavailableError, check_viewer_installed, serve_study

MARKER = ".radnode-demo"


def _step(n: int, text: str, total: int = 6) -> None:
    print(f"[{n}/{total}] {text}", flush=True)


def until_interrupted(served: ServedStudy) -> None:
    """Keep the viewer up until Ctrl-C (or SIGTERM), so that Orthanc is stopped and its storage removed."""
    print("      Ctrl-C stops the viewer", flush=True)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("      stopping the viewer", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fresh_workdir(workdir: Path) -> Path:
    """Empty the demo folder from a previous demo; never touch a folder the demo did not make."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise RuntimeError(f"{workdir} exists and was not made by radnode demo; choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).touch()
    return workdir.resolve()


def send_study(files: list[Path], port: int, called_ae: str = "RADNODE", calling_ae: str = "DEMO_CT") -> int:
    """C-STORE the files to the node in one association; returns how many were accepted."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError(f"the node at port {port} refused the association")
    accepted = 0
    try:
        for i, path in enumerate(files, 1):
            status = assoc.send_c_store(pydicom.dcmread(path))
            accepted += int(getattr(status, "Status", -1) == 0)
            if i % 50 == 0 or i == len(files):
                print(f"      sent {i}/{len(files)}", flush=True)
    finally:
        assoc.release()
    return accepted


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def _seg_masks(seg_path: Path, source_order: list[str]) -> dict[str, np.ndarray]:
    """Decode a SEG back onto the source slice order, by referenced SOP instance."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    masks = {}
    for number in seg.segment_numbers:
        key = seg.get_segment_description(number).tracking_id
        array = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=source_order, segment_numbers=[number],
            ignore_spatial_locations=True, assert_missing_frames_are_empty=True).squeeze(-1)
        masks[key] = array.astype(bool)
    return masks


def run_demo(workdir: Path, n_slices: int = 220, *, viewer: bool = False, viewer_port: int = 0,
             wait: Callable[[ServedStudy], None] = until_interrupted) -> int:
    """Run the demo; returns the exit status (0 when the results reached the PACS and the EHR).

    With ``viewer``, afterwards the study and the results the PACS received are shown in OHIF at
    ``127.0.0.1:viewer_port`` (0: a free port) while ``wait`` runs (default: until Ctrl-C).
    """
    total = 7 if viewer else 6
    if viewer:
        try:
            check_viewer_installed()  # before the demo, not after it
        except ViewerUnavailableError as e:
            print(f"radnode demo --viewer: {e}")
            return 1
    workdir = _fresh_workdir(Path(workdir))
    started = time.monotonic()

    def step(n: int, text: str) -> None:
        _step(n, text, total)

    step(1, f"making a phantom CT study ({n_slices} slices of 512×512) in {workdir / 'study'}")
    phantom = make_ct_phantom(n_slices=n_slices)
    files = write_ct_series(phantom, workdir / "study", shuffle=True)

    with ExitStack() as stack:
        step(2, "starting a PACS (DCMTK storescp) and an EHR (sekmet FHIR R4 server) on loopback")
        pacs = stack.enter_context(StoreSCP(workdir / "pacs"))
        ehr = stack.enter_context(FhirServer(workdir / "ehr"))
        config = Config(
            data_dir=workdir / "node",
            ingress=IngressConfig(host="127.0.0.1", port=free_port(), study_idle_seconds=2.0),
            egress=EgressConfig(destinations={"pacs": pacs.destination, "ehr": ehr.destination}),
        )
        node = stack.enter_context(Node(config))
        print(f"      node RADNODE listening on 127.0.0.1:{node.port}, data in {config.data_dir}")

        step(3, f"sending {len(files)} instances to the node over one DICOM association")
        accepted = send_study(files, node.port, config.ingress.ae_title)
        if accepted != len(files):
            print(f"      only {accepted} of {len(files)} instances were accepted")
            return 1

        step(4, "waiting for the study to complete, the pipeline to run and the results to be delivered")
        job = _follow_job(node, timeout=900)
        if job is None or job.state != JobState.DONE:
            print(f"      job ended {job.state if job else 'never started'}: {job.reason if job else ''}")
            return 1

        step(5, "where the results went")
        out = outbox_dir(config, job.id)
        print(f"      outbox : {out}")
        for path in pacs.received():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            print(f"      PACS   : {ds.Modality:4} {ds.SOPClassUID.name} → {path}")
        reports = ehr.search("DiagnosticReport", "_summary=count")
        observations = ehr.search("Observation", "_summary=count")
        print(f"      EHR    : {reports.get('total')} DiagnosticReport(s), "
              f"{observations.get('total')} Observation(s) at {ehr.base_url}")

        step(6, "measurements (from the SR; the FHIR Observations carry the same numbers)")
        manifest = RunManifest.read(out)
        _print_measurements(manifest.measurements)
        source_order = [str(ds.SOPInstanceUID) for ds in sorted(
            (pydicom.dcmread(p, stop_before_pixels=True) for p in files),
            key=lambda ds: float(ds.ImagePositionPatient[2]))]
        masks = _seg_masks(out / "seg.dcm", source_order)
        print("      agreement with the phantom's truth (Dice): " + ", ".join(
            f"{key} {_dice(masks[key], truth):.3f}" for key, truth in phantom.truth.items() if key in masks))
        report = out / "report.txt"
        if report.exists():
            print("      draft report (verified against the measurements before release):")
            for line in report.read_text().splitlines():
                print(f"        {line}")
        delivered = pacs.received()
    print(f"done in {time.monotonic() - started:.0f} s")
    if viewer:
        step(7, "the study and the results the PACS received, in Orthanc, shown by OHIF")
        with serve_study([*files, *delivered], port=viewer_port) as served:
            print(f"      Orthanc (DICOMweb): {served.orthanc.dicomweb_url}")
            print(f"      OHIF, the processed study: {served.url}", flush=True)
            print("      in OHIF, double-click the SEG for its overlay and the measurements SR for the Measurements "
                  "panel (Yes to tracking)")
            wait(served)
    return 0


def _follow_job(node: Node, timeout: float):
    """Print the job's event log as it grows until the job is done or failed."""
    deadline = time.monotonic() + timeout
    last_event = 0
    job = None
    while time.monotonic() < deadline:
        jobs = node.jobs()
        if jobs:
            job = jobs[-1]
            for event in node.events(job.id, last_event):
                print(f"      {time.strftime('%H:%M:%S', time.localtime(event.at))} {event.kind:10} {event.message}",
                      flush=True)
                last_event = event.id
            if job.state in FINAL_STATES:
                return job
        time.sleep(0.5)
    return job


def _print_measurements(rows: list[dict]) -> None:
    print(f"      {'structure':18} {'quantity':46} {'value':>10}  unit")
    for row in rows:
        quantity = row["concept"]["meaning"] + (f" ({row['derivation']['meaning']})" if row.get("derivation") else "")
        print(f"      {row['structure']:18} {quantity:46} {row['value']:>10}  {row['unit']}")
