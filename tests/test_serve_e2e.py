"""Issue-level acceptance through the real command: ``radnode serve`` in its own process, DCMTK storescu
sending a real CT, DCMTK storescp as the PACS, a real FHIR server as the EHR, dciodvfy as the judge."""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle

from factories import restore_totalseg_dicom, write_chest_phantom
from radnode.node.store import JobState
from radnode.outputs.sr import read_measurements
from radnode.peers import FhirServer, StoreSCP
from support.dicom_tools import ECHOSCU, dciodvfy_errors
from support.node import ServeProcess


@pytest.mark.slow
def test_real_ct_over_storescu_gives_valid_seg_sr_and_matching_fhir(
        real_ct_folder: Path, tmp_path: Path, peers: tuple[StoreSCP, FhirServer]) -> None:
    pacs, fhir = peers
    files = sorted(real_ct_folder.iterdir())
    random.Random(7).shuffle(files)  # arrival order must not matter
    node = ServeProcess(tmp_path / "node", pacs, fhir, late_instances="rerun")  # no rule file: the shipped rules
    try:
        node.send(*files)
        ((job, events),) = node.jobs_when_final(1)
        assert job.state is JobState.DONE, f"{job.reason}: {[e.message for e in events]}"
        # The PACS sends the node's own results back (as a PACS forwarding the whole study would): recorded
        # with the job, never processed, no re-run although late instances re-run the study here.
        node.send(*pacs.received(), calling_ae="PACS", options=("-R",))
        ((returned, returned_events),) = node.jobs_when_final(1, own_results=3)
    finally:
        node.stop()
    assert (returned.id, returned.state, returned.runs, returned.own_results) == (job.id, JobState.DONE, 1, 3)
    own = [e.message for e in returned_events if e.kind == "own-result"]
    assert len(own) == 3 and all("kept in the spool, not processed: the " in m and " is a result of radnode (" in m
                                 for m in own), own
    assert [e.kind for e in returned_events].count("running") == 1

    received = {pydicom.dcmread(p).SOPClassUID.name: p for p in pacs.received()}
    # The PACS renders SR: the Encapsulated PDF goes only to destinations that ask for it (encapsulated_pdf).
    assert set(received) == {"Segmentation Storage", "Comprehensive 3D SR Storage", "Comprehensive SR Storage"}
    # No FHIR identifier system is configured: the job is done, and its log says what the EHR will lack.
    warnings = [e.message for e in events if e.kind == "warning"]
    assert any("fhir.patient_identifier_system is not set" in w for w in warnings), warnings
    for path in received.values():  # the SEG, the TID 1500 measurement report, the text report
        assert dciodvfy_errors(path) == []
    received["SEG"], received["SR"] = received["Segmentation Storage"], received["Comprehensive 3D SR Storage"]

    # The SEG overlays the source exactly: each frame's position is its source slice's position.
    sources = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in files)}
    seg = pydicom.dcmread(received["SEG"])
    assert seg.FrameOfReferenceUID == next(iter(sources.values())).FrameOfReferenceUID
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert np.allclose([float(v) for v in orientation], [float(v) for v in sources[seg.ReferencedSeriesSequence[0]
                       .ReferencedInstanceSequence[0].ReferencedSOPInstanceUID].ImageOrientationPatient])
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose([float(v) for v in position], [float(v) for v in sources[source_uid].ImagePositionPatient])

    # The FHIR server holds a DiagnosticReport whose Observations carry the SR's numbers.
    sr_values = sorted((m["concept"]["value"], (m["derivation"] or {}).get("value"), m["value"])
                       for m in read_measurements(pydicom.dcmread(received["SR"])))
    assert len(sr_values) >= 8
    observations = Bundle.model_validate(fhir.search("Observation", "_count=200")).entry
    fhir_values = sorted((o.resource.code.coding[0].code,
                          o.resource.method.coding[0].code if o.resource.method.coding else None,
                          float(o.resource.valueQuantity.value)) for o in observations
                         if o.resource.valueQuantity is not None)  # the measurement groups hold no value
    assert fhir_values == sr_values
    reports = fhir.search("DiagnosticReport")
    assert reports["total"] == 1
    assert reports["entry"][0]["resource"]["status"] == "preliminary"
    outbox = tmp_path / "node" / "outbox" / str(job.id)
    Bundle.model_validate(json.loads((outbox / "fhir-bundle.json").read_text()))


def test_the_nodes_own_seg_and_sr_start_no_pipeline_with_or_without_a_rule_file(
        tmp_path: Path, peers: tuple[StoreSCP, FhirServer]) -> None:
    """radnode's SEG and SR sent to a node that never saw their study (no rule file: the shipped rules; then
    the shipped file named): the job list shows them received and not processed, with the reason, and no job
    ran (a rule file that would process anything is ``test_routing``'s)."""
    from radnode.pipelines.rules import DEFAULT_RULES

    pacs, fhir = peers
    results = _own_results(tmp_path / "results")
    for name, rules in (("default", None), ("shipped", DEFAULT_RULES)):
        node = ServeProcess(tmp_path / name, pacs, fhir, idle=0.5, rules=rules, late_instances="rerun")
        try:
            node.send(*results, calling_ae="PACS", options=("-R",))
            ((job, events),) = node.jobs_when_final(1)
        finally:
            node.stop()
        assert (job.state, job.pipeline, job.runs, job.own_results, job.instances) == (JobState.DONE, "", 0, 2, 2), name
        assert re.fullmatch(r"not processed: the SEG is a result of radnode \(ct_tissue 0\.1\.0\), told by [^;]+; "
                            r"the SR is a result of radnode \(ct_tissue 0\.1\.0\), told by .*", job.reason or ""), \
            (name, job.reason)
        assert [e.kind for e in events] == ["received", "done"], name
    assert pacs.received() == []


