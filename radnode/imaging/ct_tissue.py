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


def segment_ct_tissues(volume: Volume) -> list[Segment]:
    """Six binary masks on the volume grid: body (contains all others), lungs, bone, fat, muscle (disjoint)."""
    hu = _checked_array(volume)
    grid = _CoarseGrid(volume)
    hu_coarse = grid.downsample_mean(hu)

    body_coarse = _body_coarse(hu_coarse, grid)
    body = _fill_holes_2d((hu > BODY_MIN_HU) & grid.upsample(ndi.binary_dilation(body_coarse, _IN_PLANE)))

    body_filled_coarse = grid.downsample_mean(body) > 0.5
    airway_coarse = _airways_coarse(hu_coarse, body_filled_coarse, grid)
    lung_left_c, lung_right_c = _lungs_coarse(hu_coarse, body_filled_coarse, airway_coarse, grid)
    airway = grid.upsample(ndi.binary_dilation(airway_coarse, iterations=1))
    lung_left = _lung_full(hu, lung_left_c, airway, body, grid)
    lung_right = _lung_full(hu, lung_right_c, airway, body, grid)
    overlap = lung_left & lung_right
    if overlap.any():
        left_side = grid.left_of_midline(body_coarse)
        lung_left &= ~overlap | left_side
        lung_right &= ~overlap | ~left_side
    lungs = lung_left | lung_right

    bone = _bone(hu, body & ~lungs, grid)
    adipose = body & ~lungs & ~bone & (hu >= FAT_HU[0]) & (hu <= FAT_HU[1])
    soft = body & ~lungs & ~bone & (hu >= SOFT_TISSUE_HU[0]) & (hu <= SOFT_TISSUE_HU[1])
    wall_coarse = _body_wall_muscle_coarse(hu_coarse, body_coarse, grid.downsample_mean(bone) > 0.3, grid)
    muscle = soft & grid.upsample(ndi.binary_dilation(wall_coarse, _IN_PLANE))

    masks = {
        "body": body,
        "lung_left": lung_left,
        "lung_right": lung_right,
        "bone": bone,
        "adipose_tissue": adipose,
        "skeletal_muscle": muscle,
    }
    return [Segment(CT_TISSUE_STRUCTURES[key], mask) for key, mask in masks.items()]


