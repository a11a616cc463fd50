"""Largest cross-sections: outlines that enclose exactly a region's pixels, and the SR groups built from them.

The outline is checked by rasterising it back (even-odd rule at pixel centres) and by its area; the SR's
cross-section groups are read back from a written file and compared with the masks they came from.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from factories import STRUCTURES, phantom_result, write_chest_phantom
from radnode.imaging.series import VolumeCriteria, load_volume
from radnode.outputs.algorithm import AlgorithmInfo
from radnode.outputs.contour import largest_cross_section, outline, polygon_area
from radnode.outputs.seg import build_segmentation
from radnode.outputs.sr import CROSS_SECTION_TRACKING_PREFIX, build_measurement_report, read_measurements
from radnode.results import Segment
from support.geometry import inside_outline

FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def largest_region(image: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(image, structure=FOUR_CONNECTED)
    return labels == np.argmax(np.bincount(labels.ravel(), minlength=n + 1)[1:]) + 1


def test_outline_encloses_exactly_the_region_holes_and_touching_corners_included() -> None:
    rng = np.random.default_rng(7)
    checked = 0
    for n in range(200):
        image = rng.random((32, 32)) > rng.uniform(0.3, 0.6)  # dense noise: holes, corners touching diagonally
        if n % 2:
            image = ndimage.binary_opening(image)
        if not image.any():
            continue
        region = largest_region(image)
        points = outline(region)
        assert (points[0] == points[-1]).all()
        assert polygon_area(points) == region.sum()
        assert (inside_outline(points, region.shape) == region).all()
        checked += 1
    assert checked > 150


def test_ring_is_outlined_with_its_hole_cut_out() -> None:
    ring = np.zeros((24, 24), dtype=bool)
    ring[2:22, 2:22] = True
    ring[6:18, 6:18] = False
    points = outline(ring)
    assert polygon_area(points) == ring.sum() == 400 - 144
    assert (inside_outline(points, ring.shape) == ring).all()
    # Straight runs are merged: the square ring needs its 8 corners and the two ends of the cut, twice.
    assert len(points) - 1 <= 12


def test_largest_cross_section_is_the_largest_region_on_any_slice() -> None:
    mask = np.zeros((4, 20, 20), dtype=bool)
    mask[0, 1:5, 1:5] = True                      # 16
    mask[1, 1:6, 1:6] = True                      # 25, the slice with the most pixels holds two regions
    mask[1, 10:19, 10:14] = True                  # 36
    mask[2, 2:9, 2:9] = True                      # 49: the largest single region
    section = largest_cross_section(Segment(STRUCTURES["bone"], mask))
    assert section is not None
    assert section.slice_index == 2 and section.area_pixels == 49
    assert (inside_outline(section.points, mask.shape[1:]) == mask[2]).all()
    assert largest_cross_section(Segment(STRUCTURES["bone"], np.zeros((3, 8, 8), dtype=bool))) is None
    labels = np.where(mask, 2, 0).astype(np.uint8)  # the same regions as one value of a label map
    shared = largest_cross_section(Segment(STRUCTURES["bone"], labels, 2))
    assert shared is not None and shared.slice_index == 2 and np.array_equal(shared.points, section.points)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory):
    """The chest phantom's SEG and SR, written and read back."""
    folder = tmp_path_factory.mktemp("ct")
    write_chest_phantom(folder)
    volume, _ = load_volume(folder, VolumeCriteria())
    result = phantom_result(volume)
    algorithm = AlgorithmInfo(name="radnode test phantom", version="1.0")
    seg = build_segmentation(volume, result.segments, algorithm, uid_root="1.2.826.0.1.3680043.8.498.")
    sr = build_measurement_report(volume, seg, result, algorithm, uid_root="1.2.826.0.1.3680043.8.498.")
    out = tmp_path_factory.mktemp("out") / "sr.dcm"
    sr.save_as(out)
    return volume, result, seg, pydicom.dcmread(out)


def _groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    imaging = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    return list(imaging.ContentSequence)


def _item(group: pydicom.Dataset, code_value: str) -> pydicom.Dataset:
    return next(i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code_value)


def test_sr_has_a_cross_section_before_each_volumetric_group(report) -> None:
    volume, result, seg, sr = report
    groups = _groups(sr)
    assert len(groups) == 2 * len(result.segments)
    masks = {s.structure.key: s.mask for s in result.segments}
    by_uid = {str(i.SOPInstanceUID): z for z, i in enumerate(volume.source)}
    for cross, volumetric, segment in zip(groups[::2], groups[1::2], seg.SegmentSequence):
        key = str(segment.TrackingID)
        assert _item(cross, "112039").TextValue == CROSS_SECTION_TRACKING_PREFIX + key  # Tracking Identifier
        assert _item(volumetric, "112039").TextValue == key
        assert _item(cross, "112040").UID == _item(volumetric, "112040").UID == segment.TrackingUID
        assert cross.ContentTemplateSequence[0].TemplateIdentifier == "1501"
        assert _item(cross, "121106").TextValue == STRUCTURES[key].label  # Comment: the viewer's label
        area = _item(cross, "42798000")
        assert area.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "mm2"
        scoord = next(i for i in area.ContentSequence if i.ValueType == "SCOORD")
        assert scoord.RelationshipType == "INFERRED FROM" and scoord.GraphicType == "POLYLINE"
        z = by_uid[str(scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)]
        points = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)
        # The outline is the largest region of that segment on any slice, on the slice it names.
        region = largest_region(masks[key][z])
        assert region.sum() == max(largest_region(s).sum() for s in masks[key] if s.any())
        assert (inside_outline(points, region.shape) == region).all()
        expected = round(region.sum() * volume.spacing[1] * volume.spacing[2], 1)
        assert float(area.MeasuredValueSequence[0].NumericValue) == pytest.approx(expected, abs=0.05)


def test_cross_sections_leave_the_measurements_read_back_unchanged(report) -> None:
    _, result, _, sr = report
    rows = read_measurements(sr)
    assert len(rows) == len(result.measurements)
    assert {row["concept"]["value"] for row in rows} == {m.name.value for m in result.measurements}


def test_a_segment_without_voxels_or_measurements_gets_no_group(report, tmp_path: Path) -> None:
    volume, shared, _, _ = report
    result = copy.deepcopy(shared)
    empty_key = result.segments[1].structure.key
    result.segments[1].mask = np.zeros_like(result.segments[1].mask)
    result.measurements = [m for m in result.measurements if m.structure_key != empty_key]
    algorithm = AlgorithmInfo(name="radnode test phantom", version="1.0")
    seg = build_segmentation(volume, result.segments, algorithm, uid_root="1.2.826.0.1.3680043.8.498.")
    sr = build_measurement_report(volume, seg, result, algorithm, uid_root="1.2.826.0.1.3680043.8.498.")
    sr.save_as(tmp_path / "sr.dcm")
    groups = _groups(pydicom.dcmread(tmp_path / "sr.dcm"))
    identifiers = [_item(g, "112039").TextValue for g in groups]
    assert len(groups) == 2 * (len(result.segments) - 1)
    assert not any(i.endswith(empty_key) for i in identifiers)
