"""Issue-level acceptance through the real command: ``radnode serve`` in its own process, DCMTK storescu
sending a real CT, DCMTK storescp as the PACS, a real FHIR server as the EHR, dciodvfy as the judge."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle

from factories import restore_totalseg_dicom
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
    node = ServeProcess(tmp_path / "node", pacs, fhir)
    try:
        node.send(*files)
        ((job, events),) = node.jobs_when_final(1)
    finally:
        node.stop()
    assert job.state is JobState.DONE, f"{job.reason}: {[e.message for e in events]}"

    received = {pydicom.dcmread(p).SOPClassUID.name: p for p in pacs.received()}
    assert set(received) == {"Segmentation Storage", "Comprehensive 3D SR Storage", "Comprehensive SR Storage",
                             "Encapsulated PDF Storage"}
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
    expected_reasons = {"GAP": "1 slice(s) missing between", "CORRUPT": "pixel data cannot be decoded",
                        "NOIMAGE": "modality SR"}
    for patient, fragment in expected_reasons.items():
        job, events = jobs[patient]
        assert job.state is JobState.FAILED, patient
        assert fragment in (job.reason or ""), (patient, job.reason)
        assert any(fragment in e.message for e in events), patient
    # nothing received was lost: every instance sent is in the spool
    spooled = {p.name for p in (tmp_path / "node" / "spool").rglob("*.dcm")}
    sent = [p for p in gap + corrupt + good if p.exists()] + [tmp_path / "report.dcm"]
    assert len(spooled) == len(sent)
