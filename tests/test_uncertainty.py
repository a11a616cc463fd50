"""Does the uncertainty mean something? Inputs made harder in known ways must score higher, the scores must
rank the worse segmentations first, and the map must point at the wrong voxels. Also the metric helpers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

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
from test_models import SPACING, synthetic_ct, train_tiny_unet, write_bundle

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
    positions = np.stack([np.zeros(n), np.zeros(n), np.arange(n) * SPACING[0]], axis=1)
    return Volume(hu.astype(np.float32), SPACING, positions, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))


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


def test_metric_helpers() -> None:
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.9, 0.2, 0.8, 0.1]), np.array([0, 0, 1, 1])) == 0.25
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    p = np.array([0.9, 0.9, 0.1, 0.1])
    assert expected_calibration_error(p, np.array([1, 1, 0, 0])) == pytest.approx(0.1)
    assert expected_calibration_error(p, np.array([1, 0, 0, 1])) == pytest.approx(0.4)
    assert dice(np.ones(3, bool), np.zeros(3, bool)) == 0.0


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return load_model_folder(write_bundle(tmp_path_factory.mktemp("unc") / "bundle", train_tiny_unet()))


def test_degraded_inputs_score_higher_and_rank_errors(model) -> None:
    options = InferenceOptions(mirror_tta=True, mc_dropout_passes=2)
    scores: dict[str, list[float]] = {name: [] for name in DEGRADATIONS}
    errors: dict[str, list[float]] = {name: [] for name in DEGRADATIONS}
    maps, wrong, probabilities, truths = [], [], [], []
    for seed in (200, 201, 202):
        hu, truth = synthetic_ct(seed)
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
