"""Uncertainty of a segmentation from several probability samples, its per-segment scores and review flag.

Samples come from test-time augmentation, Monte Carlo dropout or an ensemble: each is a softmax
probability map over the same grid. Their mean is the prediction; its normalised predictive entropy
is the voxel-wise uncertainty map (0 = certain, 1 = uniform over the classes). Per segment the map is
summarised inside the segment and on its boundary, and the samples' agreement is the mean Dice of
each sample's mask with the consensus mask. A study is flagged for human review when any score
passes a configurable threshold. The summary runs where the samples are: NumPy/SciPy on the CPU, CuPy
on the GPU (the same functions; only the final map and masks come back to host memory). The evaluation helpers (Spearman, AUROC, ECE) support the claim that
these numbers mean something (``bench/uncertainty_eval.py``, ``tests/test_uncertainty.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
from highdicom.sr import CodedConcept
from scipy import ndimage as ndi

from radnode.results import Measurement, PipelineResult, Segment

PRIVATE_SCHEME = "99RADNODE"
MEAN_UNCERTAINTY = CodedConcept("UNC-MEAN", PRIVATE_SCHEME, "Mean predictive entropy within segment")
BOUNDARY_UNCERTAINTY = CodedConcept("UNC-BOUNDARY", PRIVATE_SCHEME, "Mean predictive entropy on segment boundary")
SAMPLE_AGREEMENT = CodedConcept("UNC-AGREEMENT", PRIVATE_SCHEME, "Agreement between segmentation samples (Dice)")
"""No DICOM/SNOMED/LOINC concepts for segmentation uncertainty were found; private scheme, declared in the SR."""
UNCERTAINTY_CONCEPTS = {c.value: c for c in (MEAN_UNCERTAINTY, BOUNDARY_UNCERTAINTY, SAMPLE_AGREEMENT)}
NO_UNITS = CodedConcept("1", "UCUM", "no units")

REVIEW_FINDING = CodedConcept("REVIEW", PRIVATE_SCHEME, "Automatic segmentation quality")
NEEDS_REVIEW = CodedConcept("REVIEW-REQUIRED", PRIVATE_SCHEME, "Human review required")
NO_REVIEW_NEEDED = CodedConcept("REVIEW-NOT-REQUIRED", PRIVATE_SCHEME, "Within uncertainty limits")
REVIEW_CONFIDENCE = CodedConcept("REVIEW-CONFIDENCE", PRIVATE_SCHEME, "Confidence of segmentation (sample agreement)")
"""The confidence of the review finding: the samples' mean Dice with the consensus (1 = every sample agrees)."""

SCORE_DECIMALS = 4
BOUNDARY_WIDTH_VOXELS = 1


@dataclass(frozen=True)
class UncertaintyThresholds:
    """When a segment's uncertainty asks for a human: any limit passed flags the study."""

    max_mean: float = 0.10
    """Largest acceptable mean normalised entropy inside a segment."""
    max_boundary: float = 0.65
    """Largest acceptable mean normalised entropy on the segment boundary."""
    min_agreement: float = 0.90
    """Smallest acceptable mean Dice between sample masks and the consensus mask."""


@dataclass(frozen=True)
class SegmentUncertainty:
    """The uncertainty scores of one segment."""

    structure_key: str
    mean: float
    boundary: float
    agreement: float

    def exceeded(self, limits: UncertaintyThresholds) -> dict[str, str]:
        """The scores past their limit, by concept code (see :data:`UNCERTAINTY_CONCEPTS`), with the reason."""
        out = {}
        if self.mean > limits.max_mean:
            out[MEAN_UNCERTAINTY.value] = f"{self.structure_key}: mean uncertainty {self.mean:.3f} > {limits.max_mean:g}"
        if self.boundary > limits.max_boundary:
            out[BOUNDARY_UNCERTAINTY.value] = (f"{self.structure_key}: boundary uncertainty {self.boundary:.3f} "
                                               f"> {limits.max_boundary:g}")
        if self.agreement < limits.min_agreement:
            out[SAMPLE_AGREEMENT.value] = (f"{self.structure_key}: sample agreement {self.agreement:.3f} "
                                           f"< {limits.min_agreement:g}")
        return out


@dataclass
class UncertaintyReport:
    """Voxel-wise map on the source grid, per-segment scores and the study-level review decision."""

    map: np.ndarray
    """float32 (n_slices, rows, columns) normalised predictive entropy in [0, 1]."""
    segments: list[SegmentUncertainty]
    method: str
    """How the samples were made, e.g. ``TTA (flips) x MC dropout (4)``."""
    n_samples: int
    limits: UncertaintyThresholds = field(default_factory=UncertaintyThresholds)

    @property
    def review_reasons(self) -> list[str]:
        """Every score past its limit, as a sentence; empty when no review is needed."""
        return [reason for s in self.segments for reason in s.exceeded(self.limits).values()]

    @property
    def needs_review(self) -> bool:
        return bool(self.review_reasons)

    def scores_for(self, key: str) -> SegmentUncertainty | None:
        return next((s for s in self.segments if s.structure_key == key), None)

    def measurements(self) -> list[Measurement]:
        """The scores as measurements, so the SR and FHIR writers carry them like any other number."""
        out: list[Measurement] = []
        for s in self.segments:
            out += [Measurement(s.structure_key, MEAN_UNCERTAINTY, round(s.mean, SCORE_DECIMALS), NO_UNITS),
                    Measurement(s.structure_key, BOUNDARY_UNCERTAINTY, round(s.boundary, SCORE_DECIMALS), NO_UNITS),
                    Measurement(s.structure_key, SAMPLE_AGREEMENT, round(s.agreement, SCORE_DECIMALS), NO_UNITS)]
        return out


