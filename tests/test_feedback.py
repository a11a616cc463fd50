"""The feedback loop: a clinician's corrected SEG comes back, is matched to its job and measured, never processed.

The node runs the real ct_tissue pipeline (``radnode run``) on a phantom CT received from DCMTK's storescu; the
correction is a new SEG written by highdicom from another creator (segments eroded and dilated by a few
voxels) and sent back with storescu. Its figures are checked against Dice, volumes and HD95 computed here
with numpy and scipy alone, on masks read here with pydicom alone.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from factories import (
    ACCESSION, PATIENT, deliver_results_and_a_pdf, egress_test_config, independent_agreement, metric_value,
    rejected_uids, seg_masks_by_source, selected_uids, spacing_of, study_version_job, write_chest_phantom,
    write_correction, write_results, write_study,
)
from pydicom import Dataset
from pydicom.uid import ComprehensiveSRStorage, CTImageStorage, KeyObjectSelectionDocumentStorage, generate_uid

from radnode.console.accounts import Role
from radnode.feedback.reissue import report_identifier
from radnode.node.egress import Egress, outbox_dir
from radnode.node.service import Node
from radnode.node.store import FINAL_STATES, ActionRefused, Instance, Job, JobState, JobStore
from radnode.outputs.layout import review_of
from radnode.pipelines.routing import SeriesDecision
from radnode.peers import FhirServer, StoreSCP
from support.console import api, api_json, token_for
from support.dicom_tools import dciodvfy_errors, storescu
from support.node import final_job, node_config
from support.waiting import wait_until


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A node running the real pipelines (``radnode run``) with its web service, matching corrections at once."""
    with Node(node_config(tmp_path, feedback={"preload_metrics": True}), poll_seconds=0.1) as running:
        yield running


@pytest.mark.slow
def test_a_corrected_seg_sent_back_is_matched_to_its_job_measured_and_never_processed(
        node: Node, tmp_path: Path) -> None:
    source = write_chest_phantom(tmp_path / "ct", 40, 64, 64)
    assert storescu(node.port, tmp_path / "ct").returncode == 0
    wait_until(lambda: len(node.jobs()) == 1)
    job = final_job(node, node.jobs()[0].id, timeout=120)
    assert (job.state, job.pipeline) == (JobState.DONE, "ct_tissue"), job.reason
    result_seg = outbox_dir(node.config, job.id) / "seg.dcm"

    (tmp_path / "correction").mkdir()
    corrected = write_correction(result_seg, source, tmp_path / "correction" / "seg.dcm",
                                 {"Right lung": -2, "Bone": 1})
    assert storescu(node.port, tmp_path / "correction", calling_ae="WORKSTATION", options=("-R",)).returncode == 0
    token = token_for(node, Role.VIEWER)
    wait_until(lambda: [c["state"] for c in api_json(node, "/api/corrections", token)["corrections"]] not in ([], ["pending"]),
               timeout=60)
    assert [c["state"] for c in api_json(node, "/api/corrections", token)["corrections"]] == ["matched"], \
        api_json(node, "/api/corrections", token)

    answer = api_json(node, f"/api/jobs/{job.id}", token)
    (correction,) = answer["corrections"]
    assert correction["result_sop_instance_uid"] == pydicom.dcmread(result_seg, stop_before_pixels=True).SOPInstanceUID
    ours = seg_masks_by_source(result_seg, source)
    spacing = spacing_of(source)
    by_label = {s["segment"]: s for s in correction["segments"]}
    assert set(by_label) == {"Body", "Left lung", "Right lung", "Bone", "Adipose tissue", "Skeletal muscle"}
    for figures in correction["segments"]:
        number = figures["result_segment_number"]
        expected = independent_agreement(ours[number], corrected[number], spacing)
        for name, value in expected.items():
            assert figures[name] == pytest.approx(value, abs=1e-3), (figures["segment"], name)
        difference = expected["corrected_volume_ml"] - expected["result_volume_ml"]
        assert figures["volume_difference_ml"] == pytest.approx(difference, abs=1e-3)
        assert figures["volume_difference_percent"] == pytest.approx(100 * difference / expected["result_volume_ml"],
                                                                     abs=1e-3)
    assert by_label["Right lung"]["dice"] < 0.95 and by_label["Right lung"]["volume_difference_ml"] < 0
    assert by_label["Bone"]["dice"] < 0.95 and by_label["Bone"]["volume_difference_ml"] > 0
    assert by_label["Left lung"]["dice"] == 1 and by_label["Left lung"]["hd95_mm"] == 0
    assert by_label["Right lung"]["property_type"].endswith(", Right")  # laterality told the lungs apart

    # drift recorded the real run: the input's headers and noise, and each measurement of its report
    (inputs, outputs), = [[json.loads(c) if isinstance(c, str) else c for c in row]
                          for row in node.store.read_rows("SELECT inputs, outputs FROM drift_observations", {})]
    assert inputs["slice_thickness_mm"] == 2.5 and inputs["noise_hu"] == pytest.approx(10, rel=0.15)
    assert sum(name.endswith("(mL)") for name in outputs) >= 5, outputs  # a volume per structure

    # never processed: still the one job, run once, and the correction is in its log, not a job's input
    assert [(j.id, j.runs) for j in node.jobs()] == [(job.id, 1)]
    assert "correction" in [e.kind for e in node.events(job.id)]
    listed = api_json(node, "/api/corrections", token)["corrections"]
    assert [(c["state"], c["job_id"], c["calling_ae"]) for c in listed] == [("matched", job.id, "WORKSTATION")]

    # exported per correction and segment, without the patient unless an allowed role asks for them
    identifiers = (PATIENT["PatientID"], PATIENT["PatientName"], PATIENT["PatientBirthDate"], ACCESSION)
    for role in (Role.VIEWER, Role.OPERATOR):
        with api(node, token_for(node, role, f"export-{role}")) as client:
            as_csv = client.get("/api/export/agreement", params={"format": "csv"})
            as_json = client.get("/api/export/agreement", params={"format": "json"})
            assert (as_csv.status_code, as_json.status_code) == (200, 200), (as_csv.text, as_json.text)
            assert client.get("/api/export/agreement", params={"identifiers": "true"}).status_code == 403
        assert not [i for i in identifiers for text in (as_csv.text, as_json.text) if i in text], role
        assert job.study_instance_uid not in as_csv.text + as_json.text
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert sorted(r["segment"] for r in rows) == sorted(by_label)
    assert {r["segment"]: float(r["dice"]) for r in rows} == pytest.approx(
        {label: figures["dice"] for label, figures in by_label.items()})
    assert as_json.json()["rows"][0].keys() == rows[0].keys()
    with api(node, token_for(node, Role.ADMIN, "quality-lead")) as client:
        full = client.get("/api/export/agreement", params={"format": "csv", "identifiers": "true"})
    assert full.status_code == 200 and all(i in full.text for i in identifiers), full.text[:500]


