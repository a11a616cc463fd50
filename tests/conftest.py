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
