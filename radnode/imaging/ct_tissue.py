"""CT tissue segmentation without a learned model: body, left/right lung, bone, adipose tissue, skeletal muscle.

Thresholds in Hounsfield units plus morphology and connected components (numpy/scipy only), so it runs
anywhere, fast, and deterministically. Coarse decisions (which air pocket is lung, where the body wall is)
are taken on a downsampled grid of about 2 mm; the final masks are cut at full resolution by HU.

Anatomical reasoning used, and why:

* body: tissue above −500 HU, the largest 3-D component after an in-plane opening (drops the table),
  holes filled slice by slice (so lungs, airways and bowel gas are inside the body).
* airways: tube-like pure-air (< −950 HU) components (trachea, main bronchi) are cut off the lungs.
* lungs vs. bowel gas: every air component inside the body is judged by the median HU of its core;
  lung parenchyma is air mixed with tissue and blood (≈ −850), gas in bowel/stomach is pure air (≈ −1000).
* left/right: by the component's position in patient coordinates (LPS: +x is patient left), never by
  array axes; a component that straddles the midline is split there.
* bone: ≥ 120 HU with small enclosed marrow holes filled; components without cortical-bone HU dropped.
* adipose tissue: −190 … −30 HU; skeletal muscle: −29 … 150 HU *in the body wall*, found by casting rays
  inwards from the skin: skin → subcutaneous fat → the first soft-tissue run (muscle) until bone, air or a
  fat plane. Organs inside the body cavity are therefore not muscle. Psoas and other muscles surrounded
  by visceral fat are not reached (a known limit of this model-free approach).
"""

from __future__ import annotations

import numpy as np
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from radnode.imaging.slabs import even_slabs, map_slabs, slab_bounds
from radnode.imaging.volume import Volume
from radnode.results import NotAssessed, Segment, Structure

BODY_MIN_HU = -500.0
AIR_MAX_HU = -400.0
PURE_AIR_MAX_HU = -950.0
FAT_HU = (-190.0, -30.0)
SOFT_TISSUE_HU = (-29.0, 150.0)
BONE_MIN_HU = 120.0
CORTICAL_MIN_HU = 250.0

LUNG_MIN_ML = 10.0
"""Air components smaller than this are never called lung (tiny gas bubbles, noise)."""
LUNG_CORE_MIN_HU = -945.0
"""Median HU of an air component's core above which it is lung parenchyma rather than pure gas."""
AIRWAY_MIN_LENGTH_MM = 40.0
AIRWAY_MAX_AREA_MM2 = 600.0
"""Median cross-section of a pure-air tube accepted as trachea/main bronchi (trachea ≈ 200–300 mm²)."""
AIRWAY_MAX_MIDLINE_OFFSET_MM = 40.0
AIRWAY_FRAGMENT_MAX_ML = 20.0
MARROW_MAX_AREA_MM2 = 1500.0
MARROW_MIN_MEAN_HU = 60.0
"""Enclosed holes in the bone mask are marrow (filled) only if this dense; the spinal canal is not."""
SKIN_MAX_MM = 4.0
MUSCLE_FAT_GAP_MM = 3.0
"""Fat runs up to this long inside muscle are intramuscular; longer ones end the body wall."""
MUSCLE_ANGLE_WINDOW_DEGREES = 15.0
MUSCLE_THICKNESS_SLACK_MM = 8.0
"""A ray's muscle may be this much thicker than the median of the rays within the window around it."""
COARSE_MM = 2.0

_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndi.generate_binary_structure(2, 1)
"""Labelling with this structure connects voxels only within a slice: one call labels every slice."""


class SegmentationError(ValueError):
    """The volume cannot be segmented; the message says why."""


def _code(concept: object) -> CodedConcept:
    return CodedConcept(concept.value, concept.scheme_designator, concept.meaning)  # type: ignore[attr-defined]


_ANATOMY = _code(codes.SCT.AnatomicalStructure)
_TISSUE = _code(codes.SCT.Tissue)

CT_TISSUE_STRUCTURES: dict[str, Structure] = {
    "body": Structure("body", "Body", _ANATOMY, _code(codes.SCT.EntireBody), color_rgb=(177, 122, 101)),
    "lung_left": Structure(
        "lung_left", "Left lung", _ANATOMY, _code(codes.SCT.Lung), _code(codes.SCT.Left), (128, 174, 128)
    ),
    "lung_right": Structure(
        "lung_right", "Right lung", _ANATOMY, _code(codes.SCT.Lung), _code(codes.SCT.Right), (111, 184, 210)
    ),
    "bone": Structure("bone", "Bone", _TISSUE, _code(codes.SCT.BoneTissue), color_rgb=(241, 214, 145)),
    "adipose_tissue": Structure(
        "adipose_tissue", "Adipose tissue", _TISSUE, _code(codes.SCT.AdiposeTissue), color_rgb=(230, 220, 70)
    ),
    "skeletal_muscle": Structure(
        "skeletal_muscle", "Skeletal muscle", _TISSUE, _code(codes.SCT.SkeletalMuscle), color_rgb=(192, 104, 88)
    ),
}
"""Coded structures (SNOMED CT, DICOM CID 7150/7151/7191/244) for the segments this module produces."""


