"""Every output of the pipelines, read as a radiologist, an EHR integrator and independent validators would.

One run per dataset, shared by every test here: the real abdominal CT of the TotalSegmentator distribution
through ct_tissue and through model_seg (the tiny bundle), a real head CT (dicom2stl distribution), the
anthropomorphic thorax phantom (both lungs) and Colin27 as an MR study, each through its pipeline as
``radnode run`` runs it. The outputs then go through tools radnode did not write: dciodvfy,
dcmqi (segimage2itkimage, tid1500reader, paramap2itkimage), PixelMed's DicomSRValidator, the official FHIR
R4 JSON schema and a real FHIR server (sekmet); the report text is checked against the structured values.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from factories import restore_totalseg_dicom, write_chest_phantom, write_head_ct_study
from radnode.config import CONFIG_ENV
from radnode.execution import RunManifest, run_app
from radnode.imaging.brain import BPF, BRAIN_STRUCTURES, RATIO
from radnode.imaging.identity import StudyIdentity
from radnode.imaging.mri import nifti_to_axial_volume, write_mr_series
from radnode.imaging.series import InputError, read_study_folder
from radnode.peers import FhirServer
from radnode.phantom import make_ct_phantom, write_ct_series
from radnode.report.findings import structured_findings
from radnode.results import Measurement, PipelineResult, Segment
from support.dicom_tools import dciodvfy_errors
from support.validators import dcmqi, fhir_schema_errors, pixelmed_sr_errors

pytestmark = pytest.mark.slow
COLIN27 = Path("/usr/share/mricron/templates/ch2.nii.gz")
DIAGNOSTIC_SYSTEM = "urn:oid:1.2.3.4.5.6.7"


def _run(pipeline: str, study: Path, out: Path, monkeypatch: pytest.MonkeyPatch, config: Path | None = None) -> Path:
    with monkeypatch.context() as m:
        if config is not None:
            m.setenv(CONFIG_ENV, str(config))
        run_app(pipeline, study, out)
    return out


@pytest.fixture(scope="module")
def module_monkeypatch():
    with pytest.MonkeyPatch.context() as m:
        yield m


@pytest.fixture(scope="module")
def chest_ct(totalseg_reference: Path, tmp_path_factory: pytest.TempPathFactory, module_monkeypatch) -> Path:
    """ct_tissue on the real abdominal CT (lung bases, liver, spine in range)."""
    study = tmp_path_factory.mktemp("chest_ct")
    restore_totalseg_dicom(totalseg_reference, study, patient_id="SAMEID01")
    return _run("ct_tissue", study, tmp_path_factory.mktemp("chest_out"), module_monkeypatch)


@pytest.fixture(scope="module")
def phantom_chest(tmp_path_factory: pytest.TempPathFactory, module_monkeypatch) -> Path:
    """ct_tissue on the anthropomorphic thorax-abdomen phantom (both lungs in range, one with emphysema)."""
    study = tmp_path_factory.mktemp("phantom")
    write_ct_series(make_ct_phantom(n_slices=100, size=160, seed=5), study)
    return _run("ct_tissue", study, tmp_path_factory.mktemp("phantom_out"), module_monkeypatch)


@pytest.fixture(scope="module")
def head_ct(head_ct_nifti: Path, tmp_path_factory: pytest.TempPathFactory, module_monkeypatch) -> Path:
    """ct_tissue on the real head CT, the same Patient ID value as the chest CT but in the hospital's own
    configured identifier system."""
    study = tmp_path_factory.mktemp("head_ct")
    write_head_ct_study(head_ct_nifti, study, patient_id="SAMEID01")
    config = study.parent / "head-config.yaml"
    config.write_text(f"fhir: {{patient_identifier_system: '{DIAGNOSTIC_SYSTEM}'}}\n")
    return _run("ct_tissue", study, tmp_path_factory.mktemp("head_out"), module_monkeypatch, config)


@pytest.fixture(scope="module")
def mri(tmp_path_factory: pytest.TempPathFactory, module_monkeypatch) -> Path:
    """mri_brain on Colin27 written as a 3D T1 MR study of a 45-year-old (birth date and study date given)."""
    study = tmp_path_factory.mktemp("mri")
    write_mr_series(nifti_to_axial_volume(COLIN27), study)
    for path in study.iterdir():
        ds = pydicom.dcmread(path)
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate = "19790301", "M", "20240615"
        ds.save_as(path, enforce_file_format=True)
    return _run("mri_brain", study, tmp_path_factory.mktemp("mri_out"), module_monkeypatch)


@pytest.fixture(scope="module")
def model_ct(totalseg_reference: Path, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model_seg (the site's-model pipeline) with the tiny bundle on the real CT."""
    study = tmp_path_factory.mktemp("model_ct")
    restore_totalseg_dicom(totalseg_reference, study, patient_id="MODEL01")
    out = tmp_path_factory.mktemp("model_out")
    run_app("model_seg", study, out, [tiny_bundle])
    return out


