"""Does the uncertainty mean something? Inputs made harder in known ways must score higher, the scores must
rank the worse segmentations first, and the map must point at the wrong voxels. Also the metric helpers,
and the review flag end to end: configured limits → the run's manifest → the node's job store and API,
agreeing with the DiagnosticReport."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from factories import LESION_SPACING, lesion_ct, write_lesion_case
from radnode.config import Config
from radnode.execution import RunManifest
from radnode.imaging.volume import Volume
from radnode.models.inference import InferenceOptions, segment_with_model
from radnode.models.loading import load_model_folder
from radnode.uncertainty import (
    UncertaintyThresholds,
    auroc,
    dice,
    expected_calibration_error,
    normalised_entropy,
    spearman,
    summarise_samples,
)
from radnode.node.egress import outbox_dir
from radnode.node.service import Node
from radnode.node.store import JobState
from support.console import api, api_json, token_for
from support.dicom_tools import storescu
from support.node import final_job, node_config
from support.waiting import wait_until

DEGRADATIONS = {
    "clean": lambda hu, rng: hu,
    "noise": lambda hu, rng: hu + rng.normal(0, 60, hu.shape),
    "blur": lambda hu, rng: ndi.gaussian_filter(hu, 1.5),
    "shift": lambda hu, rng: hu + 80.0,
    "crop": lambda hu, rng: np.where(np.arange(hu.shape[2])[None, None, :] > hu.shape[2] // 2, -1000.0, hu),
}
"""Noise, blur, an intensity shift (tissue raised to the lesion's level) and anatomy cut off by air."""


def _volume(hu: np.ndarray) -> Volume:
    n = hu.shape[0]
    positions = np.stack([np.zeros(n), np.zeros(n), np.arange(n) * LESION_SPACING[0]], axis=1)
    return Volume(hu.astype(np.float32), LESION_SPACING, positions, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))


def test_normalised_entropy_and_sample_summary() -> None:
    certain = np.stack([np.zeros((2, 2, 2)), np.ones((2, 2, 2))])
    assert normalised_entropy(certain).max() < 1e-5
    assert normalised_entropy(np.full((2, 2, 2, 2), 0.5)).min() == pytest.approx(1.0)
    agree = np.stack([certain, certain])
    disagree = np.stack([certain, certain[::-1]])
    _, report = summarise_samples(agree, {1: "x"}, "test", UncertaintyThresholds())
    assert report.segments[0].agreement == 1.0 and not report.needs_review
    _, report = summarise_samples(disagree, {1: "x"}, "test", UncertaintyThresholds())
    assert report.review_reasons == ["x: sample agreement 0.500 < 0.9"]  # consensus of a 50/50 split is empty



def test_streaming_postprocess_equals_the_stacked_summary() -> None:
    """postprocess restores one sample at a time (memory); its result equals summarising the stacked samples."""
    from radnode.models.inference import Prepared, array_backend, postprocess, resample
    from radnode.models.spec import ModelSpec
    from radnode.results import Structure

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 3, 6, 7, 8)).astype(np.float32)
    samples = list(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True))
    backend = array_backend(prefer_gpu=False)
    source = (9, 10, 12)
    structures = {1: Structure("a", "A", None, None), 2: Structure("b", "B", None, None)}  # type: ignore[arg-type]
    spec = ModelSpec("m", "0", structures, (4, 4, 4))
    result = postprocess(samples, Prepared(samples[0][:1], source, backend), spec, "test")
    stacked = np.stack([resample(s, source, backend) for s in samples])
    mean, report = summarise_samples(stacked, {1: "a", 2: "b"}, "test")
    assert np.allclose(result.probabilities, mean, atol=1e-6)
    assert np.allclose(result.uncertainty.map, report.map, atol=1e-6)
    assert result.uncertainty.segments == report.segments and result.uncertainty.n_samples == 5
    assert [s.mask.sum() for s in result.segments] == [(mean.argmax(0) == i).sum() for i in (1, 2)]

def test_metric_helpers() -> None:
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.9, 0.2, 0.8, 0.1]), np.array([0, 0, 1, 1])) == 0.25
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    p = np.array([0.9, 0.9, 0.1, 0.1])
    assert expected_calibration_error(p, np.array([1, 1, 0, 0])) == pytest.approx(0.1)
    assert expected_calibration_error(p, np.array([1, 0, 0, 1])) == pytest.approx(0.4)
    assert dice(np.ones(3, bool), np.zeros(3, bool)) == 0.0


def test_configured_limits_default_to_the_pipelines_defaults() -> None:
    assert Config().uncertainty.thresholds() == UncertaintyThresholds()
    config = Config.model_validate({"uncertainty": {"max_mean": 0.2}})
    assert config.uncertainty.thresholds() == UncertaintyThresholds(max_mean=0.2)


@pytest.fixture(scope="module")
def bundle_folder(tiny_bundle: Path) -> Path:
    return tiny_bundle  # conftest: the small bundle test_models trains, once per session


@pytest.fixture(scope="module")
def model(bundle_folder: Path):
    return load_model_folder(bundle_folder)


