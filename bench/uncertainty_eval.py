"""Uncertainty evaluation on a real model: deepbet brain extraction of Colin27 (mricron-data) under known
degradations (noise, blur, intensity shift, cropped anatomy) at two strengths each.

Reports per case the uncertainty score (boundary entropy + 1 − sample agreement) and the Dice error
against ch2bet, then Spearman(score, Dice error), the voxel-level AUROC of the uncertainty map for
wrong voxels, and the ECE of the voxel probabilities.

    python bench/uncertainty_eval.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from radnode.imaging.brain import extract_brain
from radnode.imaging.mri import nifti_to_axial_volume
from radnode.imaging.volume import Volume
from radnode.models.deepbet import load_deepbet
from radnode.uncertainty import auroc, dice, expected_calibration_error, spearman

TEMPLATES = Path("/usr/share/mricron/templates")


def degrade(array: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """The T1 made harder: Gaussian noise (fraction of the max), blur (mm), bias-like shift, cropped top."""
    if kind == "noise":
        return array + rng.normal(0, strength * array.max(), array.shape).astype(np.float32)
    if kind == "blur":
        return ndi.gaussian_filter(array, strength)
    if kind == "shift":  # a smooth intensity ramp from foot to head, as a strong bias field
        ramp = np.linspace(1 - strength, 1 + strength, array.shape[0], dtype=np.float32)[:, None, None]
        return array * ramp
    if kind == "crop":  # the top of the head outside the field of view
        out = array.copy()
        out[int(array.shape[0] * (1 - strength)):] = 0
        return out
    return array


CASES = [("clean", 0.0)] + [(k, s) for k, levels in {"noise": (0.05, 0.15), "blur": (2.0, 4.0),
                                                     "shift": (0.4, 0.8), "crop": (0.15, 0.3)}.items()
                            for s in levels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    t1 = nifti_to_axial_volume(TEMPLATES / "ch2.nii.gz")
    truth = nifti_to_axial_volume(TEMPLATES / "ch2bet.nii.gz").array > 0
    models = load_deepbet()
    rng = np.random.default_rng(0)
    rows, maps, wrong, probs = [], [], [], []
    for kind, strength in CASES:
        volume = Volume(degrade(t1.array, kind, strength, rng), t1.spacing, t1.positions, t1.orientation,
                        modality="MR")
        result = extract_brain(volume, models)
        mask = result.segments[0].mask
        scores = result.uncertainty.segments[0]
        rows.append({"case": f"{kind} {strength:g}", "score": round(scores.boundary + 1 - scores.agreement, 4),
                     "mean": round(scores.mean, 4), "dice_error": round(1 - dice(mask, truth), 4),
                     "flagged": result.uncertainty.needs_review})
        print(rows[-1])
        maps.append(result.uncertainty.map[::2, ::2, ::2].ravel())
        wrong.append((mask != truth)[::2, ::2, ::2].ravel())
        probs.append(result.probabilities[1][::2, ::2, ::2].ravel())
    truth_sub = truth[::2, ::2, ::2].ravel()
    summary = {
        "cases": rows,
        "spearman_score_vs_dice_error": round(spearman([r["score"] for r in rows], [r["dice_error"] for r in rows]), 3),
        "voxel_auroc_map_for_errors": round(auroc(np.concatenate(maps), np.concatenate(wrong)), 3),
        "ece": round(expected_calibration_error(np.concatenate(probs), np.tile(truth_sub, len(CASES))), 4),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "cases"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