@pytest.fixture(scope="module")
def runs(chest_ct: Path, head_ct: Path, mri: Path, phantom_chest: Path, model_ct: Path) -> dict[str, Path]:
    return {"chest_ct": chest_ct, "head_ct": head_ct, "mri": mri, "phantom_chest": phantom_chest,
            "model_ct": model_ct}


def _bundle(folder: Path) -> dict:
    return json.loads((folder / "fhir-bundle.json").read_text())


def _resources(folder: Path, rtype: str) -> list[dict]:
    return [e["resource"] for e in _bundle(folder)["entry"] if e["resource"]["resourceType"] == rtype]


def _sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {"HEADER": []}
    current = "HEADER"
    for line in text.splitlines():
        if re.fullmatch(r"[A-Z]+:", line):
            current = line[:-1]
            sections[current] = []
        elif line.strip():
            sections[current].append(line)
    return sections


# ------------------------------------------------------------------------------------ clinical validity

def test_head_ct_asserts_no_bone_density_lung_or_liver_finding(head_ct: Path) -> None:
    sections = _sections((head_ct / "report.txt").read_text())
    asserted = " ".join(sections["FINDINGS"] + sections["IMPRESSION"]).lower()
    for word in ("lung", "emphysema", "liver", "steatosis", "osteo", "bone attenuation", "vertebra", "trabecular"):
        assert word not in asserted, (word, asserted)
    not_assessed = " ".join(sections["LIMITATIONS"])
    for what, reason in (("lungs", "does not include the thorax"), ("emphysema", "does not include the thorax"),
                         ("hepatic steatosis", "does not measure the mean liver parenchyma attenuation"),
                         ("low vertebral trabecular attenuation",
                          "does not measure the L1 vertebral body trabecular attenuation")):
        assert re.search(rf"Not assessed: {what}[^.]*: [^.]*{reason}", not_assessed), (what, not_assessed)
    for observation in _resources(head_ct, "Observation"):
        assert "lung" not in observation["bodySite"]["text"].lower()
        assert "referenceRange" not in observation or observation["code"]["text"].startswith("Body")


def _numbers(text: str) -> list[str]:
    return re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w])", text)


def _fhir_values(bundle: dict) -> tuple[set[tuple[float, str]], set[str]]:
    """(value, UCUM unit) of every valueQuantity and reference range limit, and every other string/number."""
    quantities: set[tuple[float, str]] = set()
    texts: set[str] = set()
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "Observation":
            if "valueQuantity" in resource:
                quantities.add((float(resource["valueQuantity"]["value"]), resource["valueQuantity"]["code"]))
            for rng in resource.get("referenceRange", []):
                for bound in ("low", "high"):
                    if bound in rng:
                        quantities.add((float(rng[bound]["value"]), rng[bound]["code"]))
                for bound in rng.get("age", {}).values():
                    quantities.add((float(bound["value"]), "a"))

        def walk(node, key=""):
            if isinstance(node, dict):
                for k, v in node.items():
                    if k not in ("data", "text", "div", "note", "conclusion"):
                        walk(v, k)
            elif isinstance(node, list):
                for v in node:
                    walk(v, key)
            else:
                texts.add(str(node))
        walk(resource)
    return quantities, texts


