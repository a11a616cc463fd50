"""Uncertainty evaluation on a real model: deepbet brain extraction of Colin27 (mricron-data) under known
degradations: Gaussian noise, blur, an intensity ramp (bias field), the top of the head blanked to zero, and the
top of the head outside the field of view (slices not acquired), at two or three strengths each.

Per case: the node's per-case score, its three components (mean and boundary entropy, sample agreement of the
intracranial mask), whether the node flags the study, and two errors:

* ``dice_error``: 1 − Dice against ch2bet, the template's own brain extraction (FSL BET). deepbet's mask is
  about 13 % larger than BET's on the clean scan (a 1–3 mm shell of CSF and meninges that BET leaves out), so
  every case carries that convention difference (Dice error 0.065 on the clean scan), and a degradation that
  shrinks the mask moves it towards BET's convention and *lowers* this error (blur).
* ``change``: 1 − Dice against the model's own mask of the clean scan: the error the degradation caused,
  free of the convention difference (0 for the clean case).

The per-case score is the **review margin** of the intracranial mask: the largest of mean / max_mean,
boundary / max_boundary and (1 − agreement) / (1 − min_agreement) under the node's default limits, so a study
is flagged for review exactly when its margin is above 1. Summary: Spearman of the score against each error,
the voxel-level AUROC of the uncertainty map for wrong voxels (against ch2bet) and for changed voxels (against
the clean mask, degraded cases only), the ECE of the voxel probabilities against ch2bet, and how many
degraded cases score above the clean one. Voxel figures use every second voxel per axis, and only the imaged
voxels (the slices outside the field of view have no map); for Dice the missing slices count as not brain.

    python bench/uncertainty_eval.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from radnode.imaging.brain import extract_brain
from radnode.imaging.mri import nifti_to_axial_volume
from radnode.imaging.volume import Volume
from radnode.models.deepbet import load_deepbet
from radnode.uncertainty import UncertaintyReport, auroc, dice, expected_calibration_error, spearman

TEMPLATES = Path("/usr/share/mricron/templates")
SUBSAMPLE = (slice(None, None, 2),) * 3


def degrade(array: np.ndarray, kind: str, strength: float, seed: int = 0) -> np.ndarray:
    """The T1 (float32 array, slices foot to head) made harder; float32 out.

    noise: additive Gaussian, SD ``strength`` × the volume's maximum (its own generator per case). blur:
    Gaussian, SD ``strength`` voxels. shift: intensity × a ramp from 1 − s (feet) to 1 + s (head), a strong
    bias field. crop: the top ``strength`` of the slices set to 0 (blanked, still in the array). fov: the top
    ``strength`` of the slices removed (not acquired: the field of view ends there).
    """
    array = np.asarray(array, dtype=np.float32)
    if kind == "noise":
        rng = np.random.default_rng(seed)
        return array + rng.normal(0, strength * float(array.max()), array.shape).astype(np.float32)
    if kind == "blur":
        return ndi.gaussian_filter(array, strength)
    if kind == "shift":
        ramp = np.linspace(1 - strength, 1 + strength, array.shape[0], dtype=np.float32)[:, None, None]
        return array * ramp
    if kind == "crop":
        out = array.copy()
        out[int(array.shape[0] * (1 - strength)):] = 0
        return out
    if kind == "fov":
        return array[: int(array.shape[0] * (1 - strength))].copy()
    if kind == "clean":
        return array
    raise ValueError(f"unknown degradation {kind!r}")


def degraded_volume(t1: Volume, kind: str, strength: float) -> Volume:
    """``t1`` degraded, as a Volume (slices removed for ``fov``)."""
    array = degrade(t1.array, kind, strength, seed=zlib.crc32(f"{kind} {strength:g}".encode()))
    n = array.shape[0]
    return Volume(array, t1.spacing, t1.positions[:n], t1.orientation, modality="MR")


CASES: list[tuple[str, float]] = [("clean", 0.0)] + [
    (kind, strength) for kind, levels in {"noise": (0.05, 0.15, 0.3), "blur": (2.0, 4.0, 6.0), "shift": (0.4, 0.8),
                                          "crop": (0.15, 0.3), "fov": (0.15, 0.3)}.items()
    for strength in levels]
"""The clean scan first (the reference for ``change``)."""


def review_margin(report: UncertaintyReport, key: str = "intracranial") -> float:
    """The per-case score: how far the segment's scores are towards their review limits (> 1: flagged)."""
    s, limits = report.scores_for(key), report.limits
    assert s is not None
    return max(s.mean / limits.max_mean, s.boundary / limits.max_boundary,
               (1 - s.agreement) / (1 - limits.min_agreement))