def test_a_correction_that_fits_no_job_is_kept_and_listed_with_why(tmp_path: Path) -> None:
    """A corrected SEG of a series the node never processed: recorded, listed ``unmatched``, no job runs."""
    from factories import phantom_result
    from radnode.imaging.series import VolumeCriteria, load_volume
    from radnode.outputs.algorithm import AlgorithmInfo
    from radnode.outputs.seg import build_segmentation

    source = write_chest_phantom(tmp_path / "ct", 12, 24, 24)
    volume, _ = load_volume(tmp_path / "ct", VolumeCriteria())
    build_segmentation(volume, phantom_result(volume).segments, AlgorithmInfo("ct_tissue", "0.1.0"),
                       uid_root="1.2.826.0.1.3680043.8.498.").save_as(tmp_path / "ours.dcm")
    (tmp_path / "correction").mkdir()
    write_correction(tmp_path / "ours.dcm", source, tmp_path / "correction" / "seg.dcm", {"Body": -1})
    with Node(node_config(tmp_path), poll_seconds=0.1) as node:
        _unmatched_correction_is_listed(node, tmp_path, source)


def _unmatched_correction_is_listed(node: Node, tmp_path: Path, source: list[Path]) -> None:
    assert storescu(node.port, tmp_path / "correction", calling_ae="WORKSTATION", options=("-R",)).returncode == 0
    token = token_for(node, Role.VIEWER)
    wait_until(lambda: [c["state"] for c in api_json(node, "/api/corrections", token)["corrections"]] == ["unmatched"])
    (listed,) = api_json(node, "/api/corrections", token)["corrections"]
    series = pydicom.dcmread(source[0], stop_before_pixels=True).SeriesInstanceUID
    assert listed["job_id"] is None and f"no job received its source series {series}" in listed["message"]
    wait_until(lambda: node.jobs() and node.jobs()[0].state is JobState.DONE)
    (job,) = node.jobs()
    assert job.pipeline == "" and job.runs == 0 and "correction candidate" in (job.reason or "")


# --- local performance ------------------------------------------------------------------------------

LUNG_EROSION = [0, 0, 1, 0, 1, 2, 1, 2, 3, 2]
"""Voxels the radiologist takes off the left lung, study by study: unchanged, then more and more, not in step
with the uncertainty (which rises study by study), so the ranking is imperfect."""