TISSUE_LABELS: dict[str, int] = {"lung_left": 1, "lung_right": 2, "bone": 3, "adipose_tissue": 4,
                                  "skeletal_muscle": 5}
"""Values of the disjoint segments in the tissue label map; the body, which contains them all, is its own mask."""
BONE = TISSUE_LABELS["bone"]


def segment_ct_tissues(volume: Volume) -> list[Segment]:
    """Body (a bool mask of its own), then lungs, bone, fat and muscle (one uint8 label map: they are disjoint).

    The coarse decisions run on the ~2 mm grid; every full-resolution step is in-plane (or, for bone's
    connected components, joined across slab faces), so it runs slab by slab on all cores with temporaries a
    few slices big: a 600-slice CT needs its int16 volume, the two masks and little else.
    """
    hu = _checked_array(volume)
    grid = _CoarseGrid(volume)
    slabs = grid.slabs()
    hu_coarse = grid.downsample_mean(hu)
    body_coarse = _body_coarse(hu_coarse, grid)

    body = np.empty(hu.shape, dtype=bool)
    near_body = _dilate(body_coarse, _IN_PLANE_AXES)
    body_filled_coarse = np.empty(grid.coarse_shape, dtype=bool)

    def body_slab(z: slice) -> None:
        body[z] = _fill_holes_2d((hu[z] > BODY_MIN_HU) & grid.upsample(near_body, z))
        body_filled_coarse[grid.coarse_slices(z)] = grid.block_mean(body[z]) > 0.5

    map_slabs(body_slab, slabs)
    del near_body

    airway_coarse = _airways_coarse(hu_coarse, body_filled_coarse, grid)
    lung_left_c, lung_right_c = _lungs_coarse(hu_coarse, body_filled_coarse, airway_coarse, grid)
    del body_filled_coarse
    near_airway = _dilate(airway_coarse)
    left_region, right_region = _LungRegion(lung_left_c, grid), _LungRegion(lung_right_c, grid)
    del airway_coarse, lung_left_c, lung_right_c
    midline = grid.midline_x(body_coarse)
    tissue = np.zeros(hu.shape, dtype=np.uint8)

    def lungs_and_bone_slab(z: slice) -> _SlabComponents:
        airway = grid.upsample(near_airway, z)
        lung_left = left_region.lung(hu, z, airway, body)
        lung_right = right_region.lung(hu, z, airway, body)
        overlap = lung_left & lung_right
        if overlap.any():
            left_side = grid.left_of_midline(midline, z)
            lung_left &= ~overlap | left_side
            lung_right &= ~overlap | ~left_side
        labels = tissue[z]
        labels[lung_left] = TISSUE_LABELS["lung_left"]
        labels[lung_right] = TISSUE_LABELS["lung_right"]
        candidates = _bone_candidates(hu[z], body[z] & ~(lung_left | lung_right), grid)
        labels[candidates] = BONE
        return _SlabComponents.of(candidates, hu[z] >= CORTICAL_MIN_HU)

    components = map_slabs(lungs_and_bone_slab, slabs)
    del near_airway, left_region, right_region
    kept = {z.start: (part.voxel_labels, keep)
            for z, part, keep in zip(slabs, components, _kept_components(components))}
    del components
    bone_coarse = np.empty(grid.coarse_shape, dtype=bool)

    def bone_slab(z: slice) -> None:
        labels, (voxel_labels, keep) = tissue[z], kept.pop(z.start)
        candidates = labels == BONE  # the candidates of lungs_and_bone_slab, in the same raster order
        labels[candidates] = np.where(keep[voxel_labels], BONE, 0)
        bone_coarse[grid.coarse_slices(z)] = grid.block_mean(labels == BONE) > 0.3

    map_slabs(bone_slab, slabs)

    near_wall = _dilate(_body_wall_muscle_coarse(hu_coarse, body_coarse, bone_coarse, grid), _IN_PLANE_AXES)

    def soft_tissue_slab(z: slice) -> None:
        values, labels = hu[z], tissue[z]
        free = body[z] & (labels == 0)
        labels[free & (values >= FAT_HU[0]) & (values <= FAT_HU[1])] = TISSUE_LABELS["adipose_tissue"]
        soft = free & (values >= SOFT_TISSUE_HU[0]) & (values <= SOFT_TISSUE_HU[1])
        labels[soft & grid.upsample(near_wall, z)] = TISSUE_LABELS["skeletal_muscle"]

    map_slabs(soft_tissue_slab, slabs)
    return [Segment(CT_TISSUE_STRUCTURES["body"], body),
            *(Segment(CT_TISSUE_STRUCTURES[key], tissue, value) for key, value in TISSUE_LABELS.items())]


