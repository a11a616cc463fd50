"""CT tissue segmentation against exact phantom truth and against real CT with TotalSegmentator ground truth."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from support.nifti import nifti_labels, nifti_to_volume
from radnode.imaging import ct_tissue as ct
from radnode.imaging.ct_tissue import CT_TISSUE_STRUCTURES, SegmentationError, segment_ct_tissues
from radnode.imaging.volume import Volume
from radnode.measure import LAA950, MEAN, VOLUME, measure_ct
from radnode.phantom import CTPhantom, make_ct_phantom
from radnode.results import Segment

LUNG_LEFT, LUNG_RIGHT = (10, 11), (12, 13, 14)
BONE = tuple(range(25, 51)) + tuple(range(69, 79)) + tuple(range(91, 117))
BOWEL = (6, 18, 19, 20)  # stomach, small bowel, duodenum, colon


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def phantom_volume(phantom: CTPhantom, dtype: type = np.int16) -> Volume:
    """The phantom as a pipeline gets a CT: int16 HU (what build_volume gives for a CT)."""
    return Volume(phantom.hu.astype(dtype), phantom.spacing, phantom.positions, phantom.orientation)


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


PHANTOM_HU_SHA256 = "6e571313a77343f320dd2f80350bbbd4f26f2889961b632de8378c5452af1786"
"""``make_ct_phantom(220, 512, seed=0).hu``: the input the digests below were recorded on."""
PHANTOM_MASK_SHA256 = {
    "body": "526dd20457a937ecbc5ce849f336e3c128d8f7f954a61fc10ad143bd1bf01e83",
    "lung_left": "08c658a67d8b2f4128a6c0f464661887bb4ca0699c0c7974a0be7d534b69d7f8",
    "lung_right": "cd58ff40ca81012b14957d277a841c83016c20c8fc48e84f6eadb1d9a18cdf36",
    "bone": "8db8fd7c350800814d52bce49d7a2484a9187a9ba154ba278d2f675900d31081",
    "adipose_tissue": "f8487f22bec61d4f7f3ef1b3dd502bd2400f59676853f47c273a0b665c3452ca",
    "skeletal_muscle": "0849024251fb0a69f90c2f0588f43762592cbb504508f6127753c1913c9b3eaa",
}
"""SHA-256 of ``np.packbits(mask)`` per segment of that phantom, recorded with the whole-volume implementation
(commit 5c432af) before the slab-parallel one: the speed-up must not move a single voxel."""


@pytest.fixture(scope="module")
def phantom() -> CTPhantom:
    return make_ct_phantom(n_slices=220, size=512, seed=0)


@pytest.fixture(scope="module")
def phantom_result(phantom: CTPhantom) -> list[Segment]:
    return segment_ct_tissues(phantom_volume(phantom))


@pytest.fixture(scope="module")
def phantom_segments(phantom_result: list[Segment]) -> dict[str, np.ndarray]:
    return {s.structure.key: s.mask for s in phantom_result}


@pytest.fixture(scope="module")
def real_ct(totalseg_reference: Path) -> tuple[Volume, np.ndarray, dict[str, np.ndarray]]:
    volume = nifti_to_volume(totalseg_reference / "example_ct_sm.nii.gz")
    labels = nifti_labels(totalseg_reference / "example_seg.nii.gz")
    return volume, labels, {s.structure.key: s.mask for s in segment_ct_tissues(volume)}


@pytest.mark.slow
@pytest.mark.parametrize("key", list(CT_TISSUE_STRUCTURES))
def test_phantom_dice(phantom: CTPhantom, phantom_segments: dict[str, np.ndarray], key: str) -> None:
    assert dice(phantom_segments[key], phantom.truth[key]) >= 0.95


@pytest.mark.slow
def test_phantom_masks_are_those_of_the_whole_volume_implementation(
        phantom: CTPhantom, phantom_segments: dict[str, np.ndarray]) -> None:
    assert sha256(phantom.hu) == PHANTOM_HU_SHA256, "the phantom changed: the recorded mask digests do not apply"
    assert {key: sha256(np.packbits(mask)) for key, mask in phantom_segments.items()} == PHANTOM_MASK_SHA256


def test_int16_and_float32_hounsfield_units_give_the_same_masks() -> None:
    """The exact integer block means (int16, as DICOM CT loads) and NumPy's float32 means give one answer."""
    small = make_ct_phantom(n_slices=60, size=128, seed=1)
    as_int = segment_ct_tissues(phantom_volume(small))
    as_float = segment_ct_tissues(phantom_volume(small, np.float32))
    for a, b in zip(as_int, as_float):
        assert np.array_equal(a.mask, b.mask), a.structure.key