@pytest.mark.slow
def test_local_performance_after_corrections_on_ten_studies_in_the_cli_plot_metrics_and_dashboard(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, playwright_core: Path) -> None:
    import os
    import subprocess
    import sys

    from scipy import stats

    from support.node import SEG_STAND_IN

    script = tmp_path / "seg_stand_in.py"
    script.write_text(SEG_STAND_IN)
    config = node_config(tmp_path, feedback={"preload_metrics": True}, processing={"max_concurrent_jobs": 2},
                         ingress={"study_idle_seconds": 3})  # one job per study, however loaded the machine
    sources: dict[str, list[Path]] = {}
    uncertainty: dict[str, float] = {}
    for k in range(10):
        source = write_chest_phantom(tmp_path / f"study{k}", 16, 48, 48, seed=k)
        study = str(pydicom.dcmread(source[0], stop_before_pixels=True).StudyInstanceUID)
        sources[study], uncertainty[study] = source, round(0.1 + 0.08 * k, 2)
        monkeypatch.setenv(f"SEG_STAND_IN_UNCERTAINTY_{study}", str(uncertainty[study]))  # the node's jobs get it
    with Node(config, job_command=[sys.executable, str(script)], poll_seconds=0.1) as node:
        for k in range(10):
            assert storescu(node.port, tmp_path / f"study{k}").returncode == 0
        wait_until(lambda: len(node.jobs()) == 10 and all(j.state in FINAL_STATES for j in node.jobs()), timeout=300)
        assert [j.state for j in node.jobs()] == [JobState.DONE] * 10, [j.reason for j in node.jobs()]
        pairs, needed, flagged, lung_dice = [], [], [], []
        for k, study in enumerate(sources):
            (job,) = [j for j in node.jobs() if j.study_instance_uid == study]
            result_seg = outbox_dir(node.config, job.id) / "seg.dcm"
            folder = tmp_path / f"correction{k}"
            folder.mkdir()
            corrected = write_correction(result_seg, sources[study], folder / "seg.dcm",
                                         {"Left lung": -LUNG_EROSION[k]})
            assert storescu(node.port, folder, calling_ae="WORKSTATION", options=("-R",)).returncode == 0
            ours = seg_masks_by_source(result_seg, sources[study])
            for number in sorted(ours):
                dice = independent_agreement(ours[number], corrected[number], spacing_of(sources[study]))["dice"]
                pairs.append((uncertainty[study], 1 - dice))
                if number == 2:
                    lung_dice.append(dice)
            needed.append(LUNG_EROSION[k] > 0)
            flagged.append(uncertainty[study] > 0.5)
        token = token_for(node, Role.VIEWER)
        wait_until(lambda: [c["state"] for c in api_json(node, "/api/corrections", token)["corrections"]]
                   == ["matched"] * 10, timeout=120)
        rho = stats.spearmanr(*zip(*pairs)).statistic
        negatives = [f for f, n in zip(flagged, needed) if not n]
        positives = [f for f, n in zip(flagged, needed) if n]
        auroc = stats.mannwhitneyu(positives, negatives).statistic / (len(positives) * len(negatives))

        token_file = tmp_path / "token"
        token_file.write_text(token)
        cli = subprocess.run([sys.executable, "-m", "radnode", "performance", "--url",
                              f"http://127.0.0.1:{node.api_port}", "--token-file", str(token_file),
                              "--plot", str(tmp_path / "performance.png")], capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        lines = cli.stdout.splitlines()
        assert "studies processed 10, reviewed 10: accepted unchanged 3, corrected 7, rejected 0" in cli.stdout
        (lung,) = [line.split() for line in lines if line.strip().startswith("Left lung")]
        assert (lung[2], float(lung[3]), float(lung[4])) == ("10", pytest.approx(np.median(lung_dice), abs=1e-3),
                                                            pytest.approx(np.percentile(lung_dice, 10), abs=1e-3))
        assert f"Spearman(UNC-BOUNDARY, 1 - Dice) = {rho:.3f} over 60 corrected segments" in cli.stdout
        assert f"review flag AUROC for 'needed a correction': {auroc:.3f}" in cli.stdout
        assert (tmp_path / "performance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        with api(node, token_for(node, Role.ADMIN, "scraper")) as client:
            metrics = client.get("/metrics").text
        assert metric_value(metrics, "radnode_uncertainty_spearman", pipeline="ct_tissue",
                       score="UNC-BOUNDARY") == pytest.approx(rho, abs=1e-3)
        assert metric_value(metrics, "radnode_correction_dice", pipeline="ct_tissue", segment="Left lung",
                       statistic="median") == pytest.approx(np.median(lung_dice), abs=1e-3)
        assert metric_value(metrics, "radnode_correction_dice", pipeline="ct_tissue", segment="Left lung",
                       statistic="worst_decile") == pytest.approx(np.percentile(lung_dice, 10), abs=1e-3)
        assert metric_value(metrics, "radnode_review_flag_auroc", pipeline="ct_tissue") == pytest.approx(auroc, abs=1e-3)
        assert metric_value(metrics, "radnode_studies_feedback", pipeline="ct_tissue", outcome="corrected") == 7

        node.accounts.add_user("quality", Role.VIEWER, "a long enough password")
        browser = subprocess.run(
            ["node", str(Path(__file__).parent / "support" / "performance_browser.cjs")], capture_output=True,
            text=True, timeout=180,
            env={**os.environ, "PLAYWRIGHT_CORE": str(playwright_core), "CONSOLE_URL": f"http://127.0.0.1:{node.api_port}",
                 "CONSOLE_USER": "quality", "CONSOLE_PASSWORD": "a long enough password"})
        assert browser.returncode == 0, browser.stdout + browser.stderr
        (shown,) = json.loads(browser.stdout.strip().splitlines()[-1].removeprefix("FIGURES "))
        assert shown["pipeline"] == "ct_tissue"
        assert shown["segments"]["Left lung"] == [f"{np.median(lung_dice):.3f}", f"{np.percentile(lung_dice, 10):.3f}"]
        assert shown["spearman"] == {"UNC-BOUNDARY": f"Spearman(UNC-BOUNDARY, 1 - Dice) = {rho:.3f}"}
        assert shown["auroc"] == f"review flag AUROC for 'needed a correction': {auroc:.3f}"


# --- review decisions -------------------------------------------------------------------------------


def test_review_decisions_are_recorded_with_the_reviewer_and_counted_in_local_performance(
        tmp_path: Path, stand_in: list[str]) -> None:
    import json
    import subprocess
    import sys

    from factories import write_study

    with Node(node_config(tmp_path), job_command=stand_in, poll_seconds=0.05) as node:
        for name in ("accepted", "rejected", "corrected"):
            write_study(tmp_path / name, n=2, patient_id=name.upper())
            assert storescu(node.port, tmp_path / name).returncode == 0
        wait_until(lambda: len(node.jobs()) == 3 and all(j.state in FINAL_STATES for j in node.jobs()), timeout=60)
        jobs = {j.patient_id.lower(): j.id for j in node.jobs()}
        assert all(j.state is JobState.DONE for j in node.jobs()), [j.reason for j in node.jobs()]
        with api(node, token_for(node, Role.VIEWER, "student")) as viewer:
            assert viewer.post(f"/api/jobs/{jobs['accepted']}/review", json={"decision": "accepted"}).status_code == 403
        with api(node, token_for(node, Role.OPERATOR, "dr-lee")) as client:
            answer = client.post(f"/api/jobs/{jobs['accepted']}/review", json={"decision": "accepted"})
            assert answer.status_code == 200 and answer.json()["message"] == \
                f"job {jobs['accepted']} accepted by token:dr-lee"
            assert client.post(f"/api/jobs/{jobs['rejected']}/review", json={"decision": "rejected"}).status_code == 409
            assert client.post(f"/api/jobs/{jobs['rejected']}/review",
                               json={"decision": "rejected", "reason": "because"}).status_code == 422
            assert client.post(f"/api/jobs/{jobs['rejected']}/review",
                               json={"decision": "rejected", "reason": "wrong-series",
                                     "note": "the scout was sent"}).status_code == 200
        token_file = tmp_path / "token"
        token_file.write_text(token_for(node, Role.OPERATOR, "dr-kim"))
        cli = subprocess.run([sys.executable, "-m", "radnode", "jobs", "review", str(jobs["corrected"]),
                              "--decision", "corrected", "--url", f"http://127.0.0.1:{node.api_port}",
                              "--token-file", str(token_file)], capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0 and cli.stdout.strip() == f"job {jobs['corrected']} corrected by token:dr-kim", cli.stderr
        said = {name: [e.message for e in node.events(job) if e.kind == "reviewed"] for name, job in jobs.items()}
        assert said == {"accepted": ["accepted by token:dr-lee"],
                        "rejected": ["rejected by token:dr-lee: wrong-series; the scout was sent"],
                        "corrected": ["corrected by token:dr-kim"]}
        (figures,) = api_json(node, "/api/performance", token_for(node, Role.VIEWER))["pipelines"]
        assert (figures["processed"], figures["reviewed"], figures["accepted_unchanged"], figures["corrected"],
                figures["rejected"]) == (3, 3, 1, 1, 1)

        # the decisions exported: without patient identifiers for an operator, with them for an admin who asks
        cli = subprocess.run([sys.executable, "-m", "radnode", "export", "reviews", "--format", "csv",
                              "--url", f"http://127.0.0.1:{node.api_port}", "--token-file", str(token_file)],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        rows = list(csv.DictReader(io.StringIO(cli.stdout)))
        assert sorted((r["job_id"], r["decision"], r["reason"], r["reviewer"]) for r in rows) == sorted([
            (str(jobs["accepted"]), "accepted", "", "token:dr-lee"),
            (str(jobs["rejected"]), "rejected", "wrong-series", "token:dr-lee"),
            (str(jobs["corrected"]), "corrected", "", "token:dr-kim")])
        assert all(r["at"] for r in rows) and "note" not in rows[0]  # free text may name the patient
        reviews_json = api_json(node, "/api/export/reviews?format=json", token_for(node, Role.OPERATOR))
        performance = api_json(node, "/api/export/performance?format=json", token_for(node, Role.VIEWER, "board"))
        exported = cli.stdout + json.dumps(reviews_json) + json.dumps(performance)
        assert not [p for p in ("ACCEPTED", "REJECTED", "CORRECTED", "Test^Patient") if p in exported]
        assert [(r["pipeline"], r["processed"], r["rejected"]) for r in performance["rows"]] == [(figures["pipeline"], 3, 1)]
        full = {r["job_id"]: r for r in api_json(node, "/api/export/reviews?format=json&identifiers=true",
                                                 token_for(node, Role.ADMIN, "quality-lead"))["rows"]}
        assert (full[jobs["rejected"]]["patient_id"], full[jobs["rejected"]]["patient_name"],
                full[jobs["rejected"]]["note"]) == ("REJECTED", "Test^Patient", "the scout was sent")
        trail = (node.config.data_dir / "audit" / "audit.log").read_text().splitlines()
        done = [line for line in trail if 'EventOutcomeIndicator="0"' in line]
        assert [next(u for u in ("dr-lee", "dr-kim") if u in line) for d in ("accepted", "rejected", "corrected")
                for line in done if f">review-{d}<" in line] == ["dr-lee", "dr-lee", "dr-kim"]
        (tried,) = [line for line in trail if ">review-rejected<" in line and 'EventOutcomeIndicator="4"' in line]
        assert "refused: a rejection needs a reason" in tried  # the 409 attempt is on record too (the 422 never ran)
        audited = [line for line in trail if "export/reviews" in line]
        assert [("token:dr-kim" in line, "identifiers removed" in line, "identifiers included" in line)
                for line in audited] == [(True, True, False), (False, True, False), (False, False, True)], audited
        assert "token:quality-lead" in audited[-1]


@pytest.mark.slow
def test_a_correction_stored_to_orthanc_reaches_the_node_and_is_matched_the_same_way(tmp_path: Path) -> None:
    """The CT and then the radiologist's corrected SEG go to Orthanc (as OHIF's or Slicer's store would); the
    radnode plugin hands both to the node: the CT is processed, the correction matched, nothing else runs."""
    from radnode.config import Config
    from radnode.orthanc_config import write_event_token
    from radnode.peers import free_port
    from radnode.viewer import OrthancServer

    source = write_chest_phantom(tmp_path / "ct", 24, 48, 48)
    api_port, token_file = free_port(), tmp_path / "event-token"
    write_event_token(token_file)
    with OrthancServer(node_url=f"http://127.0.0.1:{api_port}", stable_age=1, event_token_file=token_file) as orthanc:
        config = Config.model_validate({
            "data_dir": str(tmp_path / "data"), "ingress": {"host": "127.0.0.1", "port": 0},
            "orthanc": {"url": orthanc.url, "event_token_file": str(token_file)}, "api": {"port": api_port},
            "processing": {"job_timeout_seconds": 300}})
        with Node(config, poll_seconds=0.1) as node:
            sent = storescu(orthanc.dicom_port, tmp_path / "ct", calling_ae="CT_SCANNER", called_ae=orthanc.aet)
            assert sent.returncode == 0, sent.stderr
            wait_until(lambda: node.jobs() and node.jobs()[0].state in FINAL_STATES, timeout=300)
            (job,) = node.jobs()
            assert job.state is JobState.DONE, job.reason
            result_seg = outbox_dir(config, job.id) / "seg.dcm"
            (tmp_path / "correction").mkdir()
            corrected = write_correction(result_seg, source, tmp_path / "correction" / "seg.dcm", {"Left lung": -1})
            sent = storescu(orthanc.dicom_port, tmp_path / "correction", calling_ae="WORKSTATION",
                            called_ae=orthanc.aet, options=("-R",))
            assert sent.returncode == 0, sent.stderr
            token = token_for(node, Role.VIEWER)
            wait_until(lambda: [c["state"] for c in api_json(node, f"/api/jobs/{job.id}", token)["corrections"]]
                       == ["matched"], timeout=120)
            (correction,) = api_json(node, f"/api/jobs/{job.id}", token)["corrections"]
            lung = next(s for s in correction["segments"] if s["segment"] == "Left lung")
            ours = seg_masks_by_source(result_seg, source)[lung["result_segment_number"]]
            expected = independent_agreement(ours, corrected[lung["result_segment_number"]], spacing_of(source))
            assert lung["dice"] == pytest.approx(expected["dice"], abs=1e-3) and lung["dice"] < 1
            assert lung["hd95_mm"] == pytest.approx(expected["hd95_mm"], abs=1e-3)
            assert [(j.id, j.runs) for j in node.jobs()] == [(job.id, 1)]  # never processed


def _by_sop_class(pacs: StoreSCP) -> dict[str, list[Dataset]]:
    """What the PACS received, by SOP Class UID, in order of arrival."""
    found: dict[str, list[Dataset]] = {}
    for path in pacs.received():
        ds = pydicom.dcmread(path)
        ds.filename = str(path)
        found.setdefault(str(ds.SOPClassUID), []).append(ds)
    return found


def _report_status(fhir, identifier: dict) -> tuple[str, list]:  # type: ignore[no-untyped-def]
    """(status, resultsInterpreter) of the study's one DiagnosticReport on the server, and its Observations'
    statuses must agree with it."""
    (entry,) = fhir.search("DiagnosticReport", f"identifier={identifier['system']}|{identifier['value']}")["entry"]
    report = entry["resource"]
    statuses = {o["resource"]["status"] for o in fhir.search("Observation", "_count=500")["entry"]}
    assert statuses == {report["status"]}, statuses
    return report["status"], report.get("resultsInterpreter", [])


def _one_done_job(node: Node, study: Path) -> Job:
    """Send ``study`` to the node and wait for its one job to be done."""
    assert storescu(node.port, study).returncode == 0
    wait_until(lambda: node.jobs() and node.jobs()[0].state in FINAL_STATES, timeout=180)
    (job,) = node.jobs()
    assert job.state is JobState.DONE, job.reason
    return job


def _settled(node: Node, job_id: int) -> JobState:
    """The job's state once its deliveries (a re-issue's too) are settled."""
    return final_job(node, job_id, timeout=60).state


@pytest.mark.slow
def test_review_decisions_reissue_a_verified_report_sr_or_a_rejection_note_and_the_fhir_report_once(
        tmp_path: Path, pacs: StoreSCP, fhir) -> None:  # type: ignore[no-untyped-def]
    """The real ct_tissue run's report SR reaches the PACS unverified and the FHIR report preliminary. Accepted:
    a new SR instance in the same series, verified by the reviewer, naming the original as predecessor, and the
    FHIR report final; the same decision again sends nothing; corrected: another verified version (amended);
    rejected: an IOCM rejection note withdrawing every object the PACS got, the FHIR report entered-in-error.
    Each object is read back from the PACS (DCMTK storescp) and checked with dciodvfy."""

    write_chest_phantom(tmp_path / "ct", 16, 48, 48)
    config = node_config(tmp_path, feedback={"verifying_organization": "General Hospital"},
                         egress={"destinations": {"pacs": pacs.destination, "ehr": fhir.destination}})
    with Node(config, poll_seconds=0.1) as node:
        job = _one_done_job(node, tmp_path / "ct")
        identifier = report_identifier(outbox_dir(config, job.id))
        assert _report_status(fhir, identifier) == ("preliminary", [])
        (original,) = _by_sop_class(pacs)[ComprehensiveSRStorage]
        assert (original.CompletionFlag, original.VerificationFlag) == ("PARTIAL", "UNVERIFIED")
        first_results = {ds.SOPInstanceUID for group in _by_sop_class(pacs).values() for ds in group}

        with api(node, token_for(node, Role.OPERATOR, "dr-lee")) as client:
            def decide(decision: str, **extra: str) -> str:
                answer = client.post(f"/api/jobs/{job.id}/review", json={"decision": decision, **extra})
                assert answer.status_code == 200, answer.text
                assert _settled(node, job.id) is JobState.DONE, node.job(job.id).reason
                return answer.json()["message"]

            assert "re-issue queued" in decide("accepted")
            assert _report_status(fhir, identifier) == ("final", [{"display": "token:dr-lee"}])
            _, verified = _by_sop_class(pacs)[ComprehensiveSRStorage]
            assert (verified.CompletionFlag, verified.VerificationFlag, verified.PreliminaryFlag) == \
                ("COMPLETE", "VERIFIED", "FINAL")
            (observer,) = verified.VerifyingObserverSequence
            assert (str(observer.VerifyingObserverName), observer.VerifyingOrganization) == \
                ("token:dr-lee", "General Hospital")
            assert (verified.SeriesInstanceUID, verified.SeriesNumber, verified.InstanceNumber) == \
                (original.SeriesInstanceUID, 903, 2) and verified.SOPInstanceUID != original.SOPInstanceUID
            (predecessor,) = verified.PredecessorDocumentsSequence
            (series,) = predecessor.ReferencedSeriesSequence
            assert (predecessor.StudyInstanceUID, series.SeriesInstanceUID,
                    series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) == \
                (original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
            assert verified.ContentSequence == original.ContentSequence  # the report's text is what was verified
            assert dciodvfy_errors(Path(verified.filename)) == []  # the content is the original's, which
            # tests/test_clinical_outputs.py checks with PixelMed's template validator (28 s here: not again)

            received = len(pacs.received())
            assert decide("accepted") == f"job {job.id} accepted by token:dr-lee; already re-issued as accepted " \
                                         "by token:dr-lee: nothing sent again"
            assert len(pacs.received()) == received
            assert [p.name for p in outbox_dir(config, job.id).glob("review-*")] == ["review-1"]  # nothing written

            decide("corrected")
            assert _report_status(fhir, identifier) == ("amended", [{"display": "token:dr-lee"}])
            *_, amended = _by_sop_class(pacs)[ComprehensiveSRStorage]
            assert amended.InstanceNumber == 3 and amended.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[
                0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == verified.SOPInstanceUID

            decide("rejected", reason="wrong-anatomy")
            assert _report_status(fhir, identifier) == ("entered-in-error", [{"display": "token:dr-lee"}])
            (note,) = _by_sop_class(pacs)[KeyObjectSelectionDocumentStorage]
            assert note.ConceptNameCodeSequence[0].CodeValue == "113001"  # Rejected for Quality Reasons
            withdrawn = {item.ReferencedSOPInstanceUID for study in note.CurrentRequestedProcedureEvidenceSequence
                         for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
            assert withdrawn == first_results | {verified.SOPInstanceUID, amended.SOPInstanceUID}
            assert dciodvfy_errors(Path(note.filename)) == []

            received = len(pacs.received())  # withdrawn for good: no later decision brings the results back
            for later in ({"decision": "accepted"}, {"decision": "rejected", "reason": "wrong-anatomy"}):
                refused = client.post(f"/api/jobs/{job.id}/review", json=later)
                assert refused.status_code == 409 and "were rejected" in refused.json()["detail"], refused.text
            assert len(pacs.received()) == received
            trail = (config.data_dir / "audit" / "audit.log").read_text().splitlines()
            tried = [line for line in trail if ">review-accepted<" in line and 'EventOutcomeIndicator="4"' in line]
            assert len(tried) == 1 and "refused: job" in tried[0] and "were rejected" in tried[0]  # tried, on record
        reissued = [d for d in node.store.deliveries(job.id) if d.object.startswith("review-")]
        assert sorted((d.destination, d.object.split("/")[1], d.state, d.attempts) for d in reissued) == [
            ("ehr", "fhir-reissue.json", "done", 1)] * 3 + [("pacs", "rejection-note.dcm", "done", 1)] + [
            ("pacs", "report-sr.dcm", "done", 1)] * 2
        assert len(fhir.search("DiagnosticReport")["entry"]) == 1  # updated in place, never a second report


def test_a_rejection_sends_each_destination_a_note_of_only_what_it_received(tmp_path: Path, pacs: StoreSCP) -> None:
    """The job's report SR and SEG went to the PACS and to the archive, its Encapsulated PDF to the archive alone
    (``encapsulated_pdf``); a reviewer rejects the results. Each destination's rejection note (read back from its
    storescp, checked with dciodvfy) references exactly what that destination received: the PACS's never the PDF
    it was never sent (nor its UID)."""
    with StoreSCP(tmp_path / "archive") as archive:
        config = egress_test_config(tmp_path, {"pacs": pacs.destination,
                                               "archive": {**archive.destination, "encapsulated_pdf": True}})
        store = JobStore(tmp_path / "data" / "radnode.db")
        egress = Egress(config, store)
        job = study_version_job(store, "1.1")
        both, pdf_uid = deliver_results_and_a_pdf(egress, store, job, tmp_path / "results")
        delivered = {(d.destination, d.object) for d in store.deliveries(job)}
        assert ("archive", "report-pdf.dcm") in delivered and ("pacs", "report-pdf.dcm") not in delivered
        assert "re-issue queued" in egress.decide(job, "dr-lee", "", "rejected", "wrong-anatomy")
        wait_until(lambda: egress.deliver_due() or store.job(job).state is JobState.DONE)
        reissued = [(d.destination, d.object, d.state) for d in store.deliveries(job) if review_of(d.object) == 1]
        assert sorted(reissued) == [("archive", "review-1/rejection-note.dcm", "done"),
                                    ("pacs", "review-1/rejection-2/rejection-note.dcm", "done")]
        notes = {name: [ds for ds in map(pydicom.dcmread, peer.received()) if ds.Modality == "KO"]
                 for name, peer in (("pacs", pacs), ("archive", archive))}
        store.close()
    (at_pacs,), (at_archive,) = notes["pacs"], notes["archive"]
    assert rejected_uids(at_pacs) == selected_uids(at_pacs) == both
    assert rejected_uids(at_archive) == selected_uids(at_archive) == both | {pdf_uid}
    assert dciodvfy_errors(Path(at_pacs.filename)) == [] and dciodvfy_errors(Path(at_archive.filename)) == []


def test_a_forward_only_job_takes_no_decision_and_no_rejection_note_withdraws_the_studys_images(
        tmp_path: Path, pacs: StoreSCP) -> None:
    """A forward-only job (no pipeline) delivered the study's own images: a decision on it is refused by the store
    and by egress, and no rejection note is written (it would withdraw the acquired images at the PACS)."""
    config = egress_test_config(tmp_path, {"pacs": {**pacs.destination, "forward_only": True}})
    store = JobStore(tmp_path / "data" / "radnode.db")
    egress = Egress(config, store)
    _, job = store.record_instance(Instance(generate_uid(), generate_uid(), generate_uid(), "P1", "CT",
                                            str(CTImageStorage), "/spool/x.dcm", "SCANNER", "127.0.0.1:5000", "a1",
                                            0.0), SeriesDecision((), forwards=("pacs",)))
    store.queue_job(job, "idle")
    assert store.start_job(job, "run")
    write_study(tmp_path / "study", n=2)
    egress.stage(job, tmp_path / "study")
    wait_until(lambda: egress.deliver_due() or store.job(job).state is JobState.DONE)
    for decision, reason in (("accepted", None), ("corrected", None), ("rejected", "other")):
        with pytest.raises(ActionRefused, match=f"job {job} forwarded the study without a pipeline"):
            store.mark_reviewed(job, "dr-x", "", decision, reason)
    with pytest.raises(ActionRefused, match=f"job {job} forwarded the study without a pipeline"):
        egress.decide(job, "dr-x", "", "rejected", "other")
    assert list(outbox_dir(config, job).glob("review-*")) == []
    assert [d.object for d in store.deliveries(job)] == sorted(p.name for p in (tmp_path / "study").iterdir())
    store.close()


def test_a_decision_on_superseded_results_is_refused_naming_the_newer_job(tmp_path: Path, pacs: StoreSCP) -> None:
    """A re-run superseded the first job's results (withdrawn at the PACS): a decision on the first job is refused,
    naming the job to review instead, and nothing of the first job (a verified copy of its report) goes out again."""
    config = egress_test_config(tmp_path, {"pacs": pacs.destination})
    store = JobStore(tmp_path / "data" / "radnode.db")
    egress = Egress(config, store)
    first = study_version_job(store, "1.1")
    write_results(tmp_path / "first", report_sr=True)
    egress.stage(first, tmp_path / "first")
    wait_until(lambda: egress.deliver_due() or store.job(first).state is JobState.DONE)
    rerun = study_version_job(store, "1.2")
    write_results(tmp_path / "rerun", report_sr=True)
    egress.stage(rerun, tmp_path / "rerun")
    wait_until(lambda: egress.deliver_due() or store.job(rerun).state is JobState.DONE)
    received = len(pacs.received())
    for decision, reason in (("accepted", None), ("corrected", None), ("rejected", "other")):
        with pytest.raises(ActionRefused, match=f"superseded by job {rerun}'s .*: review job {rerun} instead"):
            store.mark_reviewed(first, "dr-x", "", decision, reason)
    assert list(outbox_dir(config, first).glob("review-*")) == []
    assert len(pacs.received()) == received
    assert store.mark_reviewed(rerun, "dr-x", "", "accepted")  # the newer results take the decision
    store.close()



def test_a_decision_on_results_retention_purged_is_refused_saying_so(tmp_path: Path, pacs: StoreSCP) -> None:
    """A done job's results went to the PACS, then retention removed its outbox: a decision on it is refused,
    saying why (no rejection note or verified report can be made of files that are gone), never recorded as if
    it had been re-issued while nothing went out and the PACS kept the results as they were."""
    from radnode.node.retention import DAY, Retention

    config = egress_test_config(tmp_path, {"pacs": pacs.destination})
    store = JobStore(tmp_path / "data" / "radnode.db")
    egress = Egress(config, store)
    job = study_version_job(store, "1.1")
    write_results(tmp_path / "results", report_sr=True)
    egress.stage(job, tmp_path / "results")
    wait_until(lambda: egress.deliver_due() or store.job(job).state is JobState.DONE)
    assert Retention(config, store).purge(now=time.time() + 30 * DAY).results
    assert store.job(job).purged_at is not None and not outbox_dir(config, job).exists()
    received = len(pacs.received())
    for decision, reason in (("accepted", None), ("corrected", None), ("rejected", "other")):
        with pytest.raises(ActionRefused, match=f"job {job}'s results were purged by retention"):
            store.mark_reviewed(job, "dr-x", "", decision, reason)
    assert not outbox_dir(config, job).exists() and len(pacs.received()) == received
    store.close()



def test_results_superseded_between_the_decision_and_its_reissue_answer_409_naming_the_newer_job(
        tmp_path: Path, pacs: StoreSCP) -> None:
    """A re-run supersedes a done job's results just as a reviewer's decision on them is recorded, before its
    re-issue is queued: the review endpoint answers 409 naming the job to review instead (never a 500), and
    nothing of the withdrawn results goes out again. The refused decision leaves nothing recorded (no review, no
    event, no ``review-<id>/``), so a later decision is taken as if it had never been tried: its verified report
    names its own reviewer, not the refused one's (the rolled-back review's id is given again)."""
    import sqlite3

    config = node_config(tmp_path, egress={"destinations": {"pacs": pacs.destination}})
    with Node(config, poll_seconds=0.1) as node:
        node.store.set_queue_paused(True, "test")  # the jobs are driven here, never run by the node
        first = study_version_job(node.store, "1.1")
        write_results(tmp_path / "first", report_sr=True)
        node.egress.stage(first, tmp_path / "first")
        assert final_job(node, first).state is JobState.DONE
        rerun = study_version_job(node.store, "1.2")
        events = [(e.kind, e.message) for e in node.store.events(first)]
        db = sqlite3.connect(config.data_dir / "radnode.db")
        # the re-run's results supersede the first job's (store.supersede's record) the moment dr-kim's decision
        # is in; rolled back with it, the first job's results are current again for the next decision
        db.execute(f"CREATE TRIGGER rerun_lands AFTER INSERT ON reviews WHEN NEW.job_id = {first} "
                   f"AND NEW.reviewer = 'token:dr-kim' BEGIN "
                   f"UPDATE result_versions SET superseded_by = {rerun} WHERE job_id = {first}; END")
        db.commit()
        db.close()
        received = len(pacs.received())
        with api(node, token_for(node, Role.OPERATOR, "dr-kim")) as client:
            answer = client.post(f"/api/jobs/{first}/review", json={"decision": "accepted"})
        assert answer.status_code == 409, answer.text
        assert f"superseded by job {rerun}'s" in answer.json()["detail"]
        assert not [d for d in node.store.deliveries(first) if d.object.startswith("review-")]
        assert len(pacs.received()) == received
        assert node.store.review_rows() == [] and node.store.reviewed_jobs([first]) == {}
        assert [(e.kind, e.message) for e in node.store.events(first)] == events
        assert list(outbox_dir(config, first).glob("review-*")) == []

        with api(node, token_for(node, Role.OPERATOR, "dr-lee")) as client:
            answer = client.post(f"/api/jobs/{first}/review", json={"decision": "accepted"})
        assert answer.status_code == 200, answer.text
        assert "report-sr.dcm → pacs" in answer.json()["message"]
        assert final_job(node, first).state is JobState.DONE
        assert [(r.decision, r.reviewer) for r in node.store.review_rows()] == [("accepted", "token:dr-lee")]
    (verified,) = [ds for ds in map(pydicom.dcmread, pacs.received()) if ds.get("VerificationFlag") == "VERIFIED"]
    assert str(verified.VerifyingObserverSequence[0].VerifyingObserverName) == "token:dr-lee"


@pytest.mark.slow
def test_a_decision_taken_while_the_fhir_server_is_down_reaches_it_once_when_it_is_back(
        tmp_path: Path) -> None:
    """The re-issue is a delivery like any other: queued while the EHR is down, retried, and the report ends
    final with the reviewer exactly once when the server is back; re-sendable like any delivery."""

    write_chest_phantom(tmp_path / "ct", 16, 48, 48)
    fhir = FhirServer(tmp_path / "ehr")
    try:
        config = node_config(tmp_path, egress={"destinations": {"ehr": fhir.destination}})
        with Node(config, poll_seconds=0.1) as node:
            job = _one_done_job(node, tmp_path / "ct")
            identifier = report_identifier(outbox_dir(config, job.id))
            fhir.stop()
            with api(node, token_for(node, Role.OPERATOR, "dr-kim")) as client:
                answer = client.post(f"/api/jobs/{job.id}/review", json={"decision": "accepted"})
                assert answer.status_code == 200, answer.text

                def reissue_delivery():  # type: ignore[no-untyped-def]
                    (delivery,) = [d for d in node.store.deliveries(job.id) if d.object.endswith("fhir-reissue.json")]
                    return delivery

                wait_until(lambda: reissue_delivery().attempts >= 2, timeout=30)
                assert reissue_delivery().state == "pending" and "re-issue on" in reissue_delivery().last_error
                shown = client.get(f"/api/jobs/{job.id}").json()
                assert any(d["object"].endswith("fhir-reissue.json") and d["state"] == "pending"
                           for d in shown["deliveries"]), shown["deliveries"]
                fhir = FhirServer(tmp_path / "ehr", port=fhir.port)
                assert _settled(node, job.id) is JobState.DONE
                assert _report_status(fhir, identifier) == ("final", [{"display": "token:dr-kim"}])
                assert reissue_delivery().state == "done"
                delivered = [e.message for e in node.events(job.id) if e.kind == "delivered"
                             and "final on" in e.message]
                assert delivered == [f"DiagnosticReport/{fhir.search('DiagnosticReport')['entry'][0]['resource']['id']}"
                                     f" and {len(fhir.search('Observation', '_count=500')['entry'])} Observation(s) "
                                     f"final on {fhir.base_url}, by token:dr-kim"]
                answer = client.post(f"/api/jobs/{job.id}/resend", json={"destination": "ehr"})
                assert answer.status_code == 200, answer.text
                assert _settled(node, job.id) is JobState.DONE
                assert _report_status(fhir, identifier) == ("final", [{"display": "token:dr-kim"}])
    finally:
        fhir.stop()


def test_the_metrics_preload_waits_until_no_study_is_arriving_or_being_processed(tmp_path: Path) -> None:
    """Its imports hold the interpreter for seconds: with a study arriving they wait; once every job is final they
    load, on the next round."""
    from radnode.config import Config
    from radnode.feedback.corrections import CorrectionMatcher
    from radnode.node.store import JobStore
    from radnode.node.store.records import Instance
    from radnode.pipelines.routing import SeriesDecision

    config = Config.model_validate({"data_dir": str(tmp_path / "data")})
    store = JobStore(tmp_path / "radnode.db")
    try:
        _, job_id = store.record_instance(Instance(
            sop_instance_uid="1.2.826.0.3.1.1.1", study_instance_uid="1.2.826.0.3.1", series_instance_uid="1.2.826.0.3.1.1",
            patient_id="P1", modality="CT", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", path="/spool/1.dcm", calling_ae="CT",
            peer_address="127.0.0.1:4000", association_id="a", received_at=1000.0), SeriesDecision(("ct_tissue",)))
        matcher = CorrectionMatcher(config, store)
        matcher.tick()
        assert not matcher.metrics_loaded  # the study is still arriving
        store.fail_job(job_id, "over for this test")
        matcher.tick()
        assert matcher.metrics_loaded
    finally:
        store.close()
