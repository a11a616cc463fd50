"""Shared fixtures: real reference data fetched from PyPI packages (never from elsewhere)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "testdata"
TOTALSEG_VERSION = "2.18.0"


def _totalseg_reference_dir() -> Path:
    """Unpack tests/reference_files of the TotalSegmentator sdist (real CT + ground truth) once."""
    target = CACHE / f"totalsegmentator-{TOTALSEG_VERSION}" / "reference_files"
    if target.is_dir():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"totalsegmentator-{TOTALSEG_VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             f"totalsegmentator=={TOTALSEG_VERSION}", "-d", str(CACHE)],
            check=True,
        )
    prefix = f"totalsegmentator-{TOTALSEG_VERSION}/tests/reference_files/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(f"totalsegmentator-{TOTALSEG_VERSION}/tests/"):]
        tar.extractall(CACHE / f"totalsegmentator-{TOTALSEG_VERSION}", members=members, filter="data")
    return target


@pytest.fixture(scope="session")
def totalseg_reference() -> Path:
    """Folder with example_ct_dicom/, example_ct_sm.nii.gz, example_seg.nii.gz, … (real CT, real labels)."""
    return _totalseg_reference_dir()


def restore_totalseg_dicom(reference: Path, target: Path, *, patient_id: str = "TS0001",
                           accession: str = "TSACC1") -> list[Path]:
    """Write the real TotalSegmentator CT series with the UIDs its distribution stripped put back.

    Study/Series/SOP Instance UIDs and SOP Class UID are empty in the shipped files (only the file
    meta keeps the SOP UIDs); a PACS would refuse them, so they are restored as a sender would have them.
    Every call makes a new study: fresh Study, Series and SOP Instance UIDs.
    """
    import pydicom
    from pydicom.uid import generate_uid

    target.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    written = []
    for src in sorted((reference / "example_ct_dicom").iterdir()):
        ds = pydicom.dcmread(src)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientID, ds.PatientName, ds.AccessionNumber = patient_id, "Totalseg^Example", accession
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 2, ds.get("InstanceNumber") or len(written) + 1
        out = target / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(out, enforce_file_format=True)
        written.append(out)
    return written


@pytest.fixture
def real_ct_folder(totalseg_reference: Path, tmp_path: Path) -> Path:
    """A folder holding the real 20-slice CT series (JPEG 2000 lossless) with its UIDs restored."""
    folder = tmp_path / "real_ct"
    restore_totalseg_dicom(totalseg_reference, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_unet():
    """The small UNet of ``test_models`` trained briefly on synthetic CT (about 7 s, once per session)."""
    from test_models import train_tiny_unet

    return train_tiny_unet()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_unet) -> Path:
    """That network as a MONAI bundle folder (metadata, inference config, state dict), as a site would have it."""
    from test_models import write_bundle

    return write_bundle(tmp_path_factory.mktemp("models") / "tiny_bundle", tiny_unet)
