"""DICOM SEG, TID 1500 SR and FHIR Bundle written for the synthetic chest CT phantom.

Checks the files as a receiver sees them: dciodvfy on the written DICOM, geometry against the source
files read back from disk, masks and numbers decoded back, and the Bundle accepted by a real FHIR server.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom.sr.codedict import codes

from factories import ACCESSION, PATIENT, STRUCTURES, phantom_masks, phantom_result, write_chest_phantom
from radnode.imaging.series import Series, VolumeCriteria, build_volume, load_volume
from radnode.imaging.volume import Volume
from radnode.outputs.algorithm import AlgorithmInfo
from radnode.config import FhirConfig
from radnode.outputs.fhir import ReportContent, build_report_bundle, bundle_to_json
from radnode.outputs.seg import build_segmentation
from radnode.outputs.sr import build_measurement_report, read_measurements
from radnode.peers import FhirServer
from radnode.results import PipelineResult, Segment

UID_ROOT = "1.2.826.0.1.3680043.8.498."
MRN_SYSTEM = "urn:oid:1.2.3.4.5.1"
ALGORITHM = AlgorithmInfo(name="radnode test phantom", version="1.0")
FHIR_SYSTEMS = {"SCT": "http://snomed.info/sct", "DCM": "http://dicom.nema.org/resources/ontology/DCM",
                "LN": "http://loinc.org", "UCUM": "http://unitsofmeasure.org"}


@pytest.fixture(scope="module")
def source_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom series written as files (40 slices of 64×64)."""
    folder = tmp_path_factory.mktemp("ct")
    write_chest_phantom(folder)
    return folder


@pytest.fixture(scope="module")
def source_files(source_folder: Path) -> dict[str, pydicom.Dataset]:
    """The source slices as read from disk, by SOP Instance UID (independent of the Volume)."""
    return {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, sorted(source_folder.iterdir()))}


@pytest.fixture(scope="module")
def volume(source_folder: Path) -> Volume:
    loaded, skipped = load_volume(source_folder, VolumeCriteria())
    assert skipped == []
    return loaded


@pytest.fixture(scope="module")
def result(volume: Volume) -> PipelineResult:
    return phantom_result(volume)


