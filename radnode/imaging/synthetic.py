"""Writing a synthetic image volume as a DICOM series: the one place the demo's and tests' series are made.

Each slice becomes one Explicit VR Little Endian file with the patient, study, series, frame of reference,
equipment, image plane and image pixel modules filled; the modality's own attributes (CT rescale and KVP,
MR echo/repetition times, …) come from the caller.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid


@dataclass(frozen=True)
class SeriesIdentity:
    """Who and what a synthetic series is: patient, study and series attributes."""

    patient_id: str
    patient_name: str
    accession: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    study_description: str
    series_description: str
    series_number: int
    body_part: str
    model_name: str


def write_image_series(
    pixels: np.ndarray,
    positions: np.ndarray,
    orientation: tuple[float, ...],
    pixel_spacing: tuple[float, float],
    out_dir: Path,
    *,
    sop_class_uid: str,
    modality: str,
    image_type: list[str],
    identity: SeriesIdentity,
    modality_attributes: dict[str, Any],
    uid_root: str,
    file_name: Callable[[int, str], str],
) -> list[Path]:
    """Write ``pixels`` (int16 or uint16, [slice, row, column]) as one file per slice, in slice order.

    ``file_name(index, sop_instance_uid)`` names each file; the returned paths are in slice order.
    """
    if pixels.dtype not in (np.int16, np.uint16):
        raise ValueError(f"pixels must be int16 or uint16, got {pixels.dtype}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now()
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    paths: list[Path] = []
    for index in range(pixels.shape[0]):
        sop_uid = generate_uid(prefix=uid_root)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class_uid
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = image_type
        ds.SOPClassUID = sop_class_uid
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = now.strftime("%H%M%S")
        ds.AccessionNumber = identity.accession
        ds.Modality = modality
        ds.Manufacturer = "radnode"
        ds.ManufacturerModelName = identity.model_name
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = identity.study_description
        ds.SeriesDescription = identity.series_description
        ds.PatientName = identity.patient_name
        ds.PatientID = identity.patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = identity.body_part
        ds.PatientPosition = "HFS"
        for keyword, value in modality_attributes.items():
            setattr(ds, keyword, value)
        ds.StudyInstanceUID = identity.study_uid
        ds.SeriesInstanceUID = identity.series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = identity.series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in positions[index]]
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
        ds.FrameOfReferenceUID = identity.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{float(np.dot(normal, positions[index])):.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape[1], pixels.shape[2]
        ds.PixelSpacing = [f"{pixel_spacing[0]:.10g}", f"{pixel_spacing[1]:.10g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
        ds.PixelData = np.ascontiguousarray(pixels[index]).astype(pixels.dtype.newbyteorder("<")).tobytes()
        path = out_dir / file_name(index, sop_uid)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
