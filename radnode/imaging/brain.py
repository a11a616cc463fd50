"""Brain extraction on a T1-weighted MR volume with the deepbet networks, and brain volumetry.

The networks were trained on RAS-oriented NIfTI arrays, so the volume is permuted/flipped to RAS
(never resampled), processed as deepbet does (a coarse 128³ pass for the bounding box, a fine 256³
pass inside it, intensities clipped at the 0.5/99.5 percentiles), and the probabilities are mapped
back to the source grid. The intracranial mask is the network's output (largest component, holes
filled); brain parenchyma is the part of it brighter than CSF.

Uncertainty. deepbet has no dropout and is a single network, so the probability samples come from
test-time augmentation (TTA) of the fine pass, as in Wang et al. 2019 (Neurocomputing 338:34–45,
aleatoric uncertainty by TTA): transformations the segmentation should not depend on are applied to
the input and undone on the output. The set is fixed once for every study (:data:`AUGMENTATIONS`):
the plain pass, its left–right mirror, and :data:`RANDOM_AUGMENTATIONS` draws (seed
:data:`AUGMENTATION_SEED`) of a rotation up to ±10° about each axis, an isotropic scaling 0.9–1.1,
a translation up to ±5 mm per axis (all about the brain box's centre, in millimetres), a gamma
0.8–1.25 on the clipped intensities and a mirror with probability ½. The map is the normalised
entropy of the samples' mean, with one known failure sign added: where the mask meets the edge of
the field of view (the array's faces, or the border-connected background at the volume's minimum:
zero padding, empty air) the extent of the brain beyond is unobserved, so the boundary voxels there
carry the maximal uncertainty, 1. The brain is enclosed by skull and scalp, so a mask that meets
either has been cut (the brainstem leaving through the bottom of the field of view is the normal
exception, a fraction of a percent of the surface). The per-segment scores and the review flag are
:func:`radnode.uncertainty.segment_uncertainty` of this map and these samples.
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
from radnode.results import Measurement, Segment, Structure
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


@dataclass(frozen=True)
class Augmentation:
    """One test-time augmentation of the fine pass, undone on its output (see the module docstring)."""

    mirror: bool = False
    """Left–right (RAS x) mirror."""
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Rotation about the RAS x, y, z axes through the brain box's centre, in degrees."""
    scale: float = 1.0
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    gamma: float = 1.0
    """Exponent on the intensities clipped to [0, 1], before standardisation."""

    @property
    def spatial(self) -> bool:
        return self.rotation_deg != (0.0, 0.0, 0.0) or self.scale != 1.0 or self.shift_mm != (0.0, 0.0, 0.0)

    def matrix(self) -> np.ndarray:
        """The 3×3 rotation × scaling in millimetres (RAS axes)."""
        ax, ay, az = np.radians(self.rotation_deg)
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        return self.scale * rz @ ry @ rx


MAX_ROTATION_DEG, SCALE_RANGE, MAX_SHIFT_MM, GAMMA_RANGE = 10.0, (0.9, 1.1), 5.0, (0.8, 1.25)
RANDOM_AUGMENTATIONS = 4
AUGMENTATION_SEED = 0


def draw_augmentations(n_random: int = RANDOM_AUGMENTATIONS, seed: int = AUGMENTATION_SEED) -> tuple[Augmentation, ...]:
    """The plain pass, its mirror, and ``n_random`` draws from the ranges above (fixed a priori, not fitted)."""
    rng = np.random.default_rng(seed)
    drawn = [Augmentation(mirror=bool(rng.random() < 0.5),
                          rotation_deg=tuple(float(a) for a in rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3)),
                          scale=float(rng.uniform(*SCALE_RANGE)),
                          shift_mm=tuple(float(d) for d in rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, 3)),
                          gamma=float(np.exp(rng.uniform(*np.log(GAMMA_RANGE)))))
             for _ in range(n_random)]
    return (Augmentation(), Augmentation(mirror=True), *drawn)  # type: ignore[arg-type]


AUGMENTATIONS = draw_augmentations()
"""The TTA set every study gets: 6 fine passes. On 2 CPU cores the extraction takes about 18 s (the plain pass
and mirror about 2 s each, a spatial augmentation about 3.3 s with its warps), against 5 s for the mirror alone."""


def _code(concept) -> CodedConcept:
    return CodedConcept(concept.value, concept.scheme_designator, concept.meaning)


_ANATOMY = _code(codes.SCT.AnatomicalStructure)
BRAIN_STRUCTURES: dict[str, Structure] = {
    "intracranial": Structure("intracranial", "Intracranial contents (brain mask)", _ANATOMY,
                              _code(codes.SCT.Intracranial), color_rgb=(250, 250, 225)),
    "brain": Structure("brain", "Brain parenchyma", _ANATOMY, _code(codes.SCT.Brain), color_rgb=(250, 130, 100)),
}


