"""Synthetic CT phantom: truth consistent with the HU image, and a DICOM series that dciodvfy accepts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from radnode.phantom import CTPhantom, make_ct_phantom, write_ct_series

KEYS = {"body", "lung_left", "lung_right", "bone", "adipose_tissue", "skeletal_muscle"}


@pytest.fixture(scope="module")
def small() -> CTPhantom:
    return make_ct_phantom(n_slices=120, size=192, seed=3)


def test_truth_masks_match_hu(small: CTPhantom) -> None:
    hu, truth = small.hu, small.truth
    assert hu.dtype == np.int16 and set(truth) == KEYS
    assert all(mask.shape == hu.shape and mask.dtype == bool for mask in truth.values())
    for key in KEYS - {"body"}:
        assert truth[key].any(), key
        assert not (truth[key] & ~truth["body"]).any(), key
    assert abs(np.median(hu[truth["adipose_tissue"]]) + 100) < 5
    assert 40 <= np.median(hu[truth["skeletal_muscle"]]) <= 50
    assert np.median(hu[truth["bone"]]) >= 300
    lungs = truth["lung_left"] | truth["lung_right"]
    assert -880 < np.median(hu[lungs]) < -820
    assert (hu[lungs] < -950).mean() > 0.005  # emphysema blobs
    assert np.median(hu[~truth["body"] & (np.arange(hu.shape[1]) < 20)[None, :, None]]) < -950
    noise = hu[truth["adipose_tissue"]].std()
    assert 8 < noise < 20


def test_lungs_lie_on_patient_sides_and_gas_outside_lungs(small: CTPhantom) -> None:
    columns = np.arange(small.hu.shape[2])
    x = small.positions[0, 0] + columns * small.spacing[2]  # IOP row direction is +x (patient left)
    assert np.all(x[np.nonzero(small.truth["lung_left"].any(axis=(0, 1)))] > 0)
    assert np.all(x[np.nonzero(small.truth["lung_right"].any(axis=(0, 1)))] < 0)
    gas = small.truth["body"] & (small.hu < -980) & ~(small.truth["lung_left"] | small.truth["lung_right"])
    assert np.count_nonzero(gas) > 1000  # airways and bowel gas exist and are not lung


def test_seed_reproducible() -> None:
    a, b = make_ct_phantom(30, 128, seed=7), make_ct_phantom(30, 128, seed=7)
    assert np.array_equal(a.hu, b.hu)
    assert not np.array_equal(a.hu, make_ct_phantom(30, 128, seed=8).hu)


def test_series_round_trip(small: CTPhantom, tmp_path: Path) -> None:
    paths = write_ct_series(small, tmp_path, shuffle=True, accession="ACC42")
    assert len(paths) == small.hu.shape[0]
    datasets = [pydicom.dcmread(p) for p in paths]
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, len(datasets) + 1))
    ds = datasets[5]
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.AccessionNumber == "ACC42" and ds.Modality == "CT"
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(hu, small.hu[5])
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx(list(small.spacing[1:]))


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_series_passes_dciodvfy(small: CTPhantom, tmp_path: Path) -> None:
    paths = sorted(write_ct_series(small, tmp_path))
    for path in (paths[0], paths[len(paths) // 2]):
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        report = result.stdout + result.stderr
        assert "CT Image" in report or "CTImage" in report, report
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert errors == [], report
