"""De-identification (PS3.15 Annex E) checked against the standard's Table E.1-1 (not the library's copy),
with dciodvfy as the judge of validity and a real SEG whose references must survive."""

from __future__ import annotations

import stat
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from factories import ACCESSION, PATIENT, phantom_result, write_chest_phantom
from radnode.cli import main
from radnode.imaging.series import VolumeCriteria, load_volume
from radnode.outputs.algorithm import AlgorithmInfo
from radnode.outputs.seg import build_segmentation
from radnode.security.annex_e import remaining_original_values
from radnode.security.deid import BUILT_IN_PROFILES, Deidentifier, PseudonymMap, Refused, deidentify_folder
from radnode.security.privacy import SiteKey
from support.dicom_tools import dciodvfy_errors

KEY = SiteKey(b"site-key-for-tests-0123456789")
NAME = "Doe^Jane"
"""The patient's name here (the phantom's own, Phantom^Chest, would make "CT CHEST" identifying)."""


@pytest.fixture
def study_with_seg(tmp_path: Path) -> Path:
    """A phantom CT series with identifying data everywhere (incl. a private tag and a nested one) and a
    SEG of it."""
    folder = tmp_path / "study"
    for path in write_chest_phantom(folder, 12, 32, 32):
        ds = pydicom.dcmread(path)
        ds.PatientName = NAME
        ds.PatientBirthDate, ds.OtherPatientIDs, ds.PatientAddress = PATIENT["PatientBirthDate"], "OLD-77", "1 Main St"
        ds.InstitutionAddress, ds.OperatorsName = "Hospital Road 5", "Tech^Tom"
        ds.PatientAge, ds.PatientWeight, ds.PatientSize = "063Y", 71.5, 1.72
        block = ds.private_block(0x0009, "ACME 1.0", create=True)
        block.add_new(0x01, "LO", NAME)
        request = Dataset()
        request.RequestedProcedureID, request.AccessionNumber = "RP-991", ACCESSION
        ds.RequestAttributesSequence = [request]
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, generate_uid()
        ds.ReferencedImageSequence = [ref]
        ds.save_as(path)
    volume, _ = load_volume(folder, VolumeCriteria())
    seg = build_segmentation(volume, phantom_result(volume).segments[:2], AlgorithmInfo("test", "1"),
                             uid_root="1.2.826.0.1.3680043.8.498.")
    seg.save_as(folder / "seg.dcm")
    return folder