UNIT_CODES = {"mL": "mL", "HU": "[hnsf'U]", "%": "%"}


@pytest.mark.parametrize("case", ["chest_ct", "phantom_chest"])
def test_every_number_in_the_released_chest_ct_report_is_a_structured_fhir_value(runs: dict[str, Path],
                                                                                 case: str) -> None:
    folder = runs[case]
    text = (folder / "report.txt").read_text()
    sections = _sections(text)
    quantities, texts = _fhir_values(_bundle(folder))
    strings = " ".join(texts)
    dates = {d.replace("-", "") for d in re.findall(r"\d{4}-\d{2}-\d{2}", strings)}
    checked = 0
    for section in ("FINDINGS", "IMPRESSION", "LIMITATIONS"):
        for sentence in sections.get(section, []):
            clean = re.sub(r"LAA-950|-950 HU|\bL1\b", " ", sentence)
            for value, unit in re.findall(r"(-?\d+(?:\.\d+)?)\s*(mL|HU|%)?", clean):
                if not value:
                    continue
                checked += 1
                number = float(value)
                candidates = [q for q, u in quantities if unit == "" or u == UNIT_CODES[unit]]
                assert any(abs(q - number) <= 0.5 * 10 ** -len(value.partition(".")[2]) for q in candidates), \
                    (sentence, value, unit)
    assert checked >= 4
    if "LAA-950" in text:
        assert "-950" in strings  # the LAA-950 threshold is in the concept's own name
    for line in sections["HEADER"]:  # dates, IDs, series numbers, versions are structured values too
        for token in re.findall(r"[\w.-]*\d[\w.-]*", line):
            token = token.strip(".;")
            assert (token.replace("-", "") in dates or any(token in t for t in texts)), (line, token)


def test_mri_brain_report_compares_the_bpf_with_its_age_dependent_reference(mri: Path) -> None:
    for name in ("report-sr.dcm", "report.txt", "report.pdf", "report-pdf.dcm", "uncertainty-map.dcm"):
        assert (mri / name).is_file(), name
    report = _resources(mri, "DiagnosticReport")[0]
    assert report["conclusion"] and report["presentedForm"]
    text = (mri / "report.txt").read_text()
    assert re.search(r"brain parenchymal fraction 0\.\d+.*reference at least 0\.\d+ for age 40 to 49 years", text), text
    bpf = next(o for o in _resources(mri, "Observation") if o["code"]["coding"] and o["code"]["coding"][0]["code"] == "BPF")
    reference = bpf["referenceRange"][0]
    assert reference["age"]["low"]["value"] == 40 and reference["age"]["high"]["value"] == 49
    assert "Vagberg" in reference["text"]
    assert bpf["interpretation"][0]["coding"][0]["system"].endswith("v3-ObservationInterpretation")
    volumes = {o["code"]["text"]: o["valueQuantity"]["value"] for o in _resources(mri, "Observation")
               if o.get("valueQuantity", {}).get("code") == "mL"}
    assert set(volumes) == {"Intracranial contents (brain mask) Volume", "Brain parenchyma Volume"}


def test_bpf_is_not_assessed_without_the_patients_age() -> None:
    brain = np.zeros((4, 4, 4), bool)
    brain[1:3] = True
    result = PipelineResult([Segment(BRAIN_STRUCTURES["intracranial"], brain), Segment(BRAIN_STRUCTURES["brain"], brain)],
                            [Measurement("brain", BPF, 0.82, RATIO)], "test", "1")
    ds = pydicom.Dataset()
    ds.PatientID, ds.PatientBirthDate, ds.StudyDate = "X", "", "20240101"
    findings = structured_findings(result, "MR", identity=StudyIdentity.from_dataset(ds))
    assert findings.findings == []
    assert any("age is not recorded" in n.reason for n in findings.not_assessed)
    ds.PatientAge = "067Y"
    findings = structured_findings(result, "MR", identity=StudyIdentity.from_dataset(ds))
    assert [(f.limit.age_band.min_years, f.present) for f in findings.findings] == [(60, False)]


