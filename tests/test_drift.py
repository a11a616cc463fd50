"""Drift: the population stability index against hand computations, the input attributes against known phantoms,
and a real node raising one alert per shifted attribute (and none on a stable stream).

The node tests run the real node — DCMTK's storescu sends phantom CT studies, the node assembles each study,
runs its job, records the study's attributes from the job's input files, and its drift thread compares them
— with the stand-in job command (``support.node.STAND_IN``), not ct_tissue: 60 real ct_tissue runs do not fit
the test budget, and the input attributes are measured from the node's own copy of the input whatever the
pipeline. Output attributes (measurements, uncertainty, review flag) are read from a run's manifest, checked
here on a manifest written as the pipelines write it (and on a real ct_tissue run in test_feedback.py).
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from factories import PATIENT, write_chest_phantom
from radnode.config import DriftConfig
from radnode.console.accounts import Role
from radnode.feedback.drift import (
    EPSILON, Observation, compare, ct_pixel_attributes, evaluate, input_attributes, numeric_bins, numeric_counts,
    psi,
)
from radnode.node.service import Node
from radnode.node.store import FINAL_STATES, JobState
from support.console import api, api_json, token_for
from support.dicom_tools import storescu
from support.node import node_config
from support.waiting import wait_until


# --- the index --------------------------------------------------------------------------------------------

def test_psi_is_the_hand_computed_sum_with_epsilon_for_an_empty_bin() -> None:
    expected, actual = [0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]
    by_hand = ((0.25 - 0.5) * math.log(0.25 / 0.5) + (0.25 - 0.3) * math.log(0.25 / 0.3)
               + (0.25 - 0.2) * math.log(0.25 / 0.2) + (0.25 - EPSILON) * math.log(0.25 / EPSILON))
    assert psi(expected, actual) == pytest.approx(by_hand, rel=1e-12)
    assert psi(actual, actual) == 0
    assert psi([1.0, 0.0], [1.0, 0.0]) == 0  # a bin empty on both sides adds nothing
    # PSI is the symmetrised Kullback-Leibler divergence: scipy's entropy gives both directions
    p, q = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.4, 0.3, 0.2, 0.1])
    assert psi(p, q) == pytest.approx(stats.entropy(p, q) + stats.entropy(q, p), rel=1e-12)


def test_numeric_bins_are_the_baselines_quantiles_and_a_shared_value_is_a_bin_of_its_own() -> None:
    baseline = np.arange(1.0, 21.0)  # 1 … 20
    edges = numeric_bins(baseline, 4)
    assert edges.tolist() == pytest.approx(np.quantile(baseline, [0.25, 0.5, 0.75]).tolist())
    counts = numeric_counts(baseline, edges)  # (−∞,5.75) [5.75] (5.75,10.5) [10.5] (10.5,15.25) [15.25] (15.25,∞)
    assert counts.tolist() == [5, 0, 5, 0, 5, 0, 5]
    constant = numeric_bins([2.5] * 20, 10)
    assert constant.tolist() == [2.5] and numeric_counts([1.25, 2.5, 2.5, 5.0], constant).tolist() == [1, 2, 1]

    # a window of 10 studies at 5 mm against a baseline of 20 at 2.5 mm: all mass moves to an empty bin
    shift = compare("slice_thickness_mm", "input", [2.5] * 20, [5.0] * 10, bins=10, threshold=0.25, p_value=0.001)
    by_hand = (EPSILON - 1) * math.log(EPSILON / 1) + (1 - EPSILON) * math.log(1 / EPSILON)
    assert shift.psi == pytest.approx(by_hand) and shift.drifting
    assert shift.p_value == pytest.approx(stats.ks_2samp([2.5] * 20, [5.0] * 10).pvalue)
    # quartile bins of a uniform baseline, a window shifted by half its range: counts by hand
    window = np.arange(11.0, 21.0)  # 11 … 20: two bins hold it
    expected = numeric_counts(baseline, edges) / 20
    actual = np.array([0, 0, 0, 0, 5, 0, 5]) / 10
    assert numeric_counts(window, edges).tolist() == [0, 0, 0, 0, 5, 0, 5]
    assert compare("x", "input", baseline.tolist(), window.tolist(), bins=4, threshold=0.25,
                   p_value=None).psi == pytest.approx(psi(expected, actual))


def test_categories_compare_by_category_and_a_small_windows_noise_raises_nothing() -> None:
    shift = compare("scanner", "input", ["A"] * 15 + ["B"] * 5, ["B"] * 10, bins=10, threshold=0.25, p_value=0.001)
    by_hand = (EPSILON - 0.75) * math.log(EPSILON / 0.75) + (1 - 0.25) * math.log(1 / 0.25)
    assert shift.psi == pytest.approx(by_hand)
    assert shift.p_value == pytest.approx(stats.chi2_contingency([[15, 5], [0, 10]]).pvalue) and shift.drifting
    # ten draws from the baseline's own distribution: PSI on deciles is large by chance, the test says so
    rng = np.random.default_rng(7)
    noise = compare("x", "input", rng.normal(0, 1, 20).tolist(), rng.normal(0, 1, 10).tolist(), bins=10,
                    threshold=0.25, p_value=0.001)
    assert noise.psi >= 0.25 and noise.p_value > 0.001 and not noise.drifting


def test_the_window_is_the_last_studies_after_a_complete_baseline() -> None:
    settings = DriftConfig(window=3, baseline_studies=4)
    obs = [Observation(k, "p", float(k), {"x": float(k < 4)}, {}) for k in range(6)]
    assert evaluate(obs, settings) == (4, 0, [])  # 2 after the baseline: no whole window yet
    baseline_n, window_n, (shift,) = evaluate([*obs, Observation(6, "p", 6.0, {"x": 0.0}, {})], settings)
    assert (baseline_n, window_n, shift.attribute, shift.baseline_n, shift.window_n) == (4, 3, "x", 4, 3)
    dated = DriftConfig(window=2, baseline_studies=100, baseline_from="1970-01-01T00:00:01Z",
                        baseline_to="1970-01-01T00:00:03Z")
    assert evaluate(obs, dated)[:2] == (3, 2)  # recorded at 1, 2, 3 s; the window the last two after


def test_one_alert_per_episode_a_new_one_after_the_shift_clears_and_returns(store_target: Path | str) -> None:
    from radnode.feedback.drift import Shift
    from radnode.node.store import JobStore

    def shift(psi_value: float) -> Shift:
        return Shift("noise_hu", "input", psi_value, 1e-6, psi_value >= 0.25, 20, 10, "median 10", "median 25")

    store = JobStore(store_target)
    try:
        changes = [store.record_drift("ct", 20, 10, [shift(value)], {"noise_hu": f"PSI {value}"})
                   for value in (3.0, 4.0, 2.0, 0.1, 0.05, 5.0, 6.0)]
        assert [len(c.raised) for c in changes] == [1, 0, 0, 0, 0, 1, 0]  # raised, lasting, lasting, cleared, quiet,
        assert [c.cleared for c in changes] == [[], [], [], ["noise_hu"], [], [], []]  # raised again, lasting
        (pipeline,) = store.drift_document()
        first, second = pipeline["alerts"]
        assert (first["psi"], first["peak_psi"], second["psi"], second["peak_psi"]) == (3.0, 4.0, 5.0, 6.0)
        assert first["cleared_at"] is not None and second["cleared_at"] is None
        assert [(a["attribute"], a["psi"], a["drifting"]) for a in pipeline["attributes"]] == [("noise_hu", 6.0, True)]

        from radnode.feedback.drift import drift_csv, drift_table

        document = {"method": "PSI", "window": 10, "baseline": "the pipeline's first 20 studies", "psi_alert": 0.25,
                    "p_value": 0.001, "bins": 10, "pipelines": [pipeline]}
        table = drift_table(document)
        assert "alert at PSI >= 0.25 with p < 0.001" in table and "ct: 0 studies recorded" in table
        assert "input  noise_hu" in table and "PSI    6.000" in table and "DRIFT" in table
        assert f"alert {first['id']} (cleared): PSI 3.0" in table and f"alert {second['id']} (open): PSI 5.0" in table
        assert drift_csv(document).splitlines() == [
            "pipeline,kind,attribute,psi,p_value,drifting,alert,baseline_n,window_n,baseline,window",
            "ct,input,noise_hu,6.0,1e-06,True,open,20,10,median 10,median 25"]
    finally:
        store.close()


def test_an_alerts_start_and_its_clearing_are_both_in_the_audit_trail(store_target: Path | str, tmp_path: Path) -> None:
    """Ten studies of a baseline, ten far off (an alert opens: a Security Alert, outcome minor failure), ten back
    at the baseline (it clears: a Security Alert with outcome success naming the attribute)."""
    from radnode.config import AuditConfig
    from radnode.feedback.drift import DriftMonitor
    from radnode.node.store import JobStore
    from radnode.node.store.records import Instance
    from radnode.pipelines.routing import SeriesDecision
    from radnode.security.audit import AuditTrail
    from radnode.security.privacy import SiteKey

    store = JobStore(store_target)
    audit = AuditTrail(AuditConfig(), tmp_path / "data", "RADNODE", SiteKey(b"k" * 32))
    monitor = DriftMonitor(DriftConfig(window=10, baseline_studies=10), store, audit)

    def study(k: int, value: float) -> None:
        uid = f"1.2.826.0.2.{k}"
        _, job_id = store.record_instance(Instance(
            sop_instance_uid=f"{uid}.1.1", study_instance_uid=uid, series_instance_uid=f"{uid}.1", patient_id="P1",
            modality="CT", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", path=f"/spool/{k}.dcm", calling_ae="CT",
            peer_address="127.0.0.1:4000", association_id="a", received_at=1000.0 + k), SeriesDecision(("ct",)))
        store.record_observation(job_id, "ct", {"noise_hu": value}, {})

    def drift_messages() -> list[str]:
        return [m for m in audit.messages() if "RADNODE-DRIFT" in m]

    try:
        for k in range(10):
            study(k, 10.0 + k / 10)
        monitor.tick()
        for k in range(10, 20):
            study(k, 40.0 + k / 10)
        monitor.tick()
        (opened,) = drift_messages()
        assert 'EventOutcomeIndicator="4"' in opened
        for k in range(20, 30):
            study(k, 10.0 + (k - 20) / 10)
        monitor.tick()
        opened_again, cleared = drift_messages()
        assert opened_again == opened and 'EventOutcomeIndicator="0"' in cleared
        import base64
        import re

        (description,) = re.findall(r'type="Alert Description" value="([^"]+)"', cleared)
        assert base64.b64decode(description).decode().startswith("ct: drift alert on noise_hu cleared: PSI 0.000")
        assert store.drift_document()[0]["alerts"][0]["cleared_at"] is not None
    finally:
        audit.close()
        store.close()


def test_the_store_reads_only_the_baseline_and_the_last_window(store_target: Path | str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime as dt
    import types

    from radnode.node.store import JobStore
    from radnode.node.store.records import Instance
    from radnode.pipelines.routing import SeriesDecision

    store = JobStore(store_target)
    try:
        jobs = []
        for k in range(8):  # eight studies, recorded at 1000 s, 1001 s, … after the epoch
            study = f"1.2.826.0.1.{k}"
            _, job_id = store.record_instance(Instance(
                sop_instance_uid=f"{study}.1.1", study_instance_uid=study, series_instance_uid=f"{study}.1",
                patient_id="P1", modality="CT", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", path=f"/spool/{k}.dcm",
                calling_ae="CT", peer_address="127.0.0.1:4000", association_id="a", received_at=1000.0 + k),
                SeriesDecision(("ct",)))
            monkeypatch.setattr("radnode.node.store.drift.time", types.SimpleNamespace(time=lambda k=k: 1000.0 + k))
            store.record_observation(job_id, "ct", {"x": float(k)}, {})
            jobs.append(job_id)
        first = DriftConfig(window=2, baseline_studies=3)
        assert [o.job_id for o in store.drift_observations("ct", first)] == [*jobs[:3], *jobs[6:]]
        at = dt.datetime.fromtimestamp
        dated = DriftConfig(window=2, baseline_from=at(1001, dt.timezone.utc), baseline_to=at(1003, dt.timezone.utc))
        read = store.drift_observations("ct", dated)
        assert [o.job_id for o in read] == [*jobs[1:4], *jobs[6:]]
        baseline_n, window_n, (shift,) = evaluate(read, dated)
        assert (baseline_n, window_n, shift.baseline, shift.window) == (3, 2, "median 2 (range 1–3)",
                                                                        "median 6.5 (range 6–7)")
    finally:
        store.close()


# --- the attributes ---------------------------------------------------------------------------------------

def test_the_noise_estimate_recovers_a_known_sigma_beside_edges() -> None:
    rng = np.random.default_rng(3)
    for sigma in (5.0, 10.0, 25.0):
        image = np.full((128, 128), -1000.0)
        image[16:112, 16:112] = 40.0
        image[40:80, 40:80] = 700.0  # bone: an edge the estimator must not count
        slices = [image + rng.normal(0, sigma, image.shape) for _ in range(3)]
        assert ct_pixel_attributes(slices)["noise_hu"] == pytest.approx(sigma, rel=0.08)


def test_input_attributes_are_read_from_the_series_headers_and_pixels(tmp_path: Path) -> None:
    files = write_chest_phantom(tmp_path / "ct", 12, 48, 48, seed=1, slice_mm=5.0, noise_hu=20.0)
    found = input_attributes(files)
    assert {k: found[k] for k in ("scanner", "kvp", "slice_thickness_mm", "convolution_kernel", "contrast_agent")} \
        == {"scanner": "Phantom Scanners / Geometric CT", "kvp": 120.0, "slice_thickness_mm": 5.0,
            "convolution_kernel": "none", "contrast_agent": "none"}
    assert found["pixel_spacing_mm"] == pytest.approx(448 / 48)
    assert found["noise_hu"] == pytest.approx(20.0, rel=0.15)
    assert -200 < found["body_hu_mean"] < 200


def test_output_attributes_are_each_measurement_uncertainty_score_and_the_review_flag() -> None:
    from radnode.execution import ReviewDecision, RunManifest
    from radnode.feedback.drift import output_attributes

    manifest = RunManifest(pipeline="p", version="1", input="in", outputs=[], seconds=1.0, measurements=[
        {"structure": "liver", "concept": {"value": "118565006", "scheme_designator": "SCT", "meaning": "Volume"},
         "unit": "mL", "value": 1510.5},
        {"structure": "liver", "concept": {"value": "UNC-BOUNDARY", "scheme_designator": "99RADNODE",
                                           "meaning": "Mean predictive entropy on segment boundary"},
         "unit": "1", "value": 0.31}],
        review=ReviewDecision(needs_review=True, reasons=["r"], exceeded=[], thresholds={}))
    assert output_attributes(manifest) == {"liver: Volume (mL)": 1510.5, "liver: UNC-BOUNDARY": 0.31,
                                           "review flag": "flagged"}


# --- a real node ------------------------------------------------------------------------------------------

DRIFT = {"drift": {"window": 10, "baseline_studies": 20}}


def _phantoms(folder: Path, seeds: range, *, slice_mm: float = 2.5, noise_hu: float = 10.0) -> Path:
    """Studies of the first distribution vary as real ones do: their own noise seed, size and slice count."""
    for seed in seeds:
        jitter = random.Random(seed)
        size = jitter.choice((40, 44, 48))
        write_chest_phantom(folder / f"study{seed}", jitter.randint(6, 9), size, size, seed=seed,
                            slice_mm=slice_mm, noise_hu=noise_hu)
    return folder


def _send_and_wait(node: Node, folder: Path, total: int) -> None:
    assert storescu(node.port, folder).returncode == 0
    wait_until(lambda: len(node.jobs()) == total and all(j.state in FINAL_STATES for j in node.jobs()), timeout=240)
    assert [j.state for j in node.jobs()] == [JobState.DONE] * total, [j.reason for j in node.jobs()]


class DriftReader:
    """What the node says of drift, through its API and ``/metrics``, with one token per role."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.viewer = token_for(node, Role.VIEWER)
        self.scraper = token_for(node, Role.ADMIN, "scraper")

    def document(self) -> dict:
        return api_json(self.node, "/api/drift", self.viewer)

    def evaluated(self, studies: int) -> bool:
        """The drift thread has compared the pipeline's ``studies`` recorded studies."""
        (pipeline,) = self.document()["pipelines"] or [{"studies": 0, "attributes": []}]
        return pipeline["studies"] == studies and bool(pipeline["attributes"])

    def metrics(self) -> dict[tuple[str, str], float]:
        """The ``radnode_drift_*`` samples by (name, attribute), parsed by prometheus_client."""
        from prometheus_client.parser import text_string_to_metric_families

        with api(self.node, self.scraper) as client:
            text = client.get("/metrics").text
        return {(s.name, s.labels.get("attribute", "")): s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name.startswith("radnode_drift")}


