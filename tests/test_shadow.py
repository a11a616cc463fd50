"""Shadow runs: a rule's candidate pipeline runs on the production job's input after it, its results are stored,
never delivered, and compared with the production run's (Dice and HD95 per common segment, measurements, time).

The end-to-end test runs the real ct_tissue pipeline in production and, as the candidate, a site pipeline
(registered by ``RADNODE_PIPELINES``, written here) that is the shipped ct_tissue application with a narrower
adipose tissue HU range; the study comes from DCMTK's storescu, the results go to DCMTK's storescp and a sekmet
FHIR server, and the comparison is checked against Dice, volumes and HD95 computed here with numpy and scipy on
masks read with pydicom.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from factories import (
    PATIENT_BUNDLE, independent_agreement, metric_value, seg_masks_by_source, spacing_of, write_chest_phantom,
    write_study,
)
from radnode.console.accounts import Role
from radnode.node.egress import Egress, outbox_dir
from radnode.node.service import Node
from radnode.node.store import ActionRefused, Instance, JobState, JobStore, ShadowComparison, ShadowNotDelivered
from radnode.node.store.jobs import transition
from radnode.node.worker import job_dir
from radnode.peers import FhirServer, StoreSCP
from radnode.pipelines.registry import SITE_PIPELINES_ENV
from radnode.pipelines.routing import Completeness, LateInstances, Priority, SeriesDecision
from support.console import api, api_json, token_for
from support.dicom_tools import storescu
from support.node import final_job, node_config, patients
from support.waiting import wait_until

CANDIDATE_APP = textwrap.dedent('''
    """A site's candidate CT tissue pipeline: the shipped ct_tissue application with a narrower adipose tissue
    HU range (the parameter under evaluation; ct_tissue's is -190 … -30 HU)."""
    import radnode.imaging.ct_tissue as tissue
    from radnode.apps.ct_tissue.app import CTTissueApp


    class CandidateApp(CTTissueApp):
        name = "ct_candidate"

        def compose(self) -> None:
            tissue.FAT_HU = (-190.0, -90.0)
            super().compose()
''')


def rules_file(tmp_path: Path, production: str, shadow: list[str]) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(f"rules:\n  - name: ct\n    when: {{Modality: CT}}\n    pipelines: [{production}]\n"
                    f"    shadow: [{', '.join(shadow)}]\n")
    return path


def destinations(pacs: StoreSCP, fhir: FhirServer) -> dict:
    return {"destinations": {"pacs": {"type": "dicom", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                                      "port": pacs.port}, "ehr": fhir.destination}}


def diagnostic_reports(fhir: FhirServer) -> list[dict]:
    return [e["resource"] for e in fhir.search("DiagnosticReport").get("entry", [])]


# --- the store: scheduling and the refusal to deliver ----------------------------------------------------


def ct_instance(sop: str, study: str, received_at: float = 0.0) -> Instance:
    return Instance(sop, study, f"{study}.1", "P1", "CT", "1.2.840.10008.5.1.4.1.1.2", f"/spool/{sop}.dcm", "SCANNER",
                    "127.0.0.1:4000", "a1", received_at)


def test_a_shadow_job_waits_for_its_production_run_and_its_results_can_never_be_delivered(
        store_target: Path | str) -> None:
    store = JobStore(store_target)
    try:
        decision = SeriesDecision(("ct_tissue",), priority=Priority.STAT, shadow=("model_seg",),
                                  completeness=Completeness(late_instances=LateInstances.IGNORE))
        _, main = store.record_instance(ct_instance("1.1", "1.2.3"), decision)
        _, other = store.record_instance(ct_instance("2.1", "2.2.3", 1.0),
                                         SeriesDecision(("ct_tissue",), priority=Priority.OFF_PEAK))
        assert store.queue_job(main, "idle") is JobState.QUEUED and store.queue_job(other, "idle") is JobState.QUEUED
        shadow = next(j for j in store.jobs() if j.shadow)
        assert (shadow.pipeline, shadow.sibling_of, shadow.priority, shadow.forwards) == (
            "model_seg", main, Priority.OFF_PEAK, ())
        assert [i.sop_instance_uid for i in store.job_inputs(shadow.id)] == ["1.1"]  # the production job's input
        assert f"started shadow job {shadow.id} (model_seg)" in store.events(main)[-1].message
        # production first, even an off-peak one of another study; the shadow only once its production run is over
        assert store.next_queued().id == main and store.start_job(main, "run")
        assert store.next_queued().id == other and store.start_job(other, "run")
        assert store.next_queued() is None
        assert store.begin_delivery(main, "results", [("pacs", "seg.dcm")])
        assert store.next_queued().id == shadow.id and store.start_job(shadow.id, "run")
        with pytest.raises(ShadowNotDelivered, match=f"job {shadow.id} is a shadow run"):
            store.begin_delivery(shadow.id, "results", [("pacs", "seg.dcm")])
        assert store.deliveries(shadow.id) == [] and store.job(shadow.id).state is JobState.RUNNING
        assert store.fail_job(shadow.id, "out of memory")  # the candidate's first run fails
        with pytest.raises(ActionRefused, match="shadow run"):
            store.resend(shadow.id, user="ops", reason="try")
        assert [(s.id, p.id) for s, p in store.shadows_to_compare()] == [(shadow.id, main)]
        first = ShadowComparison(shadow.id, main, "1.2.3", "ct_tissue", "model_seg", "not-compared",
                                 "the candidate run failed: out of memory", [], [], 1.0, 1.0, None, None, time.time())
        assert store.record_shadow_comparison(first) and not store.record_shadow_comparison(first)
        assert store.shadows_to_compare() == []
        # an operator's retry runs it again on the same input, and it is compared again
        assert store.retry_job(shadow.id, "ops") == 1
        assert store.job(shadow.id).state is JobState.QUEUED and store.start_job(shadow.id, "run")
        assert store.finish_shadow(shadow.id, "8 outputs") and store.job(shadow.id).state is JobState.DONE
        assert not store.finish_shadow(main, "not a shadow job")
        assert [s.id for s, _ in store.shadows_to_compare()] == [shadow.id]
        second = replace(first, state="compared", message="6 common segment(s)", compared_at=time.time())
        assert store.record_shadow_comparison(second) and store.shadows_to_compare() == []
        assert [c.message for c in store.shadow_comparisons(job_id=main)] == ["6 common segment(s)"]
        assert [e.kind for e in store.events(main)].count("shadow") == 2
    finally:
        store.close()


def test_a_retried_production_job_redoes_its_shadow_runs_after_its_new_run_and_compares_them_with_it(
        store_target: Path | str) -> None:
    """The shadow ran (and was compared) after the failed production run; the operator retries the production
    job: the shadow goes back to the queue, waits for the new production run, runs again and is compared again.
    A second shadow pipeline an operator cancelled stays cancelled."""
    store = JobStore(store_target)
    try:
        _, main = store.record_instance(ct_instance("1.1", "1.2.3"),
                                        SeriesDecision(("ct_tissue",), shadow=("model_seg", "model_b")))
        assert store.queue_job(main, "idle") is JobState.QUEUED
        shadow, cancelled = (next(j.id for j in store.jobs() if j.shadow and j.pipeline == p)
                             for p in ("model_seg", "model_b"))
        store.cancel_job(cancelled, "ops", "not this one")
        assert store.start_job(main, "run") and store.fail_job(main, "the pipeline crashed")
        assert store.next_queued().id == shadow and store.start_job(shadow, "run")
        assert store.finish_shadow(shadow, "8 outputs")
        old = ShadowComparison(shadow, main, "1.2.3", "ct_tissue", "model_seg", "not-compared",
                               "the production run failed", [], [], 1.0, 1.0, None, None, time.time())
        assert store.record_shadow_comparison(old)
        assert [s.id for s, _ in store.shadows_to_compare()] == [cancelled]  # compared as "candidate failed"
        assert store.retry_job(main, "ops") == 1
        assert store.job(shadow).state is JobState.QUEUED and store.job(cancelled).state is JobState.FAILED
        assert "production job" in store.events(shadow)[-1].message
        assert store.next_queued().id == main and store.start_job(main, "run")
        assert store.next_queued() is None, "the shadow ran before the new production run was over"
        assert store.begin_delivery(main, "results", [("pacs", "seg.dcm")])
        assert store.next_queued().id == shadow and store.start_job(shadow, "run")
        assert store.finish_shadow(shadow, "8 outputs")
        assert [(s.id, p.id, p.state) for s, p in store.shadows_to_compare()] == [
            (shadow, main, JobState.DELIVERING), (cancelled, main, JobState.DELIVERING)]
    finally:
        store.close()


def test_a_shadow_job_picked_as_its_production_job_is_retried_waits_for_the_new_run_and_is_compared_with_it(
        store_target: Path | str) -> None:
    """The scheduler picked the shadow job (its production run had failed), then an operator retried the
    production job before the scheduler started the shadow: ``start_job`` refuses it while the new production run
    is queued or running, as ``next_queued`` holds it, so it never runs beside that run; it stays queued, starts
    once the run is over and is compared with it."""
    store = JobStore(store_target)
    try:
        _, main = store.record_instance(ct_instance("1.1", "1.2.3"),
                                        SeriesDecision(("ct_tissue",), shadow=("model_seg",)))
        assert store.queue_job(main, "idle") is JobState.QUEUED
        (shadow,) = [j.id for j in store.jobs() if j.shadow]
        assert store.start_job(main, "run") and store.fail_job(main, "the pipeline crashed")
        assert store.next_queued().id == shadow  # the scheduler's pick...
        assert store.retry_job(main, "ops") == 1  # ...then the operator's retry, before the shadow is started
        assert not store.start_job(shadow, "run"), "the shadow started while its production job was queued"
        assert store.next_queued().id == main and store.start_job(main, "run")
        assert not store.start_job(shadow, "run"), "the shadow started beside its production run"
        assert store.job(shadow).state is JobState.QUEUED and store.job(shadow).runs == 0
        assert store.begin_delivery(main, "results", [("pacs", "seg.dcm")])
        assert store.next_queued().id == shadow and store.start_job(shadow, "run")
        assert store.finish_shadow(shadow, "8 outputs") and store.job(shadow).runs == 1
        assert [(s.id, p.id, p.state) for s, p in store.shadows_to_compare()] == [(shadow, main, JobState.DELIVERING)]
    finally:
        store.close()


def test_a_shadow_job_cancelled_then_retried_runs_again_with_its_retried_production_job(
        store_target: Path | str) -> None:
    """An operator cancelled both shadow jobs, then retried them: one ran, the other was cancelled again. Only
    the latest decision counts when the production job is retried: the one that ran is redone after the new
    production run, the one cancelled again stays cancelled."""
    store = JobStore(store_target)
    try:
        _, main = store.record_instance(ct_instance("1.1", "1.2.3"),
                                        SeriesDecision(("ct_tissue",), shadow=("model_seg", "model_b")))
        assert store.queue_job(main, "idle") is JobState.QUEUED
        shadow, again = (next(j.id for j in store.jobs() if j.shadow and j.pipeline == p)
                         for p in ("model_seg", "model_b"))
        for job_id in (shadow, again):
            store.cancel_job(job_id, "ops", "wrong candidate")
            assert store.retry_job(job_id, "ops", "the right one after all") == 1
        store.cancel_job(again, "ops", "not this one after all")
        assert store.start_job(main, "run") and store.fail_job(main, "the pipeline crashed")
        assert store.next_queued().id == shadow and store.start_job(shadow, "run")
        assert store.finish_shadow(shadow, "8 outputs")
        assert store.retry_job(main, "ops") == 1
        assert store.job(shadow).state is JobState.QUEUED and store.job(again).state is JobState.FAILED
        assert f"production job {main} runs again" in store.events(shadow)[-1].message
    finally:
        store.close()


def test_a_shadow_run_that_ends_after_late_instances_asked_its_restart_is_queued_again_not_done(
        store_target: Path | str) -> None:
    """Late instances (``rerun``) arrive while the shadow runs; its run ends before the scheduler stops it: like
    a production run's, it is not finished (its input grew since) but restarted, so it is never compared with
    the production run on the incomplete study, only after the production job's run on the whole study. (A
    shadow running beside its production run: ``start_job`` now refuses that, but a run started before it did,
    e.g. on a worker that outlived the leader's upgrade, may still be going; the store is set so directly.)"""
    store = JobStore(store_target)
    try:
        decision = SeriesDecision(("ct_tissue",), shadow=("model_seg",),
                                  completeness=Completeness(late_instances=LateInstances.RERUN))
        _, main = store.record_instance(ct_instance("1.1", "1.2.3"), decision)
        assert store.queue_job(main, "idle") is JobState.QUEUED
        (shadow,) = [j.id for j in store.jobs() if j.shadow]
        assert store.start_job(main, "run") and not store.start_job(shadow, "run")
        with store._db.write() as conn:
            assert transition(conn, shadow, (JobState.QUEUED,), JobState.RUNNING)
        store.record_instance(ct_instance("1.2", "1.2.3", 2.0), decision)
        assert sorted(store.restart_requested()) == [main, shadow]
        assert not store.finish_shadow(shadow, "8 outputs")
        assert store.job(shadow).state is JobState.RUNNING
        assert store.events(shadow)[-1].message == ("run finished, but late instances arrived during it: not kept "
                                                    "as the shadow run, it runs again")
        assert store.restart(main) and store.restart(shadow) and store.job(shadow).state is JobState.QUEUED
        assert store.shadows_to_compare() == []
        assert store.queue_job(main, "idle") is JobState.QUEUED and store.start_job(main, "run")
        assert store.begin_delivery(main, "results", [("pacs", "seg.dcm")])
        assert store.next_queued().id == shadow and store.start_job(shadow, "run")
        assert store.finish_shadow(shadow, "8 outputs") and store.job(shadow).state is JobState.DONE
        assert [i.sop_instance_uid for i in store.job_inputs(shadow)] == ["1.1", "1.2"]
        assert [(s.id, p.id) for s, p in store.shadows_to_compare()] == [(shadow, main)]
    finally:
        store.close()


def test_egress_refuses_a_shadow_runs_results_so_nothing_reaches_the_pacs_or_the_ehr(
        tmp_path: Path, pacs: StoreSCP, fhir: FhirServer) -> None:
    """The same outputs staged for the production job reach both servers (the path works); for its shadow job
    egress refuses them before anything is copied or planned, and a re-send is refused too."""
    config = node_config(tmp_path, egress=destinations(pacs, fhir))
    config.data_dir.mkdir(parents=True)
    store = JobStore(config.data_dir / "radnode.db")
    egress = Egress(config, store, poll_seconds=0.05)
    try:
        _, main = store.record_instance(ct_instance("1.1", "1.2.3"), SeriesDecision(("ct_tissue",), shadow=("model_seg",)))
        store.queue_job(main, "idle")
        (shadow,) = [j.id for j in store.jobs() if j.shadow]
        assert store.start_job(main, "run")
        outputs = tmp_path / "out"
        write_study(outputs, n=1)
        (outputs / "fhir-bundle.json").write_text(json.dumps(PATIENT_BUNDLE))
        egress.start()
        egress.stage(main, outputs)  # the positive control: the same files as a production job's
        wait_until(lambda: store.job(main).state is JobState.DONE, 60)
        sent = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in outputs.glob("*.dcm")]
        assert pacs.received_uids() == sent and patients(fhir) == 1
        assert store.start_job(shadow, "run")  # once its production run is over
        with pytest.raises(ShadowNotDelivered, match=f"job {shadow} is a shadow run of job {main}"):
            egress.stage(shadow, outputs)
        assert not outbox_dir(config, shadow).exists() and store.deliveries(shadow) == []
        with pytest.raises(ActionRefused, match="shadow run"):
            egress.resend(shadow, user="ops", reason="try")
        assert store.deliveries(shadow) == [] and store.job(shadow).state is JobState.RUNNING
    finally:
        egress.stop()
        store.close()


def test_the_summary_gives_median_and_worst_decile_dice_mean_differences_and_time_ratios() -> None:
    from radnode.feedback.shadow import summarise, summary_table

    dice = [0.99, 0.97, 0.95, 0.9, 0.98, 0.96, 0.7, 0.99, 0.93, 0.94]

    def compared(k: int, d: float) -> ShadowComparison:
        return ShadowComparison(k + 2, k + 1, f"1.2.{k}", "ct_tissue", "ct_candidate", "compared", "",
                                [{"segment": "Liver", "dice": d, "hd95_mm": 10 * (1 - d)}],
                                [{"measurement": "Liver: Volume", "unit": "mL", "production": 1500.0,
                                  "candidate": 1500.0 + k, "difference": float(k)}], 10.0, 20.0, 10.0 + k, 30.0, k)

    failed = ShadowComparison(99, 98, "1.2.99", "ct_tissue", "ct_candidate", "not-compared",
                              "the candidate run failed: out of memory", [], [], 10.0, 20.0, None, None, 99)
    summary = summarise("ct_tissue", "ct_candidate", [*(compared(k, d) for k, d in enumerate(dice)), failed])
    assert (summary.studies_compared, summary.not_compared, summary.candidate_failures) == (10, 1, 1)
    (liver,) = summary.segments
    assert liver.median_dice == pytest.approx(float(np.median(dice)))
    assert liver.worst_decile_dice == pytest.approx(float(np.percentile(dice, 10)))
    assert liver.median_hd95_mm == pytest.approx(float(np.median([10 * (1 - d) for d in dice])))
    (volume,) = summary.measurements
    assert (volume.studies, volume.mean_difference, volume.mean_absolute_difference) == (10, 4.5, 4.5)
    assert summary.wall_time_ratio == pytest.approx(np.median([(10 + k) / 10 for k in range(10)]), abs=1e-3)
    assert summary.cpu_time_ratio == 1.5
    assert "studies compared: 10; not compared: 1 (candidate failed: 1)" in summary_table(summary)


# --- the node, end to end -----------------------------------------------------------------------------


def test_a_failing_shadow_pipeline_leaves_the_production_job_done_and_delivered(
        tmp_path: Path, pacs: StoreSCP, fhir: FhirServer, stand_in: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The candidate (the stand-in job command run as model_seg) fails; the production job is done, its results
    delivered once; the shadow started only after the production run ended, though a second job slot was free."""
    monkeypatch.setenv("STAND_IN_FAIL_PIPELINE_model_seg", "the candidate model refuses this study")
    config = node_config(tmp_path, egress=destinations(pacs, fhir), processing={"max_concurrent_jobs": 2}
                         ).model_copy(update={"rules": rules_file(tmp_path, "ct_tissue", ["model_seg"])})
    write_study(tmp_path / "study", n=3)
    with Node(config, job_command=stand_in, poll_seconds=0.1) as node:
        assert storescu(node.port, tmp_path / "study").returncode == 0
        wait_until(lambda: len(node.jobs()) == 2, 30)
        production, shadow = (final_job(node, j.id, timeout=60) for j in node.jobs())
        wait_until(lambda: node.store.shadow_comparisons(job_id=production.id), 30)
        (comparison,) = node.store.shadow_comparisons(job_id=production.id)
        production_events, shadow_events = node.events(production.id), node.events(shadow.id)
    assert (production.state, production.reason, production.runs) == (JobState.DONE, None, 1)
    assert (shadow.state, shadow.shadow, shadow.sibling_of) == (JobState.FAILED, True, production.id)
    assert shadow.reason == "the candidate model refuses this study"
    assert comparison.state == "not-compared" and comparison.message.startswith("the candidate run failed")
    outbox = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
              for p in outbox_dir(config, production.id).glob("*.dcm")]
    assert pacs.received_uids() == outbox and patients(fhir) == 1
    finished = next(e.at for e in production_events if e.kind == "finished")
    started = next(e.at for e in shadow_events if e.kind == "running")
    assert started >= finished, "the shadow run started before the production run it shadows had ended"
    assert "shadow run at nice 10" in next(e.message for e in shadow_events if e.kind == "running")


@pytest.mark.slow
def test_a_candidate_pipeline_in_shadow_is_compared_with_production_and_never_delivered(
        tmp_path: Path, pacs: StoreSCP, fhir: FhirServer, monkeypatch: pytest.MonkeyPatch, playwright_core: Path) -> None:
    site = tmp_path / "site" / "ct_candidate"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("")
    (site / "app.py").write_text(CANDIDATE_APP)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))  # the job processes inherit both
    monkeypatch.setenv(SITE_PIPELINES_ENV, "ct_candidate=ct_candidate.app:CandidateApp")
    config = node_config(tmp_path, egress=destinations(pacs, fhir), processing={"job_timeout_seconds": 240},
                         feedback={"preload_metrics": True}
                         ).model_copy(update={"rules": rules_file(tmp_path, "ct_tissue", ["ct_candidate"])})
    source = write_chest_phantom(tmp_path / "ct", 40, 64, 64)
    with Node(config, poll_seconds=0.1) as node:
        assert storescu(node.port, tmp_path / "ct").returncode == 0
        wait_until(lambda: len(node.jobs()) == 2, 30)
        production, shadow = (final_job(node, j.id, timeout=240) for j in node.jobs())
        assert (production.state, production.pipeline) == (JobState.DONE, "ct_tissue"), production.reason
        assert (shadow.state, shadow.pipeline, shadow.shadow) == (JobState.DONE, "ct_candidate", True), shadow.reason
        wait_until(lambda: node.store.shadow_comparisons(job_id=production.id), 60)
        token = token_for(node, Role.VIEWER)
        answer = api_json(node, f"/api/jobs/{production.id}", token)
        shadow_answer = api_json(node, f"/api/jobs/{shadow.id}", token)
        token_file = tmp_path / "token"
        token_file.write_text(token)
        cli = subprocess.run([sys.executable, "-m", "radnode", "performance", "--compare", "ct_tissue", "ct_candidate",
                              "--url", f"http://127.0.0.1:{node.api_port}", "--token-file", str(token_file)],
                             capture_output=True, text=True, timeout=120)
        with api(node, token_for(node, Role.ADMIN, "scraper")) as client:
            metrics = client.get("/metrics").text
        with api(node, token) as client:
            exported = client.get("/api/export/shadow", params={"format": "json"}).json()["rows"]
        to_pacs = {d.object for d in node.store.deliveries(production.id) if d.destination == "pacs"}
        assert node.store.deliveries(shadow.id) == []
        node.accounts.add_user("operator", Role.OPERATOR, "a long enough password")
        browser = subprocess.run(
            ["node", str(Path(__file__).parent / "support" / "shadow_browser.cjs")], capture_output=True, text=True,
            timeout=180, env={**os.environ, "PLAYWRIGHT_CORE": str(playwright_core), "JOB_ID": str(production.id),
                              "CONSOLE_URL": f"http://127.0.0.1:{node.api_port}", "CONSOLE_USER": "operator",
                              "CONSOLE_PASSWORD": "a long enough password"})

    # the destinations received the production results only: its DICOM objects, each once, and its report
    ours_folder, theirs_folder = outbox_dir(config, production.id), job_dir(config, shadow.id) / "out"
    assert not outbox_dir(config, shadow.id).exists()
    headers = {name: pydicom.dcmread(ours_folder / name, stop_before_pixels=True) for name in to_pacs}
    received = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.received()]
    assert sorted((str(r.SOPClassUID), int(r.SeriesNumber)) for r in received) == sorted(
        (str(h.SOPClassUID), int(h.SeriesNumber)) for h in headers.values())
    assert {int(r.SeriesNumber) for r in received} == {901, 902, 903}  # SEG, measurement SR, report SR (no PDF asked)
    assert sorted(str(r.SOPInstanceUID) for r in received) == sorted(str(h.SOPInstanceUID) for h in headers.values())
    candidate_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in theirs_folder.glob("*.dcm")}
    assert candidate_uids and not candidate_uids & {str(r.SOPInstanceUID) for r in received}
    assert len(diagnostic_reports(fhir)) == 1

    # the comparison, against figures computed here from the two SEGs read with pydicom
    (comparison,) = answer["shadow_comparisons"]
    assert shadow_answer["shadow"] and shadow_answer["sibling_of"] == production.id
    assert shadow_answer["shadow_comparisons"] == answer["shadow_comparisons"]
    assert (comparison["state"], comparison["shadow_job_id"], comparison["candidate_pipeline"]) == (
        "compared", shadow.id, "ct_candidate")
    ours = seg_masks_by_source(ours_folder / "seg.dcm", source)
    theirs = seg_masks_by_source(theirs_folder / "seg.dcm", source)
    spacing = spacing_of(source)
    by_label = {s["segment"]: s for s in comparison["segments"]}
    assert set(by_label) == {"Body", "Left lung", "Right lung", "Bone", "Adipose tissue", "Skeletal muscle"}
    for figures in comparison["segments"]:
        expected = independent_agreement(ours[figures["production_segment_number"]],
                                         theirs[figures["candidate_segment_number"]], spacing)
        for name, ours_name in (("dice", "dice"), ("hd95_mm", "hd95_mm"), ("result_volume_ml", "production_volume_ml"),
                                ("corrected_volume_ml", "candidate_volume_ml")):
            assert figures[ours_name] == pytest.approx(expected[name], abs=1e-3), (figures["segment"], name)
        assert figures["volume_difference_ml"] == pytest.approx(
            expected["corrected_volume_ml"] - expected["result_volume_ml"], abs=1e-3)
    fat = by_label["Adipose tissue"]
    assert fat["dice"] < 0.98 and fat["volume_difference_ml"] < 0  # the narrower HU range takes fat away
    assert by_label["Left lung"]["dice"] == 1 and by_label["Bone"]["hd95_mm"] == 0
    measurements = {m["measurement"]: m for m in comparison["measurements"]}
    for m in measurements.values():
        assert m["difference"] == pytest.approx(m["candidate"] - m["production"], abs=1e-9)
    assert measurements["Adipose tissue: Volume"]["difference"] == pytest.approx(fat["volume_difference_ml"], abs=0.15)
    assert measurements["Left lung: Volume"]["difference"] == 0
    for side, folder in (("production", ours_folder), ("candidate", theirs_folder)):
        manifest = json.loads((folder / "manifest.json").read_text())
        assert comparison[f"{side}_wall_seconds"] == pytest.approx(manifest["seconds"], abs=1e-3)
        assert comparison[f"{side}_cpu_seconds"] == pytest.approx(
            sum(p["cpu_seconds"] for p in manifest["phases"].values()), abs=1e-3)

    # the export has one row per common segment with the same figures, and no patient identifier
    assert {r["segment"]: r["dice"] for r in exported} == {s["segment"]: s["dice"] for s in comparison["segments"]}
    assert {(r["job_id"], r["shadow_job_id"]) for r in exported} == {(production.id, shadow.id)}
    assert "patient_id" not in exported[0] and "study_instance_uid" not in exported[0]

    # the console's job page shows the same comparison
    assert browser.returncode == 0, browser.stdout + browser.stderr
    (shown,) = json.loads(browser.stdout.strip().splitlines()[-1].removeprefix("SHADOW "))
    assert (shown["candidate"], shown["state"]) == ("ct_candidate", "compared")
    assert shown["dice"] == {s["segment"]: f"{s['dice']:.3f}" for s in comparison["segments"]}
    assert shown["measurements"] == len(comparison["measurements"])

    # the summary a site promotes the candidate on, in the CLI and /metrics
    assert cli.returncode == 0, cli.stderr
    assert "studies compared: 1; not compared: 0" in cli.stdout
    fat_row = next(line.split() for line in cli.stdout.splitlines() if line.startswith("Adipose tissue"))
    assert fat_row[2:5] == ["1", f"{fat['dice']:.3f}", f"{fat['dice']:.3f}"]
    assert "Adipose tissue: Volume" in cli.stdout
    assert metric_value(metrics, "radnode_shadow_studies_compared", production="ct_tissue",
                        candidate="ct_candidate") == 1
    assert metric_value(metrics, "radnode_shadow_dice", production="ct_tissue", candidate="ct_candidate",
                        segment="Adipose tissue", statistic="median") == pytest.approx(fat["dice"], abs=1e-3)
    ratio = comparison["candidate_wall_seconds"] / comparison["production_wall_seconds"]
    assert metric_value(metrics, "radnode_shadow_time_ratio", production="ct_tissue", candidate="ct_candidate",
                        clock="wall") == pytest.approx(ratio, abs=1e-3)
