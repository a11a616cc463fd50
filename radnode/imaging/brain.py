"""Brain extraction on a T1-weighted MR volume with the deepbet networks, and brain volumetry.

The networks were trained on RAS-oriented NIfTI arrays, so the volume is permuted/flipped to RAS
(never resampled), processed as deepbet does (a coarse 128³ pass for the bounding box, a fine 256³
pass inside it, intensities clipped at the 0.5/99.5 percentiles), and the probabilities are mapped
back to the source grid. Test-time augmentation (a left–right mirror, the brain's own symmetry) gives
two probability samples whose disagreement is the uncertainty. The intracranial mask is the network's
output (largest component, holes filled); brain parenchyma is the part of it brighter than CSF.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from scipy import ndimage as ndi

from radnode.imaging.volume import Volume
from radnode.models.deepbet import DeepbetModels
from radnode.results import Segment, Structure
from radnode.uncertainty import (
    UncertainSegmentation,
    UncertaintyReport,
    UncertaintyThresholds,
    normalised_entropy,
    segment_uncertainty,
)

COARSE_SHAPE = (128, 128, 128)
FINE_SHAPE = (256, 256, 256)
BOX_MARGIN = 0.1
"""Fraction of the coarse brain box added on every side before the fine pass (deepbet's default)."""
LOW_QUANTILE, HIGH_QUANTILE = 0.005, 0.995
THRESHOLD = 0.5
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])


def _code(concept) -> CodedConcept:
    return CodedConcept(concept.value, concept.scheme_designator, concept.meaning)


_ANATOMY = _code(codes.SCT.AnatomicalStructure)
BRAIN_STRUCTURES: dict[str, Structure] = {
    "intracranial": Structure("intracranial", "Intracranial contents (brain mask)", _ANATOMY,
                              _code(codes.SCT.Intracranial), color_rgb=(250, 250, 225)),
    "brain": Structure("brain", "Brain parenchyma", _ANATOMY, _code(codes.SCT.Brain), color_rgb=(250, 130, 100)),
}


@dataclass(frozen=True)
class Reorientation:
    """How a volume's ``[slice, row, column]`` array maps onto RAS-ordered axes (permute, then flip)."""

    order: tuple[int, int, int]
    """Source axis that becomes RAS axis 0 (x), 1 (y), 2 (z)."""
    flip: tuple[bool, bool, bool]

    @classmethod
    def to_ras(cls, volume: Volume) -> "Reorientation":
        """The permutation/flip that puts the volume's axes closest to RAS (as nibabel's closest canonical)."""
        directions = _RAS_FROM_LPS @ volume.affine[:3, :3]
        directions = directions / np.linalg.norm(directions, axis=0)
        order, flip, free = [], [], [0, 1, 2]
        for world in range(3):
            axis = max(free, key=lambda a: abs(directions[world, a]))
            free.remove(axis)
            order.append(axis)
            flip.append(bool(directions[world, axis] < 0))
        return cls(tuple(order), tuple(flip))  # type: ignore[arg-type]

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Source-grid array (last three axes) → RAS-ordered array."""
        lead = array.ndim - 3
        out = np.transpose(array, (*range(lead), *(lead + a for a in self.order)))
        flips = tuple(lead + i for i, f in enumerate(self.flip) if f)
        return np.ascontiguousarray(np.flip(out, flips) if flips else out)

    def invert(self, array: np.ndarray) -> np.ndarray:
        """RAS-ordered array (last three axes) → source-grid array."""
        lead = array.ndim - 3
        flips = tuple(lead + i for i, f in enumerate(self.flip) if f)
        out = np.flip(array, flips) if flips else array
        inverse = np.argsort(self.order)
        return np.ascontiguousarray(np.transpose(out, (*range(lead), *(lead + int(a) for a in inverse))))


def _normalise(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """deepbet's input normalisation: clip to [low, high], standardise, map to ImageNet-like mean/SD."""
    x = ((x - low) / (high - low)).clamp(0, 1)
    return 0.226 * (x - x.mean()) / x.std() + 0.449


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def _box(mask_small: np.ndarray, shape: tuple[int, ...], margin: float) -> tuple[slice, slice, slice]:
    """Bounding box of the coarse brain mask, scaled to ``shape`` and grown by ``margin`` on each side."""
    if not mask_small.any():
        raise ValueError("no brain found by the coarse network (is this a T1-weighted head scan?)")
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.nonzero(mask_small.any(axis=other))[0]
        scale = shape[axis] / mask_small.shape[axis]
        low, high = present.min() * scale, (present.max() + 1) * scale
        grow = (high - low) * margin
        box.append(slice(max(0, int(round(low - grow))), min(shape[axis], int(round(high + grow)))))
    return tuple(box)  # type: ignore[return-value]