@pytest.mark.slow
def test_a_thicker_noisier_stream_after_twenty_studies_raises_one_alert_per_shifted_attribute(
        tmp_path: Path, stand_in: list[str], playwright_core: Path) -> None:
    with Node(node_config(tmp_path, feedback=DRIFT, processing={"max_concurrent_jobs": 3}), job_command=stand_in,
              poll_seconds=0.1) as node:
        reader = DriftReader(node)
        _send_and_wait(node, _phantoms(tmp_path / "first", range(20)), 20)
        _send_and_wait(node, _phantoms(tmp_path / "shifted", range(20, 30), slice_mm=5.0, noise_hu=25.0), 30)
        wait_until(lambda: reader.evaluated(30), timeout=30)
        (pipeline,) = reader.document()["pipelines"]
        alerts = pipeline["alerts"]
        assert sorted(a["attribute"] for a in alerts) == ["noise_hu", "slice_thickness_mm"], alerts
        assert all(a["kind"] == "input" and a["cleared_at"] is None and a["psi"] >= 0.25 for a in alerts)
        thickness = next(a for a in alerts if a["attribute"] == "slice_thickness_mm")
        assert "median 2.5 " in thickness["message"] and "median 5 " in thickness["message"]
        figures = {a["attribute"]: a for a in pipeline["attributes"]}
        assert figures["slice_thickness_mm"]["drifting"] and not figures["scanner"]["drifting"]

        metrics = reader.metrics()
        assert metrics[("radnode_drift_psi", "slice_thickness_mm")] == pytest.approx(
            figures["slice_thickness_mm"]["psi"])
        assert metrics[("radnode_drift_alerts_total", "slice_thickness_mm")] == 1
        assert metrics[("radnode_drift_alerts_total", "noise_hu")] == 1
        assert metrics[("radnode_drift_alert_active", "noise_hu")] == 1
        assert ("radnode_drift_alerts_total", "scanner") not in metrics

        audited = [m for m in node.audit.messages() if "RADNODE-DRIFT" in m]  # type: ignore[union-attr]
        assert len(audited) == 2 and any("slice_thickness_mm: PSI" in m for m in audited), audited
        assert all('EventID csd-code="110113"' in m for m in audited)

        node.accounts.add_user("physicist", Role.VIEWER, "a long enough password")
        browser = subprocess.run(
            ["node", str(Path(__file__).parent / "support" / "drift_browser.cjs")], capture_output=True, text=True,
            timeout=180, env={**os.environ, "PLAYWRIGHT_CORE": str(playwright_core),
                              "CONSOLE_URL": f"http://127.0.0.1:{node.api_port}", "CONSOLE_USER": "physicist",
                              "CONSOLE_PASSWORD": "a long enough password"})
        assert browser.returncode == 0, browser.stdout + browser.stderr
        shown = json.loads(browser.stdout.strip().splitlines()[-1].removeprefix("DRIFT "))
        assert shown["alerts"] == shown["drifting"] == ["noise_hu", "slice_thickness_mm"]
        assert shown["psi"]["slice_thickness_mm"] == f"{figures['slice_thickness_mm']['psi']:.3f}"

        token_file = tmp_path / "token"
        token_file.write_text(reader.viewer)
        cli = subprocess.run([sys.executable, "-m", "radnode", "drift", "--format", "csv", "--url",
                              f"http://127.0.0.1:{node.api_port}", "--token-file", str(token_file)],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        rows = {line.split(",")[2]: line for line in cli.stdout.splitlines()[1:]}
        assert ",True,open," in rows["slice_thickness_mm"] and ",False,," in rows["scanner"]
        assert PATIENT["PatientID"] not in cli.stdout and PATIENT["PatientName"] not in cli.stdout

        with api(node, reader.viewer) as client:  # the export kinds a quality committee takes away
            exported = client.get("/api/export/drift-alerts", params={"format": "json"}).json()["rows"]
            states = client.get("/api/export/drift", params={"format": "csv"}).text
        assert sorted(r["attribute"] for r in exported) == ["noise_hu", "slice_thickness_mm"]
        assert {r["psi"] for r in exported} == {a["psi"] for a in alerts}
        assert states.splitlines()[0].startswith("pipeline,attribute,kind,psi") and "slice_thickness_mm" in states
        assert PATIENT["PatientID"] not in states + json.dumps(exported)


@pytest.mark.slow
def test_thirty_studies_of_the_first_distribution_raise_no_alert(tmp_path: Path, stand_in: list[str]) -> None:
    with Node(node_config(tmp_path, feedback=DRIFT, processing={"max_concurrent_jobs": 3}), job_command=stand_in,
              poll_seconds=0.1) as node:
        reader = DriftReader(node)
        _send_and_wait(node, _phantoms(tmp_path / "stable", range(100, 130)), 30)
        wait_until(lambda: reader.evaluated(30), timeout=30)
        (pipeline,) = reader.document()["pipelines"]
        assert pipeline["alerts"] == [] and not any(a["drifting"] for a in pipeline["attributes"]), pipeline
        assert {a["attribute"] for a in pipeline["attributes"]} >= {"slice_thickness_mm", "noise_hu", "kvp"}
        assert not [m for m in node.audit.messages() if "RADNODE-DRIFT" in m]  # type: ignore[union-attr]