def _checked_array(volume: Volume) -> np.ndarray:
    hu = np.asarray(volume.array)
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise SegmentationError(f"expected a 3-D volume, got shape {hu.shape}")
    if hu.shape[1] < 16 or hu.shape[2] < 16:
        raise SegmentationError(f"slices of {hu.shape[1]}x{hu.shape[2]} are too small to segment")
    if abs(volume.slice_direction[2]) < 0.7:
        raise SegmentationError("only axial CT is supported (slice normal is not along the patient z axis)")
    if not np.isfinite(hu).all():
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

    def downsample_mean(self, array: np.ndarray) -> np.ndarray:
        """Mean over blocks (edge-padded to whole blocks), as float32."""
        pad = [(0, c * f - n) for n, f, c in zip(self.shape, self.factors, self.coarse_shape)]
        data = array.astype(np.float32, copy=False)
        if any(p[1] for p in pad):
            data = np.pad(data, pad, mode="edge")
        (cz, cy, cx), (fz, fy, fx) = self.coarse_shape, self.factors
        return data.reshape(cz, fz, cy, fy, cx, fx).mean(axis=(1, 3, 5), dtype=np.float32)

    def upsample(self, coarse: np.ndarray) -> np.ndarray:
        """Nearest-neighbour back to the full grid."""
        index = [np.arange(n) // f for n, f in zip(self.shape, self.factors)]
        return coarse[np.ix_(*index)]

    def lps_x(self, coarse_index: np.ndarray) -> np.ndarray:
        """Patient x (LPS, + = patient left) of coarse voxel indices (k, 3) at their block centres."""
        full = coarse_index * np.asarray(self.factors) + (np.asarray(self.factors) - 1) / 2.0
        return full @ self.affine[0, :3] + self.affine[0, 3]

    def midline_x(self, body_coarse: np.ndarray) -> float:
        """Patient x of the body's centre of mass: the left/right dividing plane."""
        return float(self.lps_x(np.asarray(ndi.center_of_mass(body_coarse))[None, :])[0])

    def left_of_midline(self, body_coarse: np.ndarray) -> np.ndarray:
        """Full-grid bool: voxel lies on the patient's left of the body midline."""
        mid = self.midline_x(body_coarse)
        a = self.affine
        s, r, c = (np.arange(n, dtype=np.float64) for n in self.shape)
        x = a[0, 0] * s[:, None, None] + a[0, 1] * r[None, :, None] + a[0, 2] * c[None, None, :] + a[0, 3]
        return x > mid


def _fill_holes_2d(
    mask: np.ndarray, max_area_px: float | None = None, hu: np.ndarray | None = None, min_mean_hu: float = 0.0
) -> np.ndarray:
    """Fill, slice by slice, background regions not touching the slice border (optionally only small/dense ones)."""
    background, n = ndi.label(~mask, _IN_PLANE)
    if n == 0:
        return mask.copy()
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
        sums = np.bincount(hole_labels, weights=hu[in_hole], minlength=n + 1)
        counts = np.maximum(np.bincount(hole_labels, minlength=n + 1), 1)
        is_hole &= sums / counts >= min_mean_hu
    return mask | is_hole[background]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n <= 1:
        return mask.astype(bool, copy=True)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _body_coarse(hu_coarse: np.ndarray, grid: _CoarseGrid) -> np.ndarray:
    """Patient on the coarse grid: tissue, opened in-plane (cuts the table off), largest 3-D component, filled."""
    tissue = hu_coarse > BODY_MIN_HU
    radius = max(1, int(round(4.0 / min(grid.coarse_spacing[1:]))))
    opened = ndi.binary_opening(tissue, _IN_PLANE, iterations=radius)
    if not opened.any():
        raise SegmentationError("no body found: no tissue above -500 HU survives opening")
    body = _largest_component(opened)
    body = ndi.binary_dilation(body, _IN_PLANE, iterations=radius) & tissue
    return _fill_holes_2d(body)


def _airways_coarse(hu_coarse: np.ndarray, inside: np.ndarray, grid: _CoarseGrid) -> np.ndarray:
    """Trachea and main bronchi: long, narrow, near-midline pure-air tubes inside the body."""
    pure_air = (hu_coarse < PURE_AIR_MAX_HU) & inside
    labels, n = ndi.label(pure_air)
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
        touching = np.unique(labels[ndi.binary_dilation(airway, iterations=2) & pure_air & ~airway])
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        fragments = touching[(touching > 0) & (sizes[touching] * grid.voxel_ml < AIRWAY_FRAGMENT_MAX_ML)]
        airway |= np.isin(labels, fragments)
    return airway


def _lungs_coarse(
    hu_coarse: np.ndarray, inside: np.ndarray, airway: np.ndarray, grid: _CoarseGrid
) -> tuple[np.ndarray, np.ndarray]:
    """Left and right lung regions on the coarse grid, from the air components whose core is parenchyma."""
    candidates = (hu_coarse < AIR_MAX_HU) & inside & ~ndi.binary_dilation(airway)
    labels, n = ndi.label(candidates)
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


def _lung_full(
    hu: np.ndarray, region_coarse: np.ndarray, airway: np.ndarray, body: np.ndarray, grid: _CoarseGrid
) -> np.ndarray:
    """Full-resolution lung: air voxels near the coarse region, vessels filled in, airways excluded."""
    lung = np.zeros(hu.shape, dtype=bool)
    if not region_coarse.any():
        return lung
    region = grid.upsample(ndi.binary_dilation(region_coarse))
    box = ndi.find_objects(region.astype(np.uint8))[0]
    air = (hu[box] < AIR_MAX_HU) & region[box] & ~airway[box]
    size = 2 * max(1, int(round(2.0 / min(grid.spacing[1:])))) + 1
    closed = ndi.minimum_filter(ndi.maximum_filter(air, size=(1, size, size)), size=(1, size, size))
    filled = _fill_holes_2d(closed | air) & body[box] & ~airway[box]
    lung[box] = filled
    return lung


def _bone(hu: np.ndarray, allowed: np.ndarray, grid: _CoarseGrid) -> np.ndarray:
    """Bone: ≥ 120 HU, small gaps closed in-plane, dense enclosed marrow filled, needs some cortical HU."""
    dense = (hu >= BONE_MIN_HU) & allowed
    size = 2 * max(1, int(round(1.5 / min(grid.spacing[1:])))) + 1
    closed = ndi.minimum_filter(ndi.maximum_filter(dense, size=(1, size, size)), size=(1, size, size))
    closed &= allowed
    pixel_area = grid.spacing[1] * grid.spacing[2]
    filled = _fill_holes_2d(closed, MARROW_MAX_AREA_MM2 / pixel_area, hu, MARROW_MIN_MEAN_HU) & allowed
    labels, n = ndi.label(filled)
    keep = np.zeros(n + 1, dtype=bool)
    keep[np.unique(labels[filled & (hu >= CORTICAL_MIN_HU)])] = True
    keep[0] = False
    return keep[labels]


def _body_wall_muscle_coarse(
    hu_coarse: np.ndarray, body_coarse: np.ndarray, bone_coarse: np.ndarray, grid: _CoarseGrid
) -> np.ndarray:
    """Coarse mask of the muscle layer: on rays from outside in, the first soft-tissue run after the fat."""
    outside, fat, soft, stop = 0, 1, 2, 3
    classes = np.full(hu_coarse.shape, soft, dtype=np.uint8)
    classes[(hu_coarse < SOFT_TISSUE_HU[0])] = fat
    classes[(hu_coarse < AIR_MAX_HU) | bone_coarse] = stop
    classes[~body_coarse] = outside

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
    sample_y = np.rint(cy[:, None, None] + radii[None, None, :] * np.sin(angles)[None, :, None]).astype(np.int32)
    sample_x = np.rint(cx[:, None, None] + radii[None, None, :] * np.cos(angles)[None, :, None]).astype(np.int32)
    valid = (sample_y >= 0) & (sample_y < rows) & (sample_x >= 0) & (sample_x < cols)
    slice_index = np.broadcast_to(np.arange(n_slices)[:, None, None], sample_y.shape)
    ray = np.where(valid, classes[slice_index, np.clip(sample_y, 0, rows - 1), np.clip(sample_x, 0, cols - 1)],
                   outside)

    pixel = min(grid.coarse_spacing[1:])
    skin_max, gap_max = SKIN_MAX_MM / (step * pixel), MUSCLE_FAT_GAP_MM / (step * pixel)
    state = np.zeros(ray.shape[:2], dtype=np.uint8)  # 0 outside, 1 skin, 2 subcutaneous fat, 3 muscle, 4 done
    run = np.zeros(ray.shape[:2], dtype=np.int32)
    r_outer = np.full(ray.shape[:2], -1.0)
    r_inner = np.full(ray.shape[:2], -1.0)
    for i, radius in enumerate(radii):
        c = ray[:, :, i]
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

    # A ray that slips through a gap in the fat plane runs on into an organ (liver, spleen) and draws a
    # streak. Neighbouring rays do not: cap each ray's muscle thickness near the median of its neighbours.
    thickness = np.where(r_outer >= 0, r_outer - r_inner, 0.0)
    window = max(3, int(n_angles * MUSCLE_ANGLE_WINDOW_DEGREES / 360) | 1)
    typical = ndi.median_filter(thickness, size=(1, window), mode="wrap")
    r_inner = np.where(r_outer >= 0, r_outer - np.minimum(thickness, typical + MUSCLE_THICKNESS_SLACK_MM / pixel),
                       r_inner)

    dy = yy[None, :, :] - cy[:, None, None]
    dx = xx[None, :, :] - cx[:, None, None]
    r = np.hypot(dy, dx)
    a = np.rint(np.arctan2(dy, dx) / (2 * np.pi) * n_angles).astype(np.int64) % n_angles
    s = np.arange(n_slices)[:, None, None]
    outer, inner = r_outer[s, a], r_inner[s, a]
    wall = (r <= outer + step) & (r >= inner - step) & (outer >= 0)
    return wall & (classes == soft) & present[:, None, None]


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
    masks = {s.structure.key: s.mask for s in segments}
    lung_ml = sum(float(masks[k].sum()) for k in ("lung_left", "lung_right") if k in masks) * volume.voxel_volume_ml
    has_lungs = lung_ml >= LUNG_MIN_ML
    dropped: dict[str, NotAssessed] = {}
    part = body_part.upper().replace(" ", "")
    if not has_lungs:
        reason = ("the scanned range does not include the thorax: no lung parenchyma was found"
                  + (f" (Body Part Examined {part})" if part else ""))
        dropped |= dict.fromkeys(("lung_left", "lung_right"), NotAssessed("lungs", reason, ("lung_left", "lung_right")))
    body = masks.get("body")
    cross_section_cm2 = (float(np.median(body.reshape(len(body), -1).sum(axis=1))) * volume.spacing[1]
                         * volume.spacing[2] / 100.0) if body is not None else 0.0
    trunk = has_lungs or part in TRUNK_BODY_PARTS or (part not in NOT_TRUNK_BODY_PARTS
                                                      and cross_section_cm2 >= TRUNK_MIN_CROSS_SECTION_CM2)
    if not trunk:
        where = f"Body Part Examined {part}" if part in NOT_TRUNK_BODY_PARTS else "body cross-section smaller than a trunk"
        reason = f"body composition is measured on the trunk, and this scan is not through the trunk ({where}, no lungs)"
        dropped |= dict.fromkeys(BODY_COMPOSITION, NotAssessed("body composition (adipose tissue, skeletal muscle)",
                                                               reason, BODY_COMPOSITION))
    kept = [s for s in segments if s.structure.key not in dropped]
    return kept, list(dict.fromkeys(dropped.values()))