BPF = CodedConcept("BPF", "99RADNODE", "Brain parenchymal fraction")
"""Brain parenchyma volume / intracranial (brain-mask) volume. No DICOM, SNOMED CT or LOINC concept for the
BPF was found; private scheme, declared in the SR like the other private codes."""
RATIO = CodedConcept("1", "UCUM", "no units")
BPF_DECIMALS = 3


def brain_parenchymal_fraction(volumes: list[Measurement]) -> list[Measurement]:
    """The BPF (on the brain segment) from the intracranial and brain volumes; none when either is missing."""
    by_key = {m.structure_key: float(m.value) for m in volumes if m.name.value == "118565006"}
    if by_key.get("intracranial", 0.0) <= 0.0 or "brain" not in by_key:
        return []
    return [Measurement("brain", BPF, round(by_key["brain"] / by_key["intracranial"], BPF_DECIMALS), RATIO)]


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


def _normalise(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """deepbet's input normalisation: clip to [low, high], standardise, map to ImageNet-like mean/SD
    (``gamma`` ≠ 1: a test-time intensity augmentation of the clipped intensities)."""
    x = ((x - low) / (high - low)).clamp(0, 1)
    if gamma != 1.0:
        x = x ** gamma
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


def _fine_positions(box: tuple[slice, slice, slice]) -> list[torch.Tensor]:
    """Source-voxel coordinate of each fine-grid voxel centre along each axis (as ``F.interpolate``, no corners)."""
    return [b.start + (torch.arange(n) + 0.5) * (b.stop - b.start) / n - 0.5 for b, n in zip(box, FINE_SHAPE)]


def _box_centre(box: tuple[slice, slice, slice]) -> np.ndarray:
    return np.array([(b.start + b.stop - 1) / 2 for b in box])


def _voxel_transform(augmentation: Augmentation, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """The augmentation's matrix and translation in voxel units (millimetres scaled by the spacing)."""
    to_mm = np.diag(spacing)
    return np.linalg.inv(to_mm) @ augmentation.matrix() @ to_mm, np.asarray(augmentation.shift_mm) / np.asarray(spacing)


def _grid(coordinates: list[torch.Tensor], sizes: tuple[float, ...], corners: bool) -> torch.Tensor:
    """``grid_sample`` grid (1, *shape, 3) from per-axis coordinates in voxel units of an array of ``sizes``."""
    if corners:
        normal = [2 * c / max(n - 1, 1) - 1 for c, n in zip(coordinates, sizes)]
    else:
        normal = [(2 * c + 1) / n - 1 for c, n in zip(coordinates, sizes)]
    return torch.stack(normal[::-1], dim=-1)[None].float()


def _warped_fine_input(x: torch.Tensor, box: tuple[slice, slice, slice], augmentation: Augmentation,
                       spacing: tuple[float, float, float], background: torch.Tensor) -> torch.Tensor:
    """The fine pass's 256³ input with the augmentation applied about the box centre (trilinear; outside the
    volume: ``background``)."""
    matrix, shift = _voxel_transform(augmentation, spacing)
    centre = _box_centre(box)
    axes = [p.to(x.device) - c for p, c in zip(_fine_positions(box), centre)]
    offsets = [axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]]
    source = [float(centre[i] + shift[i]) + sum(float(matrix[i, j]) * offsets[j] for j in range(3)) for i in range(3)]
    grid = _grid(source, tuple(x.shape), corners=True)
    warped = F.grid_sample((x - background)[None, None], grid, mode="bilinear", padding_mode="zeros",
                           align_corners=True)
    return warped + background


def _unwarped_output(probability: torch.Tensor, box: tuple[slice, slice, slice], augmentation: Augmentation,
                     spacing: tuple[float, float, float]) -> torch.Tensor:
    """The augmented pass's probability (1, 1, 256³) brought back onto the source box's voxels."""
    matrix, shift = _voxel_transform(augmentation, spacing)
    inverse = np.linalg.inv(matrix)
    centre = _box_centre(box)
    device = probability.device
    axes = [torch.arange(b.start, b.stop, device=device, dtype=torch.float32) - float(c + t)
            for b, c, t in zip(box, centre, shift)]
    offsets = [axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]]
    source = [float(centre[i]) - box[i].start + sum(float(inverse[i, j]) * offsets[j] for j in range(3))
              for i in range(3)]
    grid = _grid(source, tuple(b.stop - b.start for b in box), corners=False)
    return F.grid_sample(probability, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def brain_probability_samples(models: DeepbetModels, ras: np.ndarray,
                              spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
                              augmentations: tuple[Augmentation, ...] = AUGMENTATIONS,
                              ) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Brain probability on the RAS grid, one sample per augmentation ``(S, x, y, z)``, and the brain box.

    The coarse pass (box) is run once; each augmentation is one fine pass, undone on its output.
    ``spacing`` is the RAS-ordered voxel size in mm (rotations and shifts are in millimetres).
    """
    device = models.device
    x = torch.nan_to_num(torch.from_numpy(np.ascontiguousarray(ras, dtype=np.float32)).to(device))
    small = F.interpolate(x[None, None], COARSE_SHAPE, mode="nearest-exact")[0, 0]
    low, high = small.quantile(LOW_QUANTILE), small.quantile(HIGH_QUANTILE)
    coarse = models.bbox(_normalise(small, low, high)[None, None])[0, 1]
    box = _box(_largest_component((coarse > THRESHOLD).cpu().numpy()), tuple(x.shape), BOX_MARGIN)
    crop = x[box]
    plain = F.interpolate(crop[None, None], FINE_SHAPE, mode="nearest-exact")
    samples = np.zeros((len(augmentations), *x.shape), dtype=np.float32)
    for i, augmentation in enumerate(augmentations):
        raw = _warped_fine_input(x, box, augmentation, spacing, low) if augmentation.spatial else plain
        batch = _normalise(raw, low, high, augmentation.gamma)
        if augmentation.mirror:
            batch = torch.flip(batch, dims=(2,))
        probability = models.fine(batch)[:, 1:2]
        if augmentation.mirror:
            probability = torch.flip(probability, dims=(2,))
        if augmentation.spatial:
            back = _unwarped_output(probability, box, augmentation, spacing)
        else:
            back = F.interpolate(probability, tuple(crop.shape), mode="trilinear", align_corners=False)
        samples[i][box] = back[0, 0].cpu().numpy()
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


def field_of_view_contact(mask: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Boundary voxels where ``mask`` meets the edge of the field of view, on both sides.

    Outside the field of view is beyond the array's faces, and the background at the image's minimum
    that is connected to the faces (zero padding, empty air). Returned: the mask's voxels on a face or
    next to that background, and the background voxels next to the mask.
    """
    background = image <= np.nanmin(image)
    labels, _ = ndi.label(background)
    faces = np.zeros(mask.shape, dtype=bool)
    faces[[0, -1]] = True
    faces[:, [0, -1]] = True
    faces[:, :, [0, -1]] = True
    touching = np.unique(labels[faces])
    outside = np.isin(labels, touching[touching > 0])
    return (mask & (faces | ndi.binary_dilation(outside))) | (outside & ndi.binary_dilation(mask))


def extract_brain(volume: Volume, models: DeepbetModels, *, augmentations: tuple[Augmentation, ...] = AUGMENTATIONS,
                  limits: UncertaintyThresholds = UncertaintyThresholds()) -> UncertainSegmentation:
    """Intracranial and brain-parenchyma masks of a T1 volume, with the TTA uncertainty of the intracranial mask
    (map: normalised entropy of the samples' mean, 1 where the mask meets the field-of-view edge)."""
    orientation = Reorientation.to_ras(volume)
    spacing = tuple(float(volume.spacing[a]) for a in orientation.order)
    samples, box = brain_probability_samples(models, orientation.apply(volume.array), spacing,  # type: ignore[arg-type]
                                             augmentations)
    mean = samples.mean(axis=0)
    intracranial = orientation.invert(_postprocess(mean, box))
    values = volume.array[intracranial]
    brain = intracranial & (volume.array > csf_threshold(values[:: max(1, values.size // 200_000)]))
    mean_probabilities = np.stack([1.0 - mean, mean])  # (2, x, y, z), the mean of the two-class samples
    uncertainty_map = np.array(orientation.invert(normalised_entropy(mean_probabilities)))
    uncertainty_map[field_of_view_contact(intracranial, volume.array)] = 1.0
    sample_masks = [orientation.invert(s > THRESHOLD) for s in samples]
    scores = [segment_uncertainty("intracranial", uncertainty_map, intracranial, sample_masks)]
    method = f"TTA ({len(samples)} passes: mirror, rotation, scaling, translation, gamma)" if len(samples) > 1 \
        else "single pass (softmax entropy)"
    report = UncertaintyReport(uncertainty_map, scores, method, len(samples), limits)
    return UncertainSegmentation([Segment(BRAIN_STRUCTURES["intracranial"], intracranial),
                                  Segment(BRAIN_STRUCTURES["brain"], brain)], report,
                                 orientation.invert(mean_probabilities))