def test_shortcuts_equal_scipy_and_numpy() -> None:
    """The shifted-OR/AND morphology and the integer block means are the scipy/NumPy operations they replace."""
    rng = np.random.default_rng(1)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndi.generate_binary_structure(2, 1)
    for _ in range(20):
        shape = tuple(int(n) for n in rng.integers(1, 14, 3))
        mask = rng.random(shape) < rng.random()
        for n in (1, 2, 3):
            assert np.array_equal(ct._dilate(mask, iterations=n), ndi.binary_dilation(mask, iterations=n))
            assert np.array_equal(ct._erode(mask, iterations=n), ndi.binary_erosion(mask, iterations=n))
            assert np.array_equal(ct._dilate(mask, (1, 2), n), ndi.binary_dilation(mask, in_plane, iterations=n))
            assert np.array_equal(ct._erode(mask, (1, 2), n), ndi.binary_erosion(mask, in_plane, iterations=n))
            size = (1, 2 * n + 1, 2 * n + 1)
            assert np.array_equal(ct._square_max(mask, n), ndi.maximum_filter(mask, size=size))
            assert np.array_equal(ct._square_min(mask, n), ndi.minimum_filter(mask, size=size))
    hu = rng.integers(-1024, 3072, size=(7, 50, 47)).astype(np.int16)
    volume = Volume(hu, (0.7, 0.7, 0.6), np.stack([np.zeros(7), np.zeros(7), np.arange(7) * 0.7], 1),
                    (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    grid = ct._CoarseGrid(volume)
    factors, coarse = grid.factors, grid.coarse_shape
    padded = np.pad(hu.astype(np.float32), [(0, c * f - n) for n, f, c in zip(hu.shape, factors, coarse)], mode="edge")
    reference = padded.reshape(coarse[0], factors[0], coarse[1], factors[1], coarse[2], factors[2]).mean(
        axis=(1, 3, 5), dtype=np.float32)
    assert np.array_equal(grid.downsample_mean(hu), reference)


@pytest.mark.slow
def test_phantom_masks_nest_and_exclude(phantom_segments: dict[str, np.ndarray]) -> None:
    body = phantom_segments["body"]
    inner = [k for k in CT_TISSUE_STRUCTURES if k != "body"]
    total = np.zeros_like(body, dtype=np.uint8)
    for key in inner:
        assert not (phantom_segments[key] & ~body).any(), key
        total += phantom_segments[key]
    assert total.max() == 1


@pytest.mark.slow
def test_phantom_airway_and_bowel_gas_not_lung(phantom: CTPhantom, phantom_segments: dict[str, np.ndarray]) -> None:
    lungs = phantom_segments["lung_left"] | phantom_segments["lung_right"]
    true_lungs = phantom.truth["lung_left"] | phantom.truth["lung_right"]
    gas_in_body = phantom.truth["body"] & (phantom.hu < -950) & ~true_lungs  # trachea, bronchi, bowel gas
    assert np.count_nonzero(gas_in_body) > 20_000
    assert np.count_nonzero(lungs & gas_in_body) < 0.01 * np.count_nonzero(gas_in_body)


@pytest.mark.slow
def test_phantom_measurements(phantom: CTPhantom, phantom_result: list[Segment]) -> None:
    volume = phantom_volume(phantom)
    segments = phantom_result
    measurements = measure_ct(volume, segments)
    by_key = {(m.structure_key, m.name.value, m.derivation.value if m.derivation else None): m.value
              for m in measurements}
    for key in ("lung_left", "lung_right"):
        true_ml = np.count_nonzero(phantom.truth[key]) * volume.voxel_volume_ml
        assert by_key[(key, VOLUME.value, None)] == pytest.approx(true_ml, rel=0.05)
        mask = next(s.mask for s in segments if s.structure.key == key)
        independent = 100.0 * np.count_nonzero(phantom.hu[mask] < -950) / np.count_nonzero(mask)
        assert by_key[(key, LAA950.value, None)] == pytest.approx(independent, abs=0.005)
        assert by_key[(key, LAA950.value, None)] > 0.5  # the phantom has emphysema blobs
        assert -900 < by_key[(key, "112031", MEAN.value)] < -700
    assert by_key[("adipose_tissue", "112031", MEAN.value)] == pytest.approx(-100, abs=3)


def test_real_ct_lungs_and_bone(real_ct: tuple[Volume, np.ndarray, dict[str, np.ndarray]]) -> None:
    _, labels, masks = real_ct
    left, right = np.isin(labels, LUNG_LEFT), np.isin(labels, LUNG_RIGHT)
    assert dice(masks["lung_left"], left) >= 0.9
    assert dice(masks["lung_right"], right) >= 0.9
    assert dice(masks["lung_left"] | masks["lung_right"], left | right) >= 0.9
    assert dice(masks["bone"], np.isin(labels, BONE)) >= 0.8


def test_real_ct_bowel_gas_is_not_lung(real_ct: tuple[Volume, np.ndarray, dict[str, np.ndarray]]) -> None:
    volume, labels, masks = real_ct
    lungs = masks["lung_left"] | masks["lung_right"]
    true_lungs = np.isin(labels, LUNG_LEFT + LUNG_RIGHT)
    bowel_gas = np.isin(labels, BOWEL) & (volume.array < -400)
    assert np.count_nonzero(bowel_gas) > 1000  # the case really contains large gas pockets
    assert not (lungs & np.isin(labels, BOWEL)).any()
    # Air inside the body, away from the true lungs (bowel gas and anything else) must not be lung.
    near_lungs = ndi.binary_dilation(true_lungs, iterations=2)
    stray_air = masks["body"] & (volume.array < -400) & ~near_lungs
    assert np.count_nonzero(stray_air) > 1000
    assert not (lungs & stray_air).any()


def test_real_ct_left_right_follow_patient_geometry(real_ct: tuple[Volume, np.ndarray, dict[str, np.ndarray]]) -> None:
    volume, _, masks = real_ct
    x = lambda mask: (np.argwhere(mask).mean(axis=0) @ volume.affine[:3, :3].T + volume.affine[:3, 3])[0]  # noqa: E731
    assert x(masks["lung_left"]) > 0 > x(masks["lung_right"])  # LPS: patient left is +x


def test_real_ct_flipped_array_gives_same_masks(real_ct: tuple[Volume, np.ndarray, dict[str, np.ndarray]]) -> None:
    """Reversing the column axis (and saying so in the geometry) must not swap left and right."""
    volume, _, masks = real_ct
    row = -np.asarray(volume.orientation[:3])
    n_cols = volume.shape[2]
    positions = volume.positions + (n_cols - 1) * volume.spacing[2] * np.asarray(volume.orientation[:3])
    flipped = Volume(np.ascontiguousarray(volume.array[:, :, ::-1]), volume.spacing, positions,
                     (*row, *volume.orientation[3:]))  # type: ignore[arg-type]
    result = {s.structure.key: s.mask[:, :, ::-1] for s in segment_ct_tissues(flipped)}
    for key in ("lung_left", "lung_right"):
        assert dice(result[key], masks[key]) > 0.98


def test_no_body_raises() -> None:
    air = np.full((20, 64, 64), -1000, dtype=np.float32)
    volume = Volume(air, (2.0, 1.0, 1.0), np.stack([np.zeros(20), np.zeros(20), np.arange(20) * 2.0], 1),
                    (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    with pytest.raises(SegmentationError, match="no body"):
        segment_ct_tissues(volume)


def test_sagittal_volume_rejected() -> None:
    array = np.zeros((20, 64, 64), dtype=np.float32)
    volume = Volume(array, (2.0, 1.0, 1.0), np.stack([np.arange(20) * 2.0, np.zeros(20), np.zeros(20)], 1),
                    (0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    with pytest.raises(SegmentationError, match="axial"):
        segment_ct_tissues(volume)


def test_structures_are_coded() -> None:
    codes = {k: (s.category.value, s.property_type.value, s.laterality.value if s.laterality else None)
             for k, s in CT_TISSUE_STRUCTURES.items()}
    assert codes == {
        "body": ("91723000", "38266002", None),
        "lung_left": ("91723000", "39607008", "7771000"),
        "lung_right": ("91723000", "39607008", "24028007"),
        "bone": ("85756007", "3138006", None),
        "adipose_tissue": ("85756007", "55603005", None),
        "skeletal_muscle": ("85756007", "127954009", None),
    }
    assert len({s.color_rgb for s in CT_TISSUE_STRUCTURES.values()}) == len(CT_TISSUE_STRUCTURES)