def test_degraded_inputs_score_higher_and_rank_errors(model) -> None:
    options = InferenceOptions(mirror_tta=True, mc_dropout_passes=2)
    scores: dict[str, list[float]] = {name: [] for name in DEGRADATIONS}
    errors: dict[str, list[float]] = {name: [] for name in DEGRADATIONS}
    maps, wrong, probabilities, truths = [], [], [], []
    for seed in (200, 201, 202):
        hu, truth = lesion_ct(seed)
        for name, degrade in DEGRADATIONS.items():
            result = segment_with_model(_volume(degrade(hu, np.random.default_rng(seed))), model, options)
            mask = result.segments[0].mask
            report = result.uncertainty
            scores[name].append(report.segments[0].boundary + (1 - report.segments[0].agreement))
            errors[name].append(1 - dice(mask, truth))
            maps.append(report.map.ravel())
            wrong.append((mask != truth).ravel())
            probabilities.append(result.probabilities[1].ravel())
            truths.append(truth.ravel())
    all_scores = [s for name in DEGRADATIONS for s in scores[name]]
    all_errors = [e for name in DEGRADATIONS for e in errors[name]]
    rho = spearman(all_scores, all_errors)
    voxel_auroc = auroc(np.concatenate(maps), np.concatenate(wrong))
    ece = expected_calibration_error(np.concatenate(probabilities), np.concatenate(truths))
    print(f"Spearman(score, Dice error) = {rho:.3f}, voxel AUROC = {voxel_auroc:.3f}, ECE = {ece:.4f}")
    for name in DEGRADATIONS:
        print(f"{name:6} score {np.mean(scores[name]):.3f}  Dice error {np.mean(errors[name]):.3f}")
    clean = np.mean(scores["clean"])
    for name in ("noise", "blur", "shift", "crop"):
        assert np.mean(scores[name]) > clean, f"{name} scored {np.mean(scores[name]):.3f} <= clean {clean:.3f}"
    assert rho > 0.4
    assert voxel_auroc > 0.8
    assert ece < 0.1


def _diagnostic_report(outbox: Path) -> dict:
    bundle = json.loads((outbox / "fhir-bundle.json").read_text())
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")


IN_PROCESS_ROUTE = """\
rules:
  - name: lesion-model
    when: {Modality: CT}
    pipelines: [model_seg]
"""
SUBPROCESS_ROUTE = IN_PROCESS_ROUTE + "    execution: {mode: subprocess}\n"


@pytest.mark.slow
def test_a_study_past_a_configured_limit_is_marked_for_review_in_the_job_store(
        tmp_path: Path, bundle_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same study through two nodes running the shipped ``model_seg`` pipeline on the bundle their
    configuration names (``processing.models``) in job processes; they differ only in ``uncertainty.max_mean``:
    below the model's mean uncertainty (about 0.47 on this case), then above it. The first runs the job
    in-process (the node's default mode), the second as the app's MAP command (a subprocess route)."""
    monkeypatch.delenv("HOLOSCAN_MODEL_PATH", raising=False)
    case = write_lesion_case(tmp_path / "case", seed=100)
    for name, max_mean in (("flagged", 0.2), ("clear", 0.8)):
        rules = tmp_path / f"{name}-rules.yaml"
        rules.write_text(SUBPROCESS_ROUTE if name == "clear" else IN_PROCESS_ROUTE)
        config = node_config(tmp_path / name, processing={"job_timeout_seconds": 300,
                                                          "models": {"model_seg": str(bundle_folder)}},
                             uncertainty={"max_mean": max_mean, "max_boundary": 0.9, "min_agreement": 0.8},
                             api={"enabled": True, "port": 0})
        config = config.model_copy(update={"rules": rules})
        with Node(config, poll_seconds=0.1) as node:
            assert storescu(node.port, case).returncode == 0
            wait_until(lambda: len(node.jobs()) == 1)
            job = final_job(node, node.jobs()[0].id, timeout=300)
            assert job.state is JobState.DONE, job.reason
            token = token_for(node, "viewer")
            listed = {flag: [j["id"] for j in api_json(node, f"/api/jobs?needs_review={flag}", token)["jobs"]]
                      for flag in ("true", "false")}
            one = api_json(node, f"/api/jobs/{job.id}", token)
            health = api_json(node, "/health", token)
            with api(node, token) as client:
                assert client.get("/api/jobs?needs_review=maybe").status_code == 422
            review_events = [e.message for e in node.events(job.id) if e.kind == "review"]
            running = next(e.message for e in node.events(job.id) if e.kind == "running")
        manifest = RunManifest.read(outbox_dir(config, job.id))
        assert manifest.pipeline == "model_seg"
        assert running.startswith("subprocess: " if name == "clear" else "in-process: "), running
        report = _diagnostic_report(outbox_dir(config, job.id))
        flagged_in_report = any(c["code"] == "REVIEW-REQUIRED" for concept in report.get("conclusionCode", [])
                                for c in concept["coding"])
        assert manifest.review is not None
        assert manifest.review.thresholds == {"max_mean": max_mean, "max_boundary": 0.9, "min_agreement": 0.8}
        assert job.needs_review is manifest.review.needs_review is flagged_in_report is (name == "flagged")
        assert list(job.review_reasons) == manifest.review.reasons == one["review_reasons"]
        assert one["needs_review"] is job.needs_review and one["state"] == "done"
        assert health["needs_review"] == int(job.needs_review)
        if name == "flagged":
            (reason,) = job.review_reasons
            assert re.fullmatch(r"lesion: mean uncertainty 0\.\d{3} > 0\.2", reason)
            (exceeded,) = manifest.review.exceeded
            assert exceeded["value"] > 0.2 and {k: exceeded[k] for k in ("structure", "score", "limit", "threshold")} \
                == {"structure": "lesion", "score": "mean", "limit": "max_mean", "threshold": 0.2}
            assert f"Flagged for human review: {reason}." in report["conclusion"]
            assert listed == {"true": [job.id], "false": []}
            assert review_events == [f"flagged for human review: {reason}"]
        else:
            assert job.review_reasons == () and manifest.review.exceeded == []
            assert "Flagged for human review" not in report["conclusion"]
            assert listed == {"true": [], "false": [job.id]}
            assert review_events == ["within the uncertainty limits: no review needed"]