def _padded(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    out[: mask.shape[0]] = mask
    return out


def _component_spearman(rows: list[dict[str, Any]], error: str) -> dict[str, float]:
    """Spearman of each score component against ``error``, signed so that higher means more uncertain."""
    components = {"mean": [r["mean"] for r in rows], "boundary": [r["boundary"] for r in rows],
                  "disagreement": [1 - r["agreement"] for r in rows]}
    return {k: round(spearman(v, [r[error] for r in rows]), 3) for k, v in components.items()}


def run(cases: list[tuple[str, float]] = CASES, models: Any = None) -> dict[str, Any]:
    """Every case through :func:`extract_brain`; per-case rows and the summary. ``cases[0]`` must be clean."""
    assert cases[0][0] == "clean", "the clean case comes first: it is the reference for the change"
    t1 = nifti_to_axial_volume(TEMPLATES / "ch2.nii.gz")
    truth = nifti_to_axial_volume(TEMPLATES / "ch2bet.nii.gz").array > 0
    models = models or load_deepbet()
    rows, maps, wrong, changed, probabilities, truths = [], [], [], [], [], []
    clean_mask = None
    for kind, strength in cases:
        volume = degraded_volume(t1, kind, strength)
        started = time.perf_counter()
        result = extract_brain(volume, models)
        seconds = time.perf_counter() - started
        mask = result.segments[0].mask
        full = _padded(mask, truth.shape)
        clean_mask = full if clean_mask is None else clean_mask
        report = result.uncertainty
        scores = report.segments[0]
        margin = review_margin(report)
        assert (margin > 1) == report.needs_review
        n = mask.shape[0]
        rows.append({"case": f"{kind} {strength:g}", "score": round(margin, 4), "mean": round(scores.mean, 4),
                     "boundary": round(scores.boundary, 4), "agreement": round(scores.agreement, 4),
                     "dice_error": round(1 - dice(full, truth), 4), "change": round(1 - dice(full, clean_mask), 4),
                     "flagged": report.needs_review, "seconds": round(seconds, 1)})
        print(rows[-1], flush=True)
        maps.append(report.map[SUBSAMPLE].ravel())
        wrong.append((mask != truth[:n])[SUBSAMPLE].ravel())
        changed.append((mask != clean_mask[:n])[SUBSAMPLE].ravel())
        probabilities.append(result.probabilities[1][SUBSAMPLE].ravel())
        truths.append(truth[:n][SUBSAMPLE].ravel())
    score = [r["score"] for r in rows]
    clean = rows[0]["score"]
    summary: dict[str, Any] = {
        "method": report.method,
        "cases": rows,
        "spearman_score_vs_dice_error": round(spearman(score, [r["dice_error"] for r in rows]), 3),
        "spearman_score_vs_change": round(spearman(score, [r["change"] for r in rows]), 3),
        "spearman_components_vs_dice_error": _component_spearman(rows, "dice_error"),
        "spearman_components_vs_change": _component_spearman(rows, "change"),
        "voxel_auroc_map_for_errors": round(auroc(np.concatenate(maps), np.concatenate(wrong)), 3),
        "ece": round(expected_calibration_error(np.concatenate(probabilities), np.concatenate(truths)), 4),
        "degraded_scoring_above_clean": f"{sum(s > clean for s in score[1:])}/{len(score) - 1}",
        "seconds_per_case": round(float(np.mean([r["seconds"] for r in rows])), 1),
    }
    if len(rows) > 1:
        summary["voxel_auroc_map_for_changes"] = round(auroc(np.concatenate(maps[1:]), np.concatenate(changed[1:])), 3)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    summary = run()
    print(json.dumps({k: v for k, v in summary.items() if k != "cases"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