@dataclass
class UncertainSegmentation:
    """Segments on the source grid with the uncertainty of their samples."""

    segments: list[Segment]
    uncertainty: UncertaintyReport
    probabilities: np.ndarray | None = None
    """Mean class probabilities (C, n_slices, rows, columns) when kept, e.g. for calibration."""


@dataclass
class UncertainPipelineResult(PipelineResult):
    """A pipeline result that also carries its uncertainty (map, scores, review flag)."""

    uncertainty: UncertaintyReport | None = None


def array_modules(array: Any) -> tuple[ModuleType, ModuleType]:
    """The array module and its ndimage for ``array``: CuPy/cupyx when it lives on the GPU, NumPy/SciPy otherwise."""
    if type(array).__module__.startswith("cupy"):
        import cupy
        import cupyx.scipy.ndimage as cupy_ndimage

        return cupy, cupy_ndimage
    return np, ndi


def to_host(array: Any) -> np.ndarray:
    """A NumPy copy of a CuPy array; NumPy arrays pass through."""
    return array.get() if hasattr(array, "get") and not isinstance(array, np.ndarray) else np.asarray(array)


def normalised_entropy(probabilities: Any) -> Any:
    """Predictive entropy of class probabilities ``(C, ...)`` divided by log C, so it lies in [0, 1]."""
    xp, _ = array_modules(probabilities)
    n_classes = probabilities.shape[0]
    p = xp.clip(probabilities, 1e-7, 1.0)
    return (-(p * xp.log(p)).sum(axis=0) / np.log(max(n_classes, 2))).astype(xp.float32)


def boundary_band(mask: Any, width: int = BOUNDARY_WIDTH_VOXELS) -> Any:
    """Voxels within ``width`` voxels of the mask surface, on both sides."""
    if not mask.any():
        return mask.copy()
    _, ndimage = array_modules(mask)
    return ndimage.binary_dilation(mask, iterations=width) & ~ndimage.binary_erosion(mask, iterations=width)


def dice(a: Any, b: Any) -> float:
    """Dice overlap of two boolean masks; 1.0 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def segment_uncertainty(key: str, uncertainty_map: Any, consensus: Any, sample_masks: list[Any]) -> SegmentUncertainty:
    """Scores of one segment: mean map inside and on the boundary, mean Dice of samples with the consensus."""
    inside = float(uncertainty_map[consensus].mean()) if consensus.any() else 0.0
    band = boundary_band(consensus)
    boundary = float(uncertainty_map[band].mean()) if band.any() else 0.0
    agreement = float(np.mean([dice(m, consensus) for m in sample_masks])) if sample_masks else 1.0
    return SegmentUncertainty(key, inside, boundary, agreement)


def summarise(mean: Any, sample_labels: list[Any], labels: dict[int, str], method: str,
              limits: UncertaintyThresholds = UncertaintyThresholds()) -> UncertaintyReport:
    """The uncertainty report from the mean class probabilities ``(C, ...)`` and each sample's label map.

    ``labels`` maps class index (not 0, the background) to structure key; the consensus is the argmax of
    the mean. Runs in the arrays' module (NumPy or CuPy); the report's map is always NumPy.
    """
    uncertainty_map = normalised_entropy(mean)
    consensus = mean.argmax(axis=0)
    scores = [segment_uncertainty(key, uncertainty_map, consensus == index, [s == index for s in sample_labels])
              for index, key in labels.items()]
    return UncertaintyReport(to_host(uncertainty_map), scores, method, len(sample_labels), limits)


def summarise_samples(samples: Any, labels: dict[int, str], method: str,
                      limits: UncertaintyThresholds = UncertaintyThresholds()) -> tuple[Any, UncertaintyReport]:
    """Mean probabilities and the uncertainty report from stacked ``samples`` of shape ``(S, C, ...)``."""
    mean = samples.mean(axis=0)
    return mean, summarise(mean, list(samples.argmax(axis=1)), labels, method, limits)


# Evaluation: does the uncertainty rank bad segmentations first, and are the probabilities calibrated?

def spearman(x: np.ndarray | list[float], y: np.ndarray | list[float]) -> float:
    """Spearman rank correlation of two sequences."""
    from scipy import stats  # 50 MB and 0.5 s of imports that the pipelines never need: evaluation only

    return float(stats.spearmanr(np.asarray(x, float), np.asarray(y, float)).statistic)


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positives`` (Mann–Whitney U, ties averaged)."""
    scores, positives = np.ravel(scores).astype(np.float64), np.ravel(positives).astype(bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative voxels")
    from scipy import stats

    ranks = stats.rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(probability: np.ndarray, truth: np.ndarray, n_bins: int = 15) -> float:
    """ECE of foreground probabilities against binary truth: bin-weighted |accuracy − confidence|.

    Confidence is the probability of the predicted class (max(p, 1 − p)), the usual top-label ECE.
    """
    p = np.ravel(probability).astype(np.float64)
    t = np.ravel(truth).astype(bool)
    predicted = p >= 0.5
    confidence = np.where(predicted, p, 1.0 - p)
    correct = predicted == t
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(which, weights=correct.astype(np.float64), minlength=n_bins)
    filled = counts > 0
    gap = np.abs(acc_sum[filled] / counts[filled] - conf_sum[filled] / counts[filled])
    return float((gap * counts[filled]).sum() / p.size)