def test_every_report_opens_with_patient_accession_study_date_and_series(runs: dict[str, Path]) -> None:
    for name, folder in runs.items():
        source = pydicom.dcmread(next(folder.glob("report-sr.dcm")))
        expected = [str(source.PatientName).replace("^", " "), str(source.PatientID), str(source.AccessionNumber),
                    dt.datetime.strptime(str(source.StudyDate), "%Y%m%d").date().isoformat()]
        header = "\n".join((folder / "report.txt").read_text().splitlines()[:4])
        assert all(value in header for value in expected), (name, header)
        assert "Series analysed: series" in header and "Produced by:" in header
        pdf = (folder / "report.pdf").read_bytes()
        streams = b"".join(zlib.decompress(m) for m in re.findall(rb"stream\r?\n(.*?)endstream", pdf, re.S)
                           if m[:1] == b"x")
        assert all(value.encode() in streams for value in expected), name
        encapsulated = pydicom.dcmread(folder / "report-pdf.dcm")
        assert encapsulated.EncapsulatedDocument[:len(pdf)] == pdf and encapsulated.PatientID == source.PatientID
        procedure = [item for item in source.ContentSequence if item.ValueType == "CONTAINER"][0]
        assert procedure.ConceptNameCodeSequence[0].CodeValue == "55111-9"
        assert all(value in " ".join(i.TextValue for i in procedure.ContentSequence) for value in expected)


# ------------------------------------------------------------------------------------------------- FHIR

def test_every_bundle_validates_against_the_official_r4_schema(runs: dict[str, Path]) -> None:
    errors = fhir_schema_errors(*(folder / "fhir-bundle.json" for folder in runs.values()))
    assert all(not e for e in errors.values()), errors


def test_fhir_profile_points(runs: dict[str, Path]) -> None:
    observations = _resources(runs["phantom_chest"], "Observation")
    sites = {o["bodySite"]["text"]: o["bodySite"]["coding"][0]["code"] for o in observations}
    assert sites["Left lung"] == "44029006" and sites["Right lung"] == "3341006"
    for name, folder in runs.items():
        study = _resources(folder, "ImagingStudy")[0]
        result_series = {s["uid"] for s in study["series"][1:]}
        dicom = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in folder.glob("*.dcm")}
        assert result_series == dicom, name
        for o in _resources(folder, "Observation"):
            assert o["identifier"][0]["system"] == "urn:dicom:uid" and o["identifier"][0]["value"].startswith("urn:oid:")
            assert o["partOf"][0]["identifier"]["value"] == study["identifier"][0]["value"]
            assert {"ImagingStudy", "DocumentReference"} <= {r["type"] for r in o["derivedFrom"]}
            assert o["meta"]["security"][0]["code"] == "AIAST" and "device" in o
        provenance = _resources(folder, "Provenance")
        assert len(provenance) == 1 and len(provenance[0]["agent"]) == 2
        assert {e["request"]["method"] for e in _bundle(folder)["entry"]} <= {"PUT", "POST"}
        assert all(e["request"]["method"] == "PUT" or "ifNoneExist" in e["request"] for e in _bundle(folder)["entry"])
    texts = [o["code"]["text"] for o in observations if o["bodySite"]["text"] == "Bone"]
    assert len(set(texts)) == len(texts)  # the SD is not named as the mean
    quality = [o for o in _resources(runs["mri"], "Observation")
               if o["code"]["coding"] and o["code"]["coding"][0]["code"].startswith("UNC-")]
    assert quality and all(i["coding"][0]["code"] != "N" for o in quality for i in o["interpretation"])


