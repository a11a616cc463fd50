"""Series reading, selection and volume building on the real TotalSegmentator CT series."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from factories import write_study
from radnode.imaging.series import (
    InputError, Series, VolumeCriteria, build_volume, load_volume, max_volume_bytes, read_study_folder,
)

CT = VolumeCriteria()


def test_volume_is_ordered_along_the_normal_whatever_the_file_order(real_ct_folder: Path, tmp_path: Path) -> None:
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    files = sorted(real_ct_folder.iterdir())
    rng = np.random.default_rng(1)
    for i, src in enumerate(rng.permutation(files)):
        shutil.copy(src, shuffled / f"{i:03d}.dcm")
    volume, skipped = load_volume(shuffled, CT)
    assert skipped == []
    assert volume.shape == (20, 512, 512)
    z = volume.positions[:, 2]
    assert np.all(np.diff(z) > 0)
    # every slice of the array is the pixel data of the dataset whose position it claims
    for k in (0, 7, 19):
        ds = pydicom.dcmread(next(p for p in files if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                                  == volume.source[k].SOPInstanceUID))
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(volume.array[k], expected)
        np.testing.assert_allclose(volume.positions[k], [float(v) for v in ds.ImagePositionPatient])
    assert volume.spacing[0] == pytest.approx(float(np.median(np.diff(z))))
    assert "PixelData" not in volume.source[0]
    # the affine maps voxel (k, 0, 0) to the slice's position
    np.testing.assert_allclose(volume.affine @ [19, 0, 0, 1], [*volume.positions[19], 1])
    assert volume.array.min() >= -1024 and volume.array.max() > 1000  # HU, bone present


def test_missing_slice_is_refused_with_where(real_ct_folder: Path) -> None:
    files = sorted(real_ct_folder.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    files[10].unlink()
    with pytest.raises(InputError, match=r"1 slice\(s\) missing between"):
        load_volume(real_ct_folder, CT)


def test_duplicated_slice_is_refused(real_ct_folder: Path) -> None:
    ds = pydicom.dcmread(sorted(real_ct_folder.iterdir())[5])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(real_ct_folder / "duplicate.dcm")
    with pytest.raises(InputError, match="duplicated slice position"):
        load_volume(real_ct_folder, CT)


def test_corrupt_file_is_named(real_ct_folder: Path) -> None:
    victim = sorted(real_ct_folder.iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:700])
    with pytest.raises(InputError, match=victim.name):
        load_volume(real_ct_folder, CT)


def test_non_image_object_alone_is_not_a_volume(tmp_path: Path) -> None:
    shutil.copy(get_testdata_file("test-SR.dcm"), tmp_path / "sr.dcm")
    with pytest.raises(InputError, match="no usable CT volume.*modality SR"):
        load_volume(tmp_path, CT)


def test_other_series_are_skipped_with_reasons(real_ct_folder: Path) -> None:
    localizer = pydicom.dcmread(sorted(real_ct_folder.iterdir())[0])
    sr = pydicom.dcmread(get_testdata_file("test-SR.dcm"))  # the same patient's SR: identity is not the point here
    sr.PatientID, sr.PatientName, sr.IssuerOfPatientID = localizer.PatientID, localizer.PatientName, \
        localizer.get("IssuerOfPatientID", "")
    sr.save_as(real_ct_folder / "sr.dcm")
    localizer.SeriesInstanceUID = pydicom.uid.generate_uid()
    localizer.SOPInstanceUID = pydicom.uid.generate_uid()
    localizer.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    localizer.SeriesNumber = 1
    localizer.save_as(real_ct_folder / "scout.dcm")
    volume, skipped = load_volume(real_ct_folder, CT)
    assert volume.shape[0] == 20
    assert any("localizer" in s for s in skipped) and any("modality SR" in s for s in skipped)


def test_too_few_slices_and_empty_folder(real_ct_folder: Path, tmp_path: Path) -> None:
    for p in sorted(real_ct_folder.iterdir())[:15]:
        p.unlink()
    with pytest.raises(InputError, match="5 slices, at least 10"):
        load_volume(real_ct_folder, CT)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no files"):
        read_study_folder(empty)


@pytest.mark.parametrize(("keyword", "value", "named"), [
    ("PixelSpacing", ["0", "0.7"], "PixelSpacing 0/0.7 out of range"),
    ("PixelSpacing", ["NaN", "0.7"], "PixelSpacing nan/0.7 is not finite"),
    ("RescaleSlope", "1e30", "RescaleSlope 1e+30 out of range"),
    ("ImageOrientationPatient", ["0", "0", "0", "0", "0", "0"], "ImageOrientationPatient 0/0/0/0/0/0 is not"),
])
def test_an_implausible_header_in_the_series_is_refused_naming_the_attribute(
        tmp_path: Path, keyword: str, value: object, named: str) -> None:
    """The loader checks what it reads again (a spool file indexed before the ingest checks existed, or a
    folder given to `radnode run`): the series is refused with the attribute and the file, never computed on."""
    folder = tmp_path / "study"
    paths = write_study(folder, n=12)
    ds = pydicom.dcmread(paths[5])
    setattr(ds, keyword, value)
    ds.save_as(paths[5], enforce_file_format=False)
    with pytest.raises(InputError, match=re.escape(named)) as refused:
        load_volume(folder, VolumeCriteria(min_slices=10))
    assert paths[5].name in str(refused.value)


def test_a_volume_larger_than_memory_is_refused_before_it_is_allocated(tmp_path: Path) -> None:
    """Headers that pass one by one (64 MiB per 4096² slice) but make a volume past half the machine's
    memory: refused naming Rows and Columns, nothing allocated."""
    slices = max_volume_bytes() // (4096 * 4096 * 4) + 1
    header = pydicom.dcmread(write_study(tmp_path / "one", n=1)[0], stop_before_pixels=True)
    header.Rows = header.Columns = 4096
    datasets = []
    for k in range(slices):
        ds = pydicom.Dataset()
        ds.update(header)
        ds.ImagePositionPatient = [0, 0, 2.5 * k]
        datasets.append(ds)
    with pytest.raises(InputError, match=r"Rows 4096 × Columns 4096 × \d+ slices make a .* GiB volume"):
        build_volume(Series("1.2.3", datasets, [tmp_path / f"{k}.dcm" for k in range(slices)]))