def _own_results(folder: Path) -> list[Path]:
    """A SEG and a measurement SR as the ct_tissue pipeline writes them, for a small phantom CT."""
    from factories import phantom_result, write_chest_phantom
    from radnode.imaging.series import VolumeCriteria, load_volume
    from radnode.outputs.algorithm import AlgorithmInfo
    from radnode.outputs.seg import build_segmentation
    from radnode.outputs.sr import build_measurement_report

    write_chest_phantom(folder / "ct", 12, 32, 32)
    volume, _ = load_volume(folder / "ct", VolumeCriteria())
    result = phantom_result(volume)
    algorithm = AlgorithmInfo(name="ct_tissue", version="0.1.0")
    seg = build_segmentation(volume, result.segments, algorithm, uid_root="1.2.826.0.1.3680043.8.498.")
    seg.save_as(folder / "seg.dcm")
    build_measurement_report(volume, seg, result, algorithm, uid_root="1.2.826.0.1.3680043.8.498.").save_as(
        folder / "sr.dcm")
    return [folder / "seg.dcm", folder / "sr.dcm"]


@pytest.mark.slow
def test_bad_studies_fail_with_reasons_while_a_good_one_completes(
        totalseg_reference: Path, tmp_path: Path, peers: tuple[StoreSCP, FhirServer]) -> None:
    from pydicom.data import get_testdata_file
    from pydicom.encaps import encapsulate, generate_frames

    pacs, fhir = peers
    good = restore_totalseg_dicom(totalseg_reference, tmp_path / "good", patient_id="GOOD")
    gap = restore_totalseg_dicom(totalseg_reference, tmp_path / "gap", patient_id="GAP")
    by_z = sorted(gap, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    by_z[8].unlink()
    corrupt = restore_totalseg_dicom(totalseg_reference, tmp_path / "corrupt", patient_id="CORRUPT")
    victim = pydicom.dcmread(corrupt[4])
    codestream = next(generate_frames(victim.PixelData, number_of_frames=1))
    victim.PixelData = encapsulate([codestream[: len(codestream) // 3]])  # a truncated JPEG 2000 codestream
    victim.save_as(corrupt[4])
    report = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    report.PatientID = "NOIMAGE"
    report.StudyInstanceUID, report.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    report.SOPInstanceUID = pydicom.uid.generate_uid()
    report.save_as(tmp_path / "report.dcm")

    node = ServeProcess(tmp_path / "node", pacs, fhir)
    try:
        node.send(*[p for p in gap if p.exists()], calling_ae="SCANNER_A")
        node.send(*corrupt, calling_ae="SCANNER_B")
        node.send(tmp_path / "report.dcm", calling_ae="SCANNER_C")
        node.send(*good, calling_ae="SCANNER_D")
        jobs = {job.patient_id: (job, events) for job, events in node.jobs_when_final(4)}
        # the node keeps serving after all of it
        assert subprocess.run([ECHOSCU, "-aec", "RADNODE", "127.0.0.1", str(node.port)]).returncode == 0
    finally:
        node.stop()
    assert jobs["GOOD"][0].state is JobState.DONE
    report, report_events = jobs.pop("NOIMAGE")  # a report, not an image: the shipped rules keep it out
    assert report.state is JobState.DONE and report.pipeline == "" and report.runs == 0
    assert report.reason == "not processed: discard (rules: never-process-derived-objects)"
    assert "running" not in [e.kind for e in report_events]
    expected_reasons = {"GAP": "1 slice(s) missing between", "CORRUPT": "pixel data cannot be decoded"}
    for patient, fragment in expected_reasons.items():
        job, events = jobs[patient]
        assert job.state is JobState.FAILED, patient
        assert fragment in (job.reason or ""), (patient, job.reason)
        assert any(fragment in e.message for e in events), patient
    # nothing received was lost: every instance sent is in the spool
    spooled = {p.name for p in (tmp_path / "node" / "spool").rglob("*.dcm")}
    sent = [p for p in gap + corrupt + good if p.exists()] + [tmp_path / "report.dcm"]
    assert len(spooled) == len(sent)


def test_a_study_without_patient_id_is_delivered_and_done_with_a_warning(
        tmp_path: Path, peers: tuple[StoreSCP, FhirServer]) -> None:
    """A chest phantom whose sender left Patient ID empty, to ``radnode serve`` (the shipped rules, the real
    ct_tissue pipeline): the SEG and the SRs reach the PACS, the EHR gets its report with no Patient, and the
    job ends done with a warning naming the missing Patient ID."""
    pacs, fhir = peers
    files = write_chest_phantom(tmp_path / "study", n_slices=12)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientID = ""
        ds.save_as(path, enforce_file_format=True)
    node = ServeProcess(tmp_path / "node", pacs, fhir)
    try:
        node.send(*files, options=())
        ((job, events),) = node.jobs_when_final(1, timeout=300)
    finally:
        node.stop()
    assert job.state is JobState.DONE, job.reason
    warnings = [e.message for e in events if e.kind == "warning"]
    assert any("Patient ID" in message for message in warnings), [(e.kind, e.message) for e in events]
    received = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.received()]
    assert {"SEG", "SR"} <= {ds.Modality for ds in received}
    assert all(ds.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID for ds in received)
    assert fhir.search("DiagnosticReport", "_summary=count")["total"] == 1
    assert fhir.search("Patient", "_summary=count")["total"] == 0