def test_retries_never_duplicate_and_id_values_in_other_systems_never_merge(runs: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    import urllib.request

    def post(server: FhirServer, body: bytes) -> None:
        request = urllib.request.Request(server.base_url, data=body, headers={"Content-Type": "application/fhir+json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200

    chest, head = (runs[k] / "fhir-bundle.json" for k in ("chest_ct", "head_ct"))
    with FhirServer(tmp_path / "fhir") as server:
        for _ in range(2):  # a retry after a lost answer
            post(server, chest.read_bytes())
        count = lambda t, q="": server.search(t, f"{q}&_summary=count" if q else "_summary=count")["total"]  # noqa: E731
        observations = len(_resources(runs["chest_ct"], "Observation"))
        assert (count("DiagnosticReport"), count("Observation"), count("Patient")) == (1, observations, 1)
        for entry in _resources(runs["chest_ct"], "Observation"):
            identifier = entry["identifier"][0]
            assert count("Observation", f"identifier={identifier['system']}|{identifier['value']}") == 1
        post(server, head.read_bytes())
        patients = server.search("Patient", "identifier=SAMEID01")["entry"]
        assert len(patients) == 2 and len({p["resource"]["identifier"][0]["system"] for p in patients}) == 2
        assert DIAGNOSTIC_SYSTEM in {p["resource"]["identifier"][0]["system"] for p in patients}
        assert count("DiagnosticReport") == 2


# ------------------------------------------------------------------------------------------------ DICOM

def test_every_dicom_output_passes_dciodvfy(runs: dict[str, Path]) -> None:
    for name, folder in runs.items():
        for path in sorted(folder.glob("*.dcm")):
            assert dciodvfy_errors(path) == [], (name, path.name)


def test_dcmqi_reads_every_seg_and_sr(runs: dict[str, Path], tmp_path: Path) -> None:
    for name, folder in runs.items():
        out = tmp_path / name
        out.mkdir()
        dcmqi("segimage2itkimage", "--inputDICOM", str(folder / "seg.dcm"), "--outputDirectory", str(out),
              "--outputType", "nii")
        assert list(out.glob("*.nii*")), name
        dcmqi("tid1500reader", "--inputDICOM", str(folder / "sr.dcm"), "--outputMetadata", str(out / "sr.json"))
        groups = json.loads((out / "sr.json").read_text())["Measurements"]
        assert groups and all(g["measurementItems"] for g in groups), name


@pytest.mark.parametrize("name", ["mri", "model_ct"])
def test_dcmqi_places_the_parametric_map_where_its_frames_say(runs: dict[str, Path], name: str,
                                                              tmp_path: Path) -> None:
    mri = runs[name]
    dcmqi("paramap2itkimage", "--inputDICOM", str(mri / "uncertainty-map.dcm"), "--outputDirectory", str(tmp_path),
          "--outputType", "nii")
    image = nib.load(str(next(tmp_path.glob("*.nii*"))))
    volume = np.asarray(image.dataobj, dtype=np.float32)
    ras_from_voxel = image.affine
    pm = pydicom.dcmread(mri / "uncertainty-map.dcm")
    frames = pm.pixel_array
    voxel_from_ras = np.linalg.inv(ras_from_voxel)
    for index in (0, len(frames) // 3, len(frames) // 2, len(frames) - 1):
        lps = np.asarray(pm.PerFrameFunctionalGroupsSequence[index].PlanePositionSequence[0].ImagePositionPatient, float)
        i, j, k = np.rint(voxel_from_ras @ np.array([-lps[0], -lps[1], lps[2], 1.0]))[:3].astype(int)
        assert (i, j) == (0, 0), (index, i, j)
        np.testing.assert_allclose(volume[:, :, k].T, frames[index], atol=1e-6, err_msg=f"frame {index}")


CROSS_SECTION_ERROR = re.compile(r'^Error: Template 1411 VolumetricROIMeasurements/\[Row 1\] CONTAINER '
                                 r'\(125007,DCM,"Measurement Group"\)/\[Row (5|7|10)\] .*within (1\.9\.\d+): .*'
                                 r'Missing conditional content item$')
"""The one PixelMed complaint the conformance statement documents: its TID 1500 rule checks every measurement
group against TID 1411, so a TID 1501 group (the cross-section outline with its area) lacks 1411's region."""


def test_pixelmed_reports_no_errors_but_the_documented_tid_1501_one(runs: dict[str, Path]) -> None:
    conformance = (Path(__file__).resolve().parents[1] / "docs" / "conformance.md").read_text()
    assert "PixelMed" in conformance and "TID 1501" in conformance
    for name, file in (("phantom_chest", "sr.dcm"), ("mri", "sr.dcm"), ("mri", "report-sr.dcm"),
                       ("model_ct", "sr.dcm")):
        sr = pydicom.dcmread(runs[name] / file)
        groups = sr.ContentSequence[-1].ContentSequence if file == "sr.dcm" else []
        cross_sections = {f"1.9.{n}" for n, g in enumerate(groups, start=1)
                          if any(c.ValueType == "TEXT" and c.ConceptNameCodeSequence[0].CodeValue == "112039"
                                 and c.TextValue.startswith("Cornerstone3DTools") for c in g.ContentSequence)}
        for error in pixelmed_sr_errors(runs[name] / file):
            match = CROSS_SECTION_ERROR.match(error)
            assert match and match.group(2) in cross_sections, (name, file, error)


# ------------------------------------------------------------------------------------ study composition

def _edit(paths: list[Path], **attributes: str) -> None:
    """Rewrite attributes of written files, as a misconfigured sender would have them."""
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)


def test_a_folder_mixing_two_patients_is_refused_naming_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_chest_phantom(tmp_path / "in" / "a", n_slices=12, rows=32, columns=32)
    second = write_chest_phantom(tmp_path / "in" / "b", n_slices=12, rows=32, columns=32)
    _edit(second, PatientID="OTHER0002", PatientName="Other^Patient")
    with pytest.raises(InputError, match=r"2 patients .*PHANTOM001.*OTHER0002|OTHER0002.*PHANTOM001"):
        read_study_folder(tmp_path / "in")
    with pytest.raises(Exception, match="PHANTOM001") as refused:
        run_app("ct_tissue", tmp_path / "in", tmp_path / "out")
    assert "OTHER0002" in str(refused.value)
    # the same ID with another birth date: the series disagree on who the patient is
    first = pydicom.dcmread(next((tmp_path / "in" / "a").iterdir()))
    _edit(second, PatientID="PHANTOM001", PatientName=first.PatientName, PatientBirthDate="19991231")
    with pytest.raises(InputError, match="disagree on patient identity"):
        read_study_folder(tmp_path / "in")


def test_missing_patient_data_degrades_into_warnings(tmp_path: Path) -> None:
    _edit(write_chest_phantom(tmp_path / "in"), PatientID="", StudyDate="2024136")
    run_app("ct_tissue", tmp_path / "in", tmp_path / "out")
    manifest = RunManifest.read(tmp_path / "out")
    assert {"seg.dcm", "sr.dcm", "report-sr.dcm"} <= {o.file for o in manifest.outputs}
    assert any("Patient ID" in w for w in manifest.warnings) and any("Study Date" in w for w in manifest.warnings)
    bundle = _bundle(tmp_path / "out")
    assert not [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    report = _resources(tmp_path / "out", "DiagnosticReport")[0]
    assert report["subject"]["extension"][0]["url"].endswith("data-absent-reason")
    assert "effectiveDateTime" not in report
    assert fhir_schema_errors(tmp_path / "out" / "fhir-bundle.json") == {str(tmp_path / "out" / "fhir-bundle.json"): []}