@torch.no_grad()
def brain_probability_samples(models: DeepbetModels, ras: np.ndarray, mirror: bool = True
                              ) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Brain probability on the RAS grid, one sample per augmentation ``(S, x, y, z)``, and the brain box.

    Sample 0 is the plain pass; with ``mirror`` sample 1 is the left–right mirrored pass mirrored back.
    """
    device = models.device
    x = torch.nan_to_num(torch.from_numpy(np.ascontiguousarray(ras, dtype=np.float32)).to(device))
    small = F.interpolate(x[None, None], COARSE_SHAPE, mode="nearest-exact")[0, 0]
    low, high = small.quantile(LOW_QUANTILE), small.quantile(HIGH_QUANTILE)
    coarse = models.bbox(_normalise(small, low, high)[None, None])[0, 1]
    box = _box(_largest_component((coarse > THRESHOLD).cpu().numpy()), tuple(x.shape), BOX_MARGIN)
    crop = x[box]
    fine_input = _normalise(F.interpolate(crop[None, None], FINE_SHAPE, mode="nearest-exact"), low, high)
    inputs = [fine_input] + ([torch.flip(fine_input, dims=(2,))] if mirror else [])
    samples = np.zeros((len(inputs), *x.shape), dtype=np.float32)
    for i, batch in enumerate(inputs):
        probability = models.fine(batch)[:, 1:2]
        if i == 1:
            probability = torch.flip(probability, dims=(2,))
        samples[i][box] = F.interpolate(probability, tuple(crop.shape), mode="trilinear",
                                        align_corners=False)[0, 0].cpu().numpy()
    return samples, box


def _postprocess(probability: np.ndarray, box: tuple[slice, slice, slice]) -> np.ndarray:
    """Threshold, keep the largest connected part, fill enclosed holes (ventricles stay inside)."""
    mask = np.zeros(probability.shape, dtype=bool)
    inside = _largest_component(probability[box] > THRESHOLD)
    mask[box] = ndi.binary_fill_holes(inside)
    return mask


def csf_threshold(values: np.ndarray, iterations: int = 30) -> float:
    """Intensity between CSF and grey matter on T1: 1-D k-means with three classes (CSF, GM, WM)."""
    centres = np.percentile(values, [10, 50, 90]).astype(np.float64)
    for _ in range(iterations):
        nearest = np.abs(values[:, None] - centres[None, :]).argmin(axis=1)
        centres = np.array([values[nearest == k].mean() if np.any(nearest == k) else centres[k] for k in range(3)])
    centres.sort()
    return float((centres[0] + centres[1]) / 2)


def extract_brain(volume: Volume, models: DeepbetModels, *, mirror: bool = True,
                  limits: UncertaintyThresholds = UncertaintyThresholds()) -> UncertainSegmentation:
    """Intracranial and brain-parenchyma masks of a T1 volume, with the TTA uncertainty of the mask."""
    orientation = Reorientation.to_ras(volume)
    samples, box = brain_probability_samples(models, orientation.apply(volume.array), mirror=mirror)
    mean = samples.mean(axis=0)
    intracranial = orientation.invert(_postprocess(mean, box))
    values = volume.array[intracranial]
    brain = intracranial & (volume.array > csf_threshold(values[:: max(1, values.size // 200_000)]))
    two_class = np.stack([1.0 - samples, samples], axis=1)  # (S, 2, x, y, z)
    mean_probabilities = two_class.mean(axis=0)
    uncertainty_map = orientation.invert(normalised_entropy(mean_probabilities))
    sample_masks = [orientation.invert(s > THRESHOLD) for s in samples]
    scores = [segment_uncertainty("intracranial", uncertainty_map, intracranial, sample_masks)]
    method = "TTA (left-right mirror)" if mirror else "single pass (softmax entropy)"
    report = UncertaintyReport(uncertainty_map, scores, method, len(samples), limits)
    return UncertainSegmentation([Segment(BRAIN_STRUCTURES["intracranial"], intracranial),
                            Segment(BRAIN_STRUCTURES["brain"], brain)], report,
                                 orientation.invert(mean_probabilities))