def test_basic_profile_leaves_no_original_value_of_table_e1_1_and_keeps_references(
        study_with_seg: Path, tmp_path: Path) -> None:
    mapping = PseudonymMap(tmp_path / "mapping", KEY)
    outcome = deidentify_folder(study_with_seg, tmp_path / "out", Deidentifier("basic", BUILT_IN_PROFILES["basic"],
                                                                               KEY, mapping))
    assert not outcome.refused and len(outcome.written) == 13
    originals = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in study_with_seg.iterdir()}
    results = [pydicom.dcmread(p) for p in outcome.written]
    # pair each output with its original through the site key's UID mapping
    by_new = {KEY.uid(uid): ds for uid, ds in originals.items()}
    for result, path in zip(results, outcome.written):
        original = by_new[str(result.SOPInstanceUID)]
        assert remaining_original_values(original, result) == [], path
        assert result.PatientIdentityRemoved == "YES"
        assert result.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert dciodvfy_errors(path) == [], path
        text = path.read_bytes()
        for identifier in (NAME, PATIENT["PatientID"], PATIENT["PatientBirthDate"], ACCESSION):
            assert identifier.encode() not in text, (identifier, path)

    images = [ds for ds in results if ds.Modality == "CT"]
    seg = next(ds for ds in results if ds.Modality == "SEG")
    assert len({ds.StudyInstanceUID for ds in results}) == 1 and len({ds.SeriesInstanceUID for ds in images}) == 1
    assert len({ds.PatientID for ds in results}) == 1
    referenced = {item.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    assert referenced <= {str(ds.SOPInstanceUID) for ds in images} and referenced
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == images[0].SeriesInstanceUID

    # the same study again under the same site key: the same UIDs and pseudonym (a later SEG still matches)
    again = deidentify_folder(study_with_seg, tmp_path / "again", Deidentifier("basic", BUILT_IN_PROFILES["basic"], KEY))
    assert sorted(p.name for p in again.written) == sorted(p.name for p in outcome.written)
    # the pseudonym mapping is owner-only and gives the original back, sealed at rest
    db = tmp_path / "mapping" / "pseudonyms.db"
    assert not db.stat().st_mode & 0o077 and PATIENT["PatientID"].encode() not in db.read_bytes()
    assert mapping.original("basic", "patient", str(results[0].PatientID)) == PATIENT["PatientID"]


def test_research_profile_keeps_characteristics_and_shifts_dates_consistently(study_with_seg: Path,
                                                                               tmp_path: Path) -> None:
    profile = BUILT_IN_PROFILES["research"]
    outcome = deidentify_folder(study_with_seg, tmp_path / "out", Deidentifier("research", profile, KEY))
    originals = {KEY.uid(str(pydicom.dcmread(p).SOPInstanceUID)): pydicom.dcmread(p) for p in study_with_seg.iterdir()}
    for path in outcome.written:
        result = pydicom.dcmread(path)
        original = originals[str(result.SOPInstanceUID)]
        assert remaining_original_values(original, result, profile.options) == [], path
        assert dciodvfy_errors(path) == [], path
        assert result.LongitudinalTemporalInformationModified == "MODIFIED"
        if result.Modality == "CT":
            assert (result.PatientAge, result.PatientSex, float(result.PatientWeight)) == ("063Y", "F", 71.5)
            assert result.StudyDescription == "CT CHEST WITHOUT CONTRAST"  # clean: kept
            assert result.StudyDate != original.StudyDate and len(result.StudyDate) == 8
    dates = {pydicom.dcmread(p).StudyDate for p in outcome.written}
    assert len(dates) == 1  # one shift for the patient


def secondary_capture(folder: Path, burned_in: str | None) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.PatientID, ds.PatientName, ds.Modality = "P1", "Burned^In", "OT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{burned_in}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_objects_with_burned_in_annotation_are_refused_with_the_reason(tmp_path: Path) -> None:
    deidentifier = Deidentifier("basic", BUILT_IN_PROFILES["basic"], KEY)
    for burned_in, words in (("YES", "BurnedInAnnotation is YES"), (None, "without BurnedInAnnotation NO")):
        with pytest.raises(Refused, match=words):
            deidentifier.deidentify(pydicom.dcmread(secondary_capture(tmp_path, burned_in)))
    assert deidentifier.deidentify(pydicom.dcmread(secondary_capture(tmp_path, "NO"))).PatientIdentityRemoved == "YES"


def test_radnode_deidentify_command(study_with_seg: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    secondary_capture(study_with_seg, "YES")
    config = tmp_path / "radnode.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n")
    status = main(["deidentify", str(study_with_seg), str(tmp_path / "out"), "--profile", "basic",
                   "--config", str(config)])
    out = capsys.readouterr().out
    assert status == 1  # something was refused
    assert "13 written" in out and "refused" in out and "BurnedInAnnotation is YES" in out
    assert len(list((tmp_path / "out").iterdir())) == 13
    key = tmp_path / "data" / "keys" / "site.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_study_forwarded_through_the_basic_profile_arrives_de_identified_and_burned_in_captures_stay(
        study_with_seg: Path, tmp_path: Path, stand_in: list[str]) -> None:
    from radnode.node.service import Node
    from radnode.node.store import JobState
    from radnode.peers import StoreSCP
    from support.dicom_tools import storescu
    from support.node import final_job, node_config
    from support.waiting import wait_until

    (study_with_seg / "seg.dcm").unlink()  # the images as a scanner sends them, and a screenshot of the study
    capture = pydicom.dcmread(secondary_capture(tmp_path / "sc", "YES"))
    images = sorted(study_with_seg.iterdir())
    capture.StudyInstanceUID = pydicom.dcmread(images[0]).StudyInstanceUID
    capture.save_as(study_with_seg / "capture.dcm")
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: research\n    when: {StudyInstanceUID: {matches: '.'}}\n"
                     "    forward: [research]\n")
    with StoreSCP(tmp_path / "research") as research:
        config = node_config(tmp_path, egress={"destinations": {"research": {
            **research.destination, "forward_only": True, "deidentify": "basic"}}})
        config = config.model_copy(update={"rules": rules})
        with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
            assert storescu(node.port, study_with_seg).returncode == 0
            wait_until(lambda: node.jobs(), timeout=30)
            job = final_job(node, node.jobs()[0].id, timeout=60)
            events = " ".join(e.message for e in node.events(job.id))
            audit_log = node.audit.path
        audit = audit_log.read_text()  # complete once the node has stopped
        assert job.state is JobState.DONE, job.reason
        received = [pydicom.dcmread(p) for p in research.received()]
    assert len(received) == len(images)  # every image, and not the capture
    assert "not sent to research (basic de-identification)" in events and "BurnedInAnnotation is YES" in events
    originals = {KEY.uid(str(pydicom.dcmread(p).SOPInstanceUID)): pydicom.dcmread(p) for p in images}
    site_key_uids = {str(ds.SOPInstanceUID) for ds in received}
    assert site_key_uids.isdisjoint(str(ds.SOPInstanceUID) for ds in originals.values())
    assert len({ds.StudyInstanceUID for ds in received}) == 1 and len({ds.SeriesInstanceUID for ds in received}) == 1
    for path, ds in zip(research.received(), received):
        original = next(o for o in originals.values() if o.InstanceNumber == ds.InstanceNumber)
        assert remaining_original_values(original, ds) == [], path
        assert dciodvfy_errors(path) == [], path
    export = next(m for m in audit.splitlines() if 'csd-code="110106"' in m)
    assert "<Anonymized>true</Anonymized>" in export