def _checked_array(volume: Volume) -> np.ndarray:
    hu = np.asarray(volume.array)
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise SegmentationError(f"expected a 3-D volume, got shape {hu.shape}")
    if hu.shape[1] < 16 or hu.shape[2] < 16:
        raise SegmentationError(f"slices of {hu.shape[1]}x{hu.shape[2]} are too small to segment")
    if abs(volume.slice_direction[2]) < 0.7:
        raise SegmentationError("only axial CT is supported (slice normal is not along the patient z axis)")
    if hu.dtype.kind == "f" and not all(map_slabs(lambda z: bool(np.isfinite(hu[z]).all()),
                                                  slab_bounds(len(hu), hu[0].size))):
        raise SegmentationError("volume contains non-finite values")
    return hu


class _CoarseGrid:
    """Block-averaging to ~2 mm voxels and back, plus patient-coordinate helpers on the coarse grid."""

    def __init__(self, volume: Volume) -> None:
        self.shape = volume.shape
        self.spacing = volume.spacing
        self.factors = tuple(max(1, int(round(COARSE_MM / s))) for s in volume.spacing)
        self.coarse_shape = tuple(-(-n // f) for n, f in zip(self.shape, self.factors))
        self.coarse_spacing = tuple(s * f for s, f in zip(self.spacing, self.factors))
        self.affine = volume.affine

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.coarse_spacing)) / 1000.0

    def slabs(self) -> list[slice]:
        """Slabs of whole coarse blocks along the slices, for :func:`map_slabs`."""
        return slab_bounds(self.shape[0], self.shape[1] * self.shape[2], self.factors[0])

    def coarse_slices(self, z: slice) -> slice:
        """The coarse slices a slab (from :meth:`slabs`) covers."""
        return slice(z.start // self.factors[0], -(-z.stop // self.factors[0]))

    def downsample_mean(self, array: np.ndarray) -> np.ndarray:
        """Mean over blocks (edge-padded to whole blocks), as float32."""
        coarse = np.empty(self.coarse_shape, dtype=np.float32)

        def slab(z: slice) -> None:
            coarse[self.coarse_slices(z)] = self.block_mean(array[z])

        map_slabs(slab, self.slabs())
        return coarse

    def block_mean(self, data: np.ndarray) -> np.ndarray:
        """:meth:`downsample_mean` of a slab of the full grid (from :meth:`slabs`), bit for bit what NumPy's
        float32 mean over the edge-padded blocks gives: on whole numbers (CT in HU, masks) whose block sums stay
        below 2**24 the sums are exact in any order, so they are added as integers, then divided as ``np.mean``
        divides; anything else takes ``np.mean`` itself."""
        (fz, fy, fx), (_, rows, cols) = self.factors, self.shape
        cz = -(-len(data) // fz)
        (_, cy, cx) = self.coarse_shape
        pad = [(0, cz * fz - len(data)), (0, cy * fy - rows), (0, cx * fx - cols)]
        if any(p[1] for p in pad):
            data = np.pad(data, pad, mode="edge")
        count = fz * fy * fx
        largest = max(abs(int(data.min(initial=0))), int(data.max(initial=0)))
        if data.dtype.kind not in "biu" or count * largest >= 2**24:
            return data.astype(np.float32, copy=False).reshape(cz, fz, cy, fy, cx, fx).mean(
                axis=(1, 3, 5), dtype=np.float32)
        sums = _block_sum(_block_sum(_block_sum(data, fx, 2), fy, 1), fz, 0)
        mean = sums.astype(np.float32)
        return np.true_divide(mean, np.intp(count), out=mean, casting="unsafe")

    def upsample(self, coarse: np.ndarray, z: slice, rows: slice = slice(None),
                 cols: slice = slice(None)) -> np.ndarray:
        """Nearest-neighbour back to the full grid, for the slab ``z`` (and ``rows``, ``cols`` of it)."""
        spans = [part.indices(n)[:2] for part, n in zip((z, rows, cols), self.shape)]
        block = coarse[tuple(slice(start // f, -(-stop // f)) for (start, stop), f in zip(spans, self.factors))]
        for axis, f in enumerate(self.factors):
            if f > 1:
                block = np.repeat(block, f, axis=axis)
        return block[tuple(slice(start % f, start % f + stop - start) for (start, stop), f in zip(spans, self.factors))]

    def lps_x(self, coarse_index: np.ndarray) -> np.ndarray:
        """Patient x (LPS, + = patient left) of coarse voxel indices (k, 3) at their block centres."""
        full = coarse_index * np.asarray(self.factors) + (np.asarray(self.factors) - 1) / 2.0
        return full @ self.affine[0, :3] + self.affine[0, 3]

    def midline_x(self, body_coarse: np.ndarray) -> float:
        """Patient x of the body's centre of mass: the left/right dividing plane."""
        return float(self.lps_x(np.asarray(_center_of_mass(body_coarse))[None, :])[0])

    def left_of_midline(self, midline: float, z: slice) -> np.ndarray:
        """bool for the slab ``z`` of the full grid: voxel lies on the patient's left of the body midline."""
        a = self.affine
        s = np.arange(z.start, z.stop, dtype=np.float64)
        r, c = (np.arange(n, dtype=np.float64) for n in self.shape[1:])
        x = a[0, 0] * s[:, None, None] + a[0, 1] * r[None, :, None] + a[0, 2] * c[None, None, :] + a[0, 3]
        return x > midline


def _center_of_mass(mask: np.ndarray) -> tuple[float, ...]:
    """``ndi.center_of_mass`` of a bool mask from its projections (scipy multiplies the whole mask by each
    index grid in float64: 8 bytes a voxel). Both sums are exact integers, so the results are the same."""
    total = int(np.count_nonzero(mask))
    centre = []
    for axis in range(mask.ndim):
        counts = mask.sum(axis=tuple(a for a in range(mask.ndim) if a != axis), dtype=np.int64)
        centre.append(int(np.dot(np.arange(len(counts), dtype=np.int64), counts)) / total)
    return tuple(centre)


def _block_sum(data: np.ndarray, factor: int, axis: int) -> np.ndarray:
    """Sums of ``factor`` consecutive elements along ``axis`` (its length a multiple of it), as int32."""
    if factor == 1:
        return data.astype(np.int32, copy=False)
    index = [slice(None)] * 3
    total = None
    for k in range(factor):
        index[axis] = slice(k, None, factor)
        part = data[tuple(index)]
        total = part.astype(np.int32) if total is None else np.add(total, part, out=total)
    return total


def _label(mask: np.ndarray, structure: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``ndi.label`` into uint16 (half the memory and traffic of its int32) unless there are too many labels."""
    try:
        return ndi.label(mask, structure, output=np.uint16)
    except RuntimeError:  # more than 65535 components
        return ndi.label(mask, structure)


def _fill_holes_2d(
    mask: np.ndarray, max_area_px: float | None = None, hu: np.ndarray | None = None, min_mean_hu: float = 0.0
) -> np.ndarray:
    """Fill, slice by slice, background regions not touching the slice border (optionally only small/dense ones).

    Only the in-plane box around the mask is labelled: background outside it reaches the slice border, so a
    region touching the box's edge touches the border too, and the holes are the same."""
    rows, cols = np.flatnonzero(mask.any(axis=(0, 2))), np.flatnonzero(mask.any(axis=(0, 1)))
    if len(rows) == 0:
        return mask.copy()
    box = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    inner = mask[box]
    background, n = _label(~inner, _IN_PLANE)
    filled = mask.copy()
    if n == 0:
        return filled
    border = np.unique(
        np.concatenate([background[:, 0, :].ravel(), background[:, -1, :].ravel(),
                        background[:, :, 0].ravel(), background[:, :, -1].ravel()])
    )
    is_hole = np.ones(n + 1, dtype=bool)
    is_hole[0] = False
    is_hole[border] = False
    if max_area_px is not None:
        sizes = np.bincount(background.ravel(), minlength=n + 1)
        is_hole &= sizes <= max_area_px
    if hu is not None and is_hole.any():
        in_hole = is_hole[background]
        hole_labels = background[in_hole]
        sums = np.bincount(hole_labels, weights=hu[box][in_hole], minlength=n + 1)
        counts = np.maximum(np.bincount(hole_labels, minlength=n + 1), 1)
        is_hole &= sums / counts >= min_mean_hu
    if is_hole.any():
        filled[box] |= is_hole[background]
    return filled


def _square_max(mask: np.ndarray, radius: int) -> np.ndarray:
    """``ndi.maximum_filter(mask, size=(1, 2r+1, 2r+1))`` of a bool slab as shifted ORs. Exact: in the filter's
    default 'reflect' mode every sample mirrored in from outside the slice already lies in its window."""
    return _square_extreme(mask, radius, np.logical_or)


def _square_min(mask: np.ndarray, radius: int) -> np.ndarray:
    """``ndi.minimum_filter(mask, size=(1, 2r+1, 2r+1))`` of a bool slab as shifted ANDs (see :func:`_square_max`)."""
    return _square_extreme(mask, radius, np.logical_and)


def _square_extreme(mask: np.ndarray, radius: int, combine: np.ufunc) -> np.ndarray:
    out = mask
    for axis in (1, 2):
        source, out = out, out.copy()
        n = source.shape[axis]
        for k in range(1, min(radius, n - 1) + 1):
            ahead = [slice(None)] * 3
            behind = [slice(None)] * 3
            ahead[axis], behind[axis] = slice(k, None), slice(None, n - k)
            combine(out[tuple(behind)], source[tuple(ahead)], out=out[tuple(behind)])
            combine(out[tuple(ahead)], source[tuple(behind)], out=out[tuple(ahead)])
    return out


def _dilate(mask: np.ndarray, axes: tuple[int, ...] = (0, 1, 2), iterations: int = 1) -> np.ndarray:
    """``ndi.binary_dilation`` with the cross structure over ``axes`` ((1, 2): ``_IN_PLANE``; all three: the
    default), as shifted ORs: the same mask, several times faster on a bool volume."""
    return _cross(mask, axes, iterations, np.logical_or)


def _erode(mask: np.ndarray, axes: tuple[int, ...] = (0, 1, 2), iterations: int = 1) -> np.ndarray:
    """``ndi.binary_erosion`` with the cross structure over ``axes`` (outside the array counts as background,
    scipy's default border value), as shifted ANDs."""
    return _cross(mask, axes, iterations, np.logical_and)


def _cross(mask: np.ndarray, axes: tuple[int, ...], iterations: int, combine: np.ufunc) -> np.ndarray:
    out = np.asarray(mask, dtype=bool)
    for _ in range(iterations):
        source, out = out, out.copy()
        for axis in axes:
            ahead = [slice(None)] * out.ndim
            behind = [slice(None)] * out.ndim
            ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
            combine(out[tuple(behind)], source[tuple(ahead)], out=out[tuple(behind)])
            combine(out[tuple(ahead)], source[tuple(behind)], out=out[tuple(ahead)])
            if combine is np.logical_and:  # the voxels next to the array's faces see background beyond them
                for face in (0, -1):
                    edge = [slice(None)] * out.ndim
                    edge[axis] = face
                    out[tuple(edge)] = False
    return out


_IN_PLANE_AXES = (1, 2)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = _label(mask)
    if n <= 1:
        return mask.astype(bool, copy=True)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _body_coarse(hu_coarse: np.ndarray, grid: _CoarseGrid) -> np.ndarray:
    """Patient on the coarse grid: tissue, opened in-plane (cuts the table off), largest 3-D component, filled."""
    tissue = hu_coarse > BODY_MIN_HU
    radius = max(1, int(round(4.0 / min(grid.coarse_spacing[1:]))))
    opened = _dilate(_erode(tissue, _IN_PLANE_AXES, radius), _IN_PLANE_AXES, radius)
    if not opened.any():
        raise SegmentationError("no body found: no tissue above -500 HU survives opening")
    body = _largest_component(opened)
    body = _dilate(body, _IN_PLANE_AXES, radius) & tissue
    return _fill_holes_2d(body)


def _airways_coarse(hu_coarse: np.ndarray, inside: np.ndarray, grid: _CoarseGrid) -> np.ndarray:
    """Trachea and main bronchi: long, narrow, near-midline pure-air tubes inside the body."""
    pure_air = (hu_coarse < PURE_AIR_MAX_HU) & inside
    labels, n = _label(pure_air)
    airway = np.zeros_like(pure_air)
    if n == 0:
        return airway
    dz, dy, dx = grid.coarse_spacing
    mid = grid.midline_x(inside)
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None or (box[0].stop - box[0].start) * dz < AIRWAY_MIN_LENGTH_MM:
            continue
        component = labels[box] == index
        areas = component.sum(axis=(1, 2)) * dy * dx
        if np.median(areas[areas > 0]) > AIRWAY_MAX_AREA_MM2:
            continue
        centre = np.asarray(ndi.center_of_mass(component)) + [s.start for s in box]
        if abs(float(grid.lps_x(centre[None, :])[0]) - mid) > AIRWAY_MAX_MIDLINE_OFFSET_MM:
            continue
        airway[box] |= component
    if airway.any():  # bronchial fragments the coarse grid split off the tree
        touching = np.unique(labels[_dilate(airway, iterations=2) & pure_air & ~airway])
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        fragments = touching[(touching > 0) & (sizes[touching] * grid.voxel_ml < AIRWAY_FRAGMENT_MAX_ML)]
        airway |= np.isin(labels, fragments)
    return airway


def _lungs_coarse(
    hu_coarse: np.ndarray, inside: np.ndarray, airway: np.ndarray, grid: _CoarseGrid
) -> tuple[np.ndarray, np.ndarray]:
    """Left and right lung regions on the coarse grid, from the air components whose core is parenchyma."""
    candidates = (hu_coarse < AIR_MAX_HU) & inside & ~_dilate(airway)
    labels, n = _label(candidates)
    left = np.zeros_like(candidates)
    right = np.zeros_like(candidates)
    mid = grid.midline_x(inside)
    min_voxels = LUNG_MIN_ML / grid.voxel_ml
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        component = labels[box] == index
        if component.sum() < min_voxels:
            continue
        core = ndi.binary_erosion(component)
        values = hu_coarse[box][core if core.sum() >= min_voxels / 4 else component]
        if np.median(values) < LUNG_CORE_MIN_HU:
            continue  # pure gas: bowel, stomach, air trapped outside the chest wall
        voxels = np.argwhere(component)
        on_left = grid.lps_x(voxels + [s.start for s in box]) > mid
        fraction_left = float(on_left.mean())
        if 0.2 < fraction_left < 0.8:  # lungs touching across the midline: split at the midline
            left_part = np.zeros_like(component)
            left_part[tuple(voxels[on_left].T)] = True
            left[box] |= left_part
            right[box] |= component & ~left_part
        elif fraction_left >= 0.8:
            left[box] |= component
        else:
            right[box] |= component
    return left, right


class _LungRegion:
    """Where one lung may be at full resolution: its coarse region, dilated once, and that region's box."""

    def __init__(self, region_coarse: np.ndarray, grid: _CoarseGrid) -> None:
        self.grid = grid
        self.near = _dilate(region_coarse) if region_coarse.any() else None
        if self.near is not None:
            box = ndi.find_objects(self.near.astype(np.uint8))[0]
            self.box = tuple(slice(b.start * f, min(b.stop * f, n)) for b, f, n in zip(box, grid.factors, grid.shape))

    def lung(self, hu: np.ndarray, z: slice, airway: np.ndarray, body: np.ndarray) -> np.ndarray:
        """The lung on slab ``z``: air voxels of the region, vessels filled in, airways excluded. Filters and
        hole filling see the region's box (its edges are the slice border), as they would on the whole box."""
        lung = np.zeros((z.stop - z.start, *hu.shape[1:]), dtype=bool)
        if self.near is None:
            return lung
        zs = slice(max(z.start, self.box[0].start), min(z.stop, self.box[0].stop))
        if zs.start >= zs.stop:
            return lung
        rows, cols = self.box[1], self.box[2]
        here = (zs, rows, cols)
        local = (slice(zs.start - z.start, zs.stop - z.start), rows, cols)
        region = self.grid.upsample(self.near, zs, rows, cols)
        not_airway = ~airway[local]
        air = (hu[here] < AIR_MAX_HU) & region & not_airway
        radius = max(1, int(round(2.0 / min(self.grid.spacing[1:]))))
        closed = _square_min(_square_max(air, radius), radius)
        lung[local] = _fill_holes_2d(closed | air) & body[here] & not_airway
        return lung


def _bone_candidates(hu: np.ndarray, allowed: np.ndarray, grid: _CoarseGrid) -> np.ndarray:
    """Bone before its component check: ≥ 120 HU, small gaps closed in-plane, dense enclosed marrow filled."""
    dense = (hu >= BONE_MIN_HU) & allowed
    radius = max(1, int(round(1.5 / min(grid.spacing[1:]))))
    closed = _square_min(_square_max(dense, radius), radius)
    closed &= allowed
    pixel_area = grid.spacing[1] * grid.spacing[2]
    return _fill_holes_2d(closed, MARROW_MAX_AREA_MM2 / pixel_area, hu, MARROW_MIN_MEAN_HU) & allowed


class _SlabComponents:
    """A slab's 3-D connected components of bone candidates: how many, the label of each candidate voxel (in
    raster order), those with cortical bone HU (seeds) and the labels on its first and last slice, where they
    join the neighbouring slabs' components."""

    def __init__(self, count: int, voxel_labels: np.ndarray, seeds: np.ndarray, first: np.ndarray,
                 last: np.ndarray) -> None:
        self.count, self.voxel_labels, self.seeds, self.first, self.last = count, voxel_labels, seeds, first, last

    @classmethod
    def of(cls, candidates: np.ndarray, cortical: np.ndarray) -> "_SlabComponents":
        labels, count = _label(candidates)
        dtype = np.uint16 if count < 2**16 else np.int32
        return cls(count, labels[candidates].astype(dtype), np.unique(labels[candidates & cortical]),
                   labels[0].copy(), labels[-1].copy())


def _kept_components(slabs: list[_SlabComponents]) -> list[np.ndarray]:
    """Per slab, whether each of its components (index = label, 0 = background) belongs to a volume-wide
    component with a seed: the components of ``ndi.label`` on the whole volume that have cortical bone HU."""
    offsets = np.concatenate([[0], np.cumsum([s.count for s in slabs])])
    total = int(offsets[-1]) + 1
    pairs = [np.zeros((0, 2), dtype=np.int64)]
    for k in range(len(slabs) - 1):
        below, above = slabs[k].last, slabs[k + 1].first
        touching = (below > 0) & (above > 0)
        pairs.append(np.unique(np.stack([below[touching] + offsets[k], above[touching] + offsets[k + 1]], axis=1),
                               axis=0))
    edges = np.concatenate(pairs)
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(total, total))
    _, component = connected_components(graph, directed=False)
    seeded = np.zeros(component.max() + 1, dtype=bool)
    seeds = np.concatenate([s.seeds[s.seeds > 0] + offset for s, offset in zip(slabs, offsets)])
    seeded[component[seeds]] = True
    kept = seeded[component]
    kept[0] = False
    return [np.concatenate([[False], kept[offsets[k] + 1:offsets[k + 1] + 1]]) for k in range(len(slabs))]


def _body_wall_muscle_coarse(
    hu_coarse: np.ndarray, body_coarse: np.ndarray, bone_coarse: np.ndarray, grid: _CoarseGrid
) -> np.ndarray:
    """Coarse mask of the muscle layer: on rays from outside in, the first soft-tissue run after the fat.

    The rays of each slice are independent (their length and count are set once for the volume), so slices
    are cast in chunks on all cores: a chunk's rays, not the volume's, are in memory at once."""
    n_slices, rows, cols = hu_coarse.shape
    present = body_coarse.any(axis=(1, 2))
    yy, xx = np.mgrid[0:rows, 0:cols]
    area = np.maximum(body_coarse.sum(axis=(1, 2)), 1)
    cy = (body_coarse * yy).sum(axis=(1, 2)) / area
    cx = (body_coarse * xx).sum(axis=(1, 2)) / area

    ys, xs = np.nonzero(body_coarse.any(axis=0))
    reach = max(np.hypot(ys - cy[present, None].min(), xs - cx[present, None].min()).max(),
                np.hypot(ys - cy[present].max(), xs - cx[present].max()).max()) + 2
    n_angles = int(2 * np.pi * reach)
    step = 0.5
    radii = np.arange(reach, -step, -step)  # outside → centre
    angles = np.arange(n_angles) * (2 * np.pi / n_angles)
    pixel = min(grid.coarse_spacing[1:])
    skin_max, gap_max = SKIN_MAX_MM / (step * pixel), MUSCLE_FAT_GAP_MM / (step * pixel)
    window = max(3, int(n_angles * MUSCLE_ANGLE_WINDOW_DEGREES / 360) | 1)
    wall = np.empty(hu_coarse.shape, dtype=bool)
    outside, fat, soft, stop = 0, 1, 2, 3

    def chunk(z: slice) -> None:
        classes = np.full((z.stop - z.start, rows, cols), soft, dtype=np.uint8)
        classes[(hu_coarse[z] < SOFT_TISSUE_HU[0])] = fat
        classes[(hu_coarse[z] < AIR_MAX_HU) | bone_coarse[z]] = stop
        classes[~body_coarse[z]] = outside
        n = len(classes)
        # Every sample lands in ``padded`` (off the slice: outside), one flat index per ray and radius.
        margin = int(np.ceil(reach)) + 1
        padded = np.pad(classes, ((0, 0), (margin, margin), (margin, margin)), constant_values=outside).ravel()
        width = cols + 2 * margin
        base = np.repeat(np.arange(n) * (rows + 2 * margin) * width, n_angles)
        sin, cos = np.tile(np.sin(angles), n), np.tile(np.cos(angles), n)
        centre_y, centre_x = np.repeat(cy[z], n_angles), np.repeat(cx[z], n_angles)
        ids = np.arange(n * n_angles)  # the rays still running, compacted as rays finish
        state = np.zeros(len(ids), dtype=np.uint8)  # 0 outside, 1 skin, 2 subcutaneous fat, 3 muscle, 4 done
        run = np.zeros(len(ids), dtype=np.int32)
        r_outer_all = np.full(len(ids), -1.0)
        r_inner_all = np.full(len(ids), -1.0)
        r_outer, r_inner = r_outer_all.copy(), r_inner_all.copy()
        for i, radius in enumerate(radii):  # each ray's class at this radius, then one step of its state machine
            if i % 8 == 7:  # a finished ray never changes again: drop it from the arrays
                running = state != 4
                if np.count_nonzero(running) < 0.75 * len(state):
                    r_outer_all[ids], r_inner_all[ids] = r_outer, r_inner
                    ids, state, run, r_outer, r_inner = (a[running] for a in (ids, state, run, r_outer, r_inner))
                    base, sin, cos, centre_y, centre_x = (a[running] for a in (base, sin, cos, centre_y, centre_x))
                    if len(ids) == 0:
                        break
            sample_y = np.rint(centre_y + radius * sin).astype(np.int32)
            sample_x = np.rint(centre_x + radius * cos).astype(np.int32)
            c = padded[base + (sample_y + margin) * width + (sample_x + margin)]
            enter = (state == 0) & (c != outside)
            state[enter & (c == fat)] = 2
            state[enter & (c == soft)] = 1
            state[enter & (c == stop)] = 4
            run[enter] = 0
            skin = (state == 1) & ~enter
            run[skin] += 1
            state[skin & (c == fat)] = 2
            state[skin & (c == stop)] = 4
            no_fat = skin & (c == soft) & (run > skin_max)  # no subcutaneous fat: the wall starts under the skin
            sat = (state == 2) & ~enter
            begin = (sat & (c == soft)) | no_fat
            state[sat & (c == stop)] = 4
            muscle = (state == 3)
            run[muscle & (c == fat)] += 1
            run[muscle & (c == soft)] = 0
            r_inner[muscle & (c == soft)] = radius
            state[muscle & ((c == stop) | (c == outside) | (run > gap_max))] = 4
            state[begin] = 3
            run[begin] = 0
            r_outer[begin] = radius
            r_inner[begin] = radius
        r_outer_all[ids], r_inner_all[ids] = r_outer, r_inner
        r_outer, r_inner = r_outer_all.reshape(n, n_angles), r_inner_all.reshape(n, n_angles)

        # A ray that slips through a gap in the fat plane runs on into an organ (liver, spleen) and draws a
        # streak. Neighbouring rays do not: cap each ray's muscle thickness near the median of its neighbours.
        thickness = np.where(r_outer >= 0, r_outer - r_inner, 0.0)
        typical = ndi.median_filter(thickness, size=(1, window), mode="wrap")
        r_inner = np.where(r_outer >= 0,
                           r_outer - np.minimum(thickness, typical + MUSCLE_THICKNESS_SLACK_MM / pixel), r_inner)

        for k, index in enumerate(range(z.start, z.stop)):  # slice by slice: (rows, cols) float64 temporaries
            dy, dx = yy - cy[index], xx - cx[index]
            r = np.hypot(dy, dx)
            a = np.rint(np.arctan2(dy, dx) / (2 * np.pi) * n_angles).astype(np.int64) % n_angles
            outer, inner = r_outer[k][a], r_inner[k][a]
            wall[index] = ((r <= outer + step) & (r >= inner - step) & (outer >= 0) & (classes[k] == soft)
                           & present[index])

    map_slabs(chunk, even_slabs(n_slices))
    return wall


TRUNK_BODY_PARTS = frozenset({"CHEST", "THORAX", "ABDOMEN", "PELVIS", "ABDOMENPELVIS", "CHESTABDOMEN",
                              "CHESTABDPELVIS", "TRUNK", "WHOLEBODY", "LSPINE", "TSPINE", "BREAST", "HEART"})
"""Body Part Examined (0018,0015) values (PS3.16 CID 4031) of a scan through the trunk."""
NOT_TRUNK_BODY_PARTS = frozenset({"HEAD", "BRAIN", "SKULL", "NECK", "HEADNECK", "FACE", "EAR", "IAC", "ORBIT",
                                  "SINUS", "JAW", "TMJ", "CSPINE", "SHOULDER", "ARM", "ELBOW", "HAND", "HIP",
                                  "LEG", "KNEE", "ANKLE", "FOOT", "EXTREMITY"})
"""Body Part Examined values of a scan that is not through the trunk."""
TRUNK_MIN_CROSS_SECTION_CM2 = 400.0
"""Without lungs or a Body Part Examined, a trunk is assumed where the body's median cross-section is at least
this large (an adult head is about 200 cm², a slim adult abdomen about 450 cm²)."""
BODY_COMPOSITION = ("adipose_tissue", "skeletal_muscle")


def assess_scanned_range(volume: Volume, segments: list[Segment],
                         body_part: str = "") -> tuple[list[Segment], list[NotAssessed]]:
    """The segments this scan can report, and what it cannot, with the reason.

    Lungs are reported only where lung parenchyma was found (a head or pelvis CT does not include the
    thorax: its lungs are "not assessed", never "0 mL"); body composition (adipose tissue, skeletal
    muscle) only on a scan through the trunk: lungs found, a trunk Body Part Examined, or (unless the Body
    Part Examined names a head, neck or limb) a body cross-section the size of a trunk.
    """
    by_key = {s.structure.key: s for s in segments}
    lung_ml = sum(by_key[k].voxel_count() for k in ("lung_left", "lung_right") if k in by_key) * volume.voxel_volume_ml
    has_lungs = lung_ml >= LUNG_MIN_ML
    dropped: dict[str, NotAssessed] = {}
    part = body_part.upper().replace(" ", "")
    if not has_lungs:
        reason = ("the scanned range does not include the thorax: no lung parenchyma was found"
                  + (f" (Body Part Examined {part})" if part else ""))
        dropped |= dict.fromkeys(("lung_left", "lung_right"), NotAssessed("lungs", reason, ("lung_left", "lung_right")))
    body = by_key.get("body")
    cross_section_cm2 = (float(np.median(body.slice_counts())) * volume.spacing[1] * volume.spacing[2] / 100.0
                         if body is not None else 0.0)
    trunk = has_lungs or part in TRUNK_BODY_PARTS or (part not in NOT_TRUNK_BODY_PARTS
                                                      and cross_section_cm2 >= TRUNK_MIN_CROSS_SECTION_CM2)
    if not trunk:
        where = f"Body Part Examined {part}" if part in NOT_TRUNK_BODY_PARTS else "body cross-section smaller than a trunk"
        reason = f"body composition is measured on the trunk, and this scan is not through the trunk ({where}, no lungs)"
        dropped |= dict.fromkeys(BODY_COMPOSITION, NotAssessed("body composition (adipose tissue, skeletal muscle)",
                                                               reason, BODY_COMPOSITION))
    kept = [s for s in segments if s.structure.key not in dropped]
    return kept, list(dict.fromkeys(dropped.values()))