@pytest.fixture(scope="module")
def outputs(volume: Volume, result: PipelineResult, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SEG and SR built from the phantom and written to disk."""
    folder = tmp_path_factory.mktemp("out")
    seg = build_segmentation(volume, result.segments, ALGORITHM, uid_root=UID_ROOT)
    seg.save_as(folder / "seg.dcm")
    sr = build_measurement_report(volume, seg, result, ALGORITHM, uid_root=UID_ROOT)
    sr.save_as(folder / "sr.dcm")
    return {"seg": folder / "seg.dcm", "sr": folder / "sr.dcm"}


@pytest.fixture(scope="module")
def seg_file(outputs: dict[str, Path]) -> pydicom.Dataset:
    return pydicom.dcmread(outputs["seg"])


@pytest.fixture(scope="module")
def sr_file(outputs: dict[str, Path]) -> pydicom.Dataset:
    return pydicom.dcmread(outputs["sr"])


@pytest.mark.parametrize("kind, iod", [("seg", "Segmentation"), ("sr", "Comprehensive3DSR")])
def test_written_dicom_passes_dciodvfy(outputs: dict[str, Path], kind: str, iod: str) -> None:
    dciodvfy = shutil.which("dciodvfy")
    assert dciodvfy, "dciodvfy (dicom3tools) is needed to verify the written objects"
    run = subprocess.run([dciodvfy, str(outputs[kind])], capture_output=True, text=True, check=False)
    report = (run.stdout + run.stderr).splitlines()
    assert iod in report, f"dciodvfy did not recognise the {iod} IOD: {report[:5]}"
    assert [line for line in report if line.startswith("Error")] == []


def test_seg_frames_lie_on_their_source_slices(seg_file: pydicom.Dataset, source_files: dict[str, pydicom.Dataset],
                                               volume: Volume) -> None:
    first = next(iter(source_files.values()))
    assert seg_file.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg_file.StudyInstanceUID == first.StudyInstanceUID
    assert seg_file.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    shared = seg_file.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == \
        [float(v) for v in first.ImageOrientationPatient]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [float(v) for v in first.PixelSpacing]
    for frame in seg_file.PerFrameFunctionalGroupsSequence:
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert position == [float(v) for v in source_files[source_uid].ImagePositionPatient]
    assert {str(ds.SOPInstanceUID) for ds in volume.source} == set(source_files)


def test_seg_decodes_to_the_input_masks(outputs: dict[str, Path], volume: Volume, result: PipelineResult) -> None:
    seg = hd.seg.segread(outputs["seg"])
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in volume.source],
        segment_numbers=list(range(1, len(result.segments) + 1)),
        assert_missing_frames_are_empty=True,
    )
    expected = np.stack([s.mask for s in result.segments], axis=-1)
    assert masks.shape == expected.shape
    assert np.array_equal(masks.astype(bool), expected)
    assert seg.SegmentsOverlap == "YES"


def test_seg_omits_empty_frames(seg_file: pydicom.Dataset, result: PipelineResult) -> None:
    frames_with_content = sum(int(s.mask.any(axis=(1, 2)).sum()) for s in result.segments)
    assert frames_with_content < len(result.segments) * result.segments[0].mask.shape[0]  # lungs leave slices empty
    assert seg_file.NumberOfFrames == frames_with_content


def test_seg_segments_are_coded_and_identify_the_algorithm(seg_file: pydicom.Dataset) -> None:
    assert [item.TrackingID for item in seg_file.SegmentSequence] == list(STRUCTURES)
    for item, structure in zip(seg_file.SegmentSequence, STRUCTURES.values(), strict=True):
        assert item.SegmentLabel == structure.label
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == (structure.category.value, "SCT")
        assert (prop.CodeValue, prop.CodingSchemeDesignator) == (structure.property_type.value, "SCT")
        modifiers = [m.CodeValue for m in prop.get("SegmentedPropertyTypeModifierCodeSequence", [])]
        assert modifiers == ([structure.laterality.value] if structure.laterality else [])
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (ALGORITHM.name, ALGORITHM.version)
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == codes.cid7162.ArtificialIntelligence.value
        assert "SegmentedPropertyTypeModifierCodeSequence" not in structure.property_type  # shared code untouched


@pytest.mark.parametrize("kind", ["seg", "sr"])
def test_contributing_equipment_names_the_algorithm(outputs: dict[str, Path], kind: str) -> None:
    ds = pydicom.dcmread(outputs[kind])
    items = [i for i in ds.ContributingEquipmentSequence if i.get("ManufacturerModelName") == ALGORITHM.name]
    assert len(items) == 1
    item = items[0]
    assert item.Manufacturer == "radnode"
    assert item.SoftwareVersions == ALGORITHM.version
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")


def test_sr_measurements_read_back_equal_the_result(sr_file: pydicom.Dataset, seg_file: pydicom.Dataset,
                                                    result: PipelineResult) -> None:
    rows = read_measurements(sr_file)
    read_back = [(r["structure"], r["concept"]["value"], r["concept"]["scheme_designator"], r["value"], r["unit"],
                  r["derivation"]["value"] if r["derivation"] else None) for r in rows]
    expected = [(m.structure_key, m.name.value, m.name.scheme_designator, m.value, m.unit.value,
                 m.derivation.value if m.derivation else None) for m in result.measurements]
    assert sorted(read_back) == sorted(expected)
    segments = {str(item.TrackingID): item for item in seg_file.SegmentSequence}
    for row in rows:
        segment = segments[row["structure"]]
        assert row["segment_number"] == segment.SegmentNumber
        assert row["tracking_uid"] == segment.TrackingUID
        assert row["seg_sop_instance_uid"] == seg_file.SOPInstanceUID
        assert row["finding_type"]["value"] == STRUCTURES[row["structure"]].property_type.value


def test_sr_is_a_tid_1500_report_with_evidence(sr_file: pydicom.Dataset, seg_file: pydicom.Dataset,
                                              source_files: dict[str, pydicom.Dataset]) -> None:
    sr = hd.sr.Comprehensive3DSR.from_dataset(sr_file)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    procedure = [i for i in sr.ContentSequence if i.name == codes.DCM.ProcedureReported]
    assert [(p.value.value, p.value.scheme_designator) for p in procedure] == [("25045-6", "LN")]
    evidence = {str(ref.ReferencedSOPInstanceUID)
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert evidence == set(source_files) | {str(seg_file.SOPInstanceUID)}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(STRUCTURES)
    for group in groups:
        structure = STRUCTURES[group.tracking_identifier]
        sites = [s.value.value for s in group.finding_sites]
        assert sites == ([structure.property_type.value] if structure.category.value == "91723000" else [])
        for measurement in group.get_measurements():
            texts = {(i.ConceptNameCodeSequence[0].CodeValue, i.TextValue)
                     for i in measurement[0].ContentSequence if i.ValueType == "TEXT"}
            assert {(codes.DCM.AlgorithmName.value, ALGORITHM.name),
                    (codes.DCM.AlgorithmVersion.value, ALGORITHM.version)} <= texts
    schemes = {str(i.CodingSchemeDesignator): i for i in sr_file.CodingSchemeIdentificationSequence}
    assert set(schemes) == {"99RADNODE"}
    assert pydicom.uid.UID(schemes["99RADNODE"].CodingSchemeUID).is_valid


def test_seg_frames_follow_the_source_whatever_the_arrival_order(volume: Volume,
                                                                 source_files: dict[str, pydicom.Dataset]) -> None:
    """Datasets handed over shuffled still give frames on their own slices and the same masks."""
    datasets = list(source_files.values())
    random.Random(7).shuffle(datasets)
    shuffled = build_volume(Series(str(datasets[0].SeriesInstanceUID), datasets, [Path("x.dcm")] * len(datasets)))
    masks = phantom_masks(*shuffled.shape)
    seg = build_segmentation(shuffled, [Segment(STRUCTURES["lung_left"], masks["lung_left"])], ALGORITHM,
                             uid_root=UID_ROOT)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == \
            [float(v) for v in source_files[source_uid].ImagePositionPatient]
    decoded = seg.get_pixels_by_source_instance([str(ds.SOPInstanceUID) for ds in volume.source], [1],
                                                assert_missing_frames_are_empty=True)
    assert np.array_equal(decoded[..., 0].astype(bool), masks["lung_left"])


def test_disjoint_segments_decode_to_the_input_masks(volume: Volume, tmp_path: Path) -> None:
    """Segments that never overlap take the label-map path; the SEG must decode to the same masks."""
    labels = np.random.default_rng(3).integers(0, 4, size=volume.shape)
    labels[:5] = 0  # some empty frames
    keys = ["lung_left", "lung_right", "bone"]
    segments = [Segment(STRUCTURES[key], labels == number) for number, key in enumerate(keys, start=1)]
    build_segmentation(volume, segments, ALGORITHM, uid_root=UID_ROOT).save_as(tmp_path / "seg.dcm")
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in volume.source], segment_numbers=[1, 2, 3],
        assert_missing_frames_are_empty=True)
    assert np.array_equal(masks.astype(bool), np.stack([s.mask for s in segments], axis=-1))
    assert seg.SegmentsOverlap == "NO"


def _reference_seg(volume: Volume, segments: list[Segment], seg: hd.seg.Segmentation) -> hd.seg.Segmentation:
    """highdicom's own SEG of the stacked masks, with the segment descriptions and UIDs of ``seg``."""
    descriptions = [hd.seg.SegmentDescription.from_dataset(copy.deepcopy(item)) for item in seg.SegmentSequence]
    return hd.seg.Segmentation(
        source_images=volume.source, pixel_array=np.stack([s.mask for s in segments], axis=-1),
        segmentation_type="BINARY", segment_descriptions=descriptions, series_instance_uid=seg.SeriesInstanceUID,
        series_number=seg.SeriesNumber, sop_instance_uid=seg.SOPInstanceUID, instance_number=1,
        **ALGORITHM.image_equipment(), omit_empty_frames=True)


def _layered_segments(volume: Volume, arrangement: str) -> list[Segment]:
    masks = phantom_masks(*volume.shape)
    keys = ["lung_left", "lung_right", "bone", "adipose_tissue", "skeletal_muscle"]
    labels = np.zeros(volume.shape, dtype=np.uint8)
    for value, key in enumerate(keys, start=1):
        labels[masks[key]] = value
    if arrangement == "body then a label map":  # what the CT tissue pipeline hands over
        return [Segment(STRUCTURES["body"], masks["body"]),
                *(Segment(STRUCTURES[key], labels, value) for value, key in enumerate(keys, start=1))]
    # a label map used in part and out of order, interleaved with overlapping bool masks
    return [Segment(STRUCTURES["bone"], labels, 3), Segment(STRUCTURES["body"], masks["body"]),
            Segment(STRUCTURES["lung_left"], labels, 1),
            Segment(STRUCTURES["skeletal_muscle"], masks["body"] & ~masks["bone"])]


@pytest.mark.parametrize("arrangement", ["body then a label map", "interleaved"])
def test_seg_of_layers_is_the_seg_highdicom_makes_of_the_stacked_masks(volume: Volume, arrangement: str) -> None:
    """The layers' SEGs put together give, frame for frame and byte for byte, highdicom's SEG of the stacked masks."""
    segments = _layered_segments(volume, arrangement)
    seg = build_segmentation(volume, segments, ALGORITHM, uid_root=UID_ROOT)
    reference = _reference_seg(volume, segments, seg)
    assert seg.NumberOfFrames == reference.NumberOfFrames
    assert seg.PixelData == reference.PixelData
    assert list(seg.PerFrameFunctionalGroupsSequence) == list(reference.PerFrameFunctionalGroupsSequence)
    assert seg.SharedFunctionalGroupsSequence == reference.SharedFunctionalGroupsSequence
    assert [item.SegmentNumber for item in seg.SegmentSequence] == list(range(1, len(segments) + 1))
    assert seg.SegmentsOverlap == reference.SegmentsOverlap == "YES"
    assert seg.get("DimensionOrganizationType") == reference.get("DimensionOrganizationType")
    decoded = seg.get_pixels_by_source_instance([str(ds.SOPInstanceUID) for ds in volume.source],
                                                list(range(1, len(segments) + 1)), assert_missing_frames_are_empty=True)
    assert np.array_equal(decoded.astype(bool), np.stack([s.mask for s in segments], axis=-1))


def test_seg_refuses_a_mask_off_the_volume_grid(volume: Volume) -> None:
    wrong = Segment(STRUCTURES["body"], np.ones(volume.shape[:2], dtype=bool))
    with pytest.raises(ValueError, match="body"):
        build_segmentation(volume, [wrong], ALGORITHM, uid_root=UID_ROOT)


@pytest.fixture(scope="module")
def bundle_json(volume: Volume, result: PipelineResult, sr_file: pydicom.Dataset) -> str:
    return bundle_to_json(build_report_bundle(volume, result, sr_file, ALGORITHM, uid_root=UID_ROOT,
                                              content=ReportContent(conclusion="Phantom study."),
                                              fhir=FhirConfig(patient_identifier_system=MRN_SYSTEM)))


def _resources(bundle: dict, resource_type: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type]


def test_fhir_bundle_round_trips_through_fhir_resources(bundle_json: str) -> None:
    parsed = Bundle.model_validate_json(bundle_json)
    assert parsed.type == "transaction"
    assert json.loads(bundle_to_json(parsed)) == json.loads(bundle_json)
    for entry in json.loads(bundle_json)["entry"]:  # every write is conditional: a retry never duplicates
        assert entry["fullUrl"].startswith("urn:uuid:")
        rtype, request = entry["resource"]["resourceType"], entry["request"]
        if request["method"] == "POST":
            assert request["url"] == rtype and request["ifNoneExist"].startswith("identifier=")
            assert "|" in request["ifNoneExist"]  # system|value, never a bare value
        elif rtype == "Provenance":
            assert request == {"method": "PUT", "url": f"Provenance/{entry['resource']['id']}"}
        else:
            identifier = entry["resource"]["identifier"][0]
            assert request == {"method": "PUT", "url": f"{rtype}?identifier={identifier['system']}|{identifier['value']}"}


def test_fhir_observations_carry_the_sr_values(bundle_json: str, sr_file: pydicom.Dataset) -> None:
    bundle = json.loads(bundle_json)
    private = {str(i.CodingSchemeDesignator): f"urn:oid:{i.CodingSchemeUID}"
               for i in sr_file.CodingSchemeIdentificationSequence}
    systems = {**FHIR_SYSTEMS, **private}
    expected = {(STRUCTURES[r["structure"]].label, systems[r["concept"]["scheme_designator"]], r["concept"]["value"]):
                (r["value"], r["unit"]) for r in read_measurements(sr_file)}
    observations = [o for o in _resources(bundle, "Observation") if "valueQuantity" in o]
    found = {}
    for obs in observations:
        coding = obs["code"]["coding"][0]
        quantity = obs["valueQuantity"]
        assert quantity["system"] == FHIR_SYSTEMS["UCUM"] and quantity["code"] == quantity["unit"]
        assert obs["status"] == "preliminary"
        assert obs["category"][0]["coding"][0]["code"] == "imaging"
        found[(obs["bodySite"]["text"], coding["system"], coding["code"])] = (quantity["value"], quantity["code"])
    assert len(observations) == len(expected)
    assert found == expected


def test_fhir_diagnostic_report_ties_patient_study_order_and_sr(bundle_json: str, sr_file: pydicom.Dataset,
                                                                volume: Volume) -> None:
    bundle = json.loads(bundle_json)
    urls = {e["resource"]["resourceType"]: e["fullUrl"] for e in bundle["entry"]}
    report = _resources(bundle, "DiagnosticReport")[0]
    assert report["status"] == "preliminary"
    assert {(c["system"], c["code"]) for c in report["category"][0]["coding"]} == {
        ("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD"), ("http://loinc.org", "LP29684-5")}
    assert report["code"]["coding"][0] == {"system": "http://loinc.org", "code": "25045-6",
                                           "display": "CT unspecified body region"}
    assert report["subject"] == {"reference": urls["Patient"]}
    assert report["imagingStudy"] == [{"reference": urls["ImagingStudy"]}]
    assert f"urn:oid:{sr_file.SOPInstanceUID}" in {i["value"] for i in report["identifier"]}
    assert report["basedOn"][0]["type"] == "ServiceRequest"
    assert report["basedOn"][0]["identifier"]["value"] == ACCESSION
    assert report["effectiveDateTime"].startswith("2024-03-12T10:15:00")
    assert report["conclusion"] == "Phantom study."
    observation_urls = [e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert sorted(r["reference"] for r in report["result"]) == sorted(observation_urls)
    study = _resources(bundle, "ImagingStudy")[0]
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{volume.study.StudyInstanceUID}"} in study["identifier"]
    patient_entry = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    assert patient_entry["request"]["ifNoneExist"] == f"identifier={MRN_SYSTEM}|{PATIENT['PatientID']}"
    patient = patient_entry["resource"]
    assert (patient["birthDate"], patient["gender"], patient["name"][0]["family"]) == ("1960-05-21", "female",
                                                                                     "Phantom")


def _http(method: str, url: str, body: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, method=method, data=body.encode() if body is not None else None,
                                     headers={"Content-Type": "application/fhir+json",
                                              "Accept": "application/fhir+json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real FHIR R4 server (sekmet-fhir, strict inbound validation) on a free loopback port."""
    with FhirServer(tmp_path_factory.mktemp("sekmet")) as server:
        yield server.base_url


def test_fhir_server_accepts_the_transaction(fhir_server: str, bundle_json: str, sr_file: pydicom.Dataset) -> None:
    status, response = _http("POST", fhir_server, bundle_json)
    assert status == 200, response
    assert response["type"] == "transaction-response"
    sent = json.loads(bundle_json)["entry"]
    statuses = [e["response"]["status"] for e in response["entry"]]
    assert statuses == ["201 Created"] * len(sent)
    for entry, answer in zip(sent, response["entry"], strict=True):
        location = answer["response"]["location"].split("/_history/")[0]
        got_status, resource = _http("GET", location)
        assert got_status == 200
        assert resource["resourceType"] == entry["resource"]["resourceType"]
    report_index = next(i for i, e in enumerate(sent) if e["resource"]["resourceType"] == "DiagnosticReport")
    report_url = response["entry"][report_index]["response"]["location"].split("/_history/")[0]
    report = _http("GET", report_url)[1]
    values = []
    for reference in report["result"]:
        observation = _http("GET", f"{fhir_server}/{reference['reference']}")[1]
        if "valueQuantity" in observation:  # the measurement groups hold no value, their members do
            values.append(observation["valueQuantity"]["value"])
    assert values == [r["value"] for r in read_measurements(sr_file)]

    again_status, again = _http("POST", fhir_server, bundle_json)  # a resend must not duplicate the patient
    assert again_status == 200, again
    assert again["entry"][0]["response"]["status"] == "200 OK"
    patients = _http("GET", f"{fhir_server}/Patient?identifier={PATIENT['PatientID']}")[1]
    assert patients["total"] == 1


def test_fhir_server_refuses_an_observation_without_status(fhir_server: str, bundle_json: str) -> None:
    """The server really validates: the acceptance above means something."""
    bundle = json.loads(bundle_json)
    next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation")["resource"].pop("status")
    status, response = _http("POST", fhir_server, json.dumps(bundle))
    assert status == 400
    assert response["resourceType"] == "OperationOutcome"


def test_the_output_layout_gives_each_kind_its_own_series_and_says_what_each_app_writes() -> None:
    """One table of a run's outputs: no two DICOM kinds share a series number (viewers would sort them into one
    series), each names its SOP class; a built-in app's folder is checked against it, a site app's is not."""
    from radnode.outputs.layout import OutputFormat, RunOutput, is_dicom, layout_problems, outputs_of

    dicom = [output for output in RunOutput if output.format is OutputFormat.DICOM]
    numbers = [output.series_number for output in dicom]
    assert len(set(numbers)) == len(numbers) and all(n > 900 for n in numbers)
    assert all(output.sop_class_uid and output.value.modality for output in dicom)
    assert len({output.file for output in RunOutput}) == len(RunOutput)
    ct_files = [output.file for output in outputs_of("ct_tissue")]
    assert layout_problems("ct_tissue", ct_files) == []
    brain = [output.file for output in outputs_of("mri_brain") if output is not RunOutput.UNCERTAINTY_MAP]
    assert layout_problems("mri_brain", brain) == ["uncertainty-map.dcm missing (mri_brain always writes it)"]
    assert layout_problems("ct_tissue", [*ct_files, "uncertainty-map.dcm"]) == [
        "uncertainty-map.dcm is not an output of ct_tissue (the layout's UNCERTAINTY_MAP is written by model_seg, "
        "mri_brain)"]
    assert {RunOutput.REPORT_SR, RunOutput.REPORT_TEXT, RunOutput.REPORT_PDF, RunOutput.REPORT_PDF_DICOM} <= {
        *outputs_of("mri_brain")} & {*outputs_of("model_seg")}  # every pipeline writes its report
    assert layout_problems(None, ["anything.dcm"]) == [] and layout_problems("site_app", ["x.dcm"]) == []
    assert is_dicom("seg.dcm") and is_dicom("1.2.3.dcm") and not is_dicom("fhir-bundle.json")
    assert not is_dicom("report.pdf")


def test_a_reissued_report_updates_the_same_resources_and_says_corrected(
        fhir_server: str, bundle_json: str, volume: Volume, result: PipelineResult) -> None:
    """A re-run of the study (new SEG and SR instances) re-issues the report: the DiagnosticReport and every
    Observation keep their identifiers, so the server updates them in place; the status says corrected."""
    seg = build_segmentation(volume, result.segments, ALGORITHM, uid_root=UID_ROOT)
    sr = build_measurement_report(volume, seg, result, ALGORITHM, uid_root=UID_ROOT)
    reissued = json.loads(bundle_to_json(build_report_bundle(
        volume, result, sr, ALGORITHM, uid_root=UID_ROOT, content=ReportContent(conclusion="Phantom study."),
        fhir=FhirConfig(patient_identifier_system=MRN_SYSTEM), reissue=True)))
    first = json.loads(bundle_json)
    identifiers = lambda bundle: sorted(e["request"]["url"] for e in bundle["entry"])  # noqa: E731
    assert identifiers(reissued) == identifiers(first)  # same conditional targets, new SOP Instance UIDs
    assert _resources(reissued, "DiagnosticReport")[0]["status"] == "corrected"
    for body in (bundle_json, json.dumps(reissued)):
        status, response = _http("POST", fhir_server, body)
        assert status == 200, response
    reports = _http("GET", f"{fhir_server}/DiagnosticReport")[1]["entry"]
    observations = _http("GET", f"{fhir_server}/Observation?_count=200")[1]
    assert [r["resource"]["status"] for r in reports] == ["corrected"]
    assert observations["total"] == len(_resources(first, "Observation"))
