"""A synthetic chest CT phantom as a real DICOM series, with its true masks and a PipelineResult.

The phantom is geometric (body ellipse, subcutaneous fat ring, two lungs with an emphysema patch,
spine, paraspinal muscle), so every mask is known exactly and every measurement is computed from the
loaded volume. Slices are numbered head to feet (InstanceNumber 1 is the most superior slice), the
opposite of the volume's array order, as many scanners do. Reusable by any test needing a CT series.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radnode.imaging.series import CT_IMAGE_STORAGE
from radnode.imaging.volume import Volume
from radnode.results import Measurement, PipelineResult, Segment, Structure

PATIENT = {"PatientName": "Phantom^Chest", "PatientID": "PHANTOM001", "PatientBirthDate": "19600521",
           "PatientSex": "F"}
ACCESSION = "ACC20240001"
STUDY_DATE, STUDY_TIME = "20240312", "101500"
SLICE_SPACING_MM = 2.5
FIELD_OF_VIEW_MM = 448.0

_ANATOMY = CodedConcept.from_code(codes.SCT.AnatomicalStructure)
_TISSUE = CodedConcept.from_code(codes.SCT.Tissue)
STRUCTURES: dict[str, Structure] = {
    s.key: s for s in (
        Structure("body", "Body", _ANATOMY, CodedConcept.from_code(codes.SCT.EntireBody), None, (177, 122, 101)),
        Structure("lung_left", "Left lung", _ANATOMY, CodedConcept.from_code(codes.SCT.Lung),
                  CodedConcept.from_code(codes.SCT.Left), (128, 174, 128)),
        Structure("lung_right", "Right lung", _ANATOMY, CodedConcept.from_code(codes.SCT.Lung),
                  CodedConcept.from_code(codes.SCT.Right), (111, 184, 210)),
        Structure("adipose_tissue", "Subcutaneous fat", _TISSUE, CodedConcept.from_code(codes.SCT.AdiposeTissue),
                  None, (230, 220, 70)),
        Structure("bone", "Spine", _TISSUE, CodedConcept.from_code(codes.SCT.BoneTissue), None, (241, 214, 145)),
        Structure("skeletal_muscle", "Paraspinal muscle", _TISSUE, CodedConcept.from_code(codes.SCT.SkeletalMuscle),
                  None, (192, 104, 88)),
    )
}
"""The phantom's structures in SEG segment order (6 segments, overlapping: body contains the others)."""

VOLUME = CodedConcept.from_code(codes.SCT.Volume)
ATTENUATION = CodedConcept.from_code(codes.DCM.AttenuationCoefficient)
MEAN = CodedConcept.from_code(codes.SCT.Mean)
MILLILITER = CodedConcept("mL", "UCUM", "milliliter")
HOUNSFIELD = CodedConcept.from_code(codes.UCUM.HounsfieldUnit)
PERCENT = CodedConcept.from_code(codes.UCUM.Percent)
LAA950 = CodedConcept("LAA950", "99RADNODE", "Lung fraction below -950 HU")
"""A private-scheme (99*) concept, as pipelines use where no standard code exists."""


def phantom_masks(n_slices: int, rows: int, columns: int) -> dict[str, np.ndarray]:
    """True masks of every structure, ``[slice, row, column]`` with slice 0 the most inferior."""
    v, u = np.meshgrid(np.linspace(-1, 1, rows), np.linspace(-1, 1, columns), indexing="ij")
    z = np.linspace(0, 1, n_slices)[:, None, None]
    every_slice = np.ones((n_slices, 1, 1), dtype=bool)
    body = every_slice & ((u / 0.8) ** 2 + (v / 0.6) ** 2 <= 1)
    inner = every_slice & ((u / 0.7) ** 2 + (v / 0.5) ** 2 <= 1)
    in_chest = z >= 0.25  # lungs start a quarter up: the lower slices have no lung frames
    lung_right = in_chest & (((u + 0.35) / 0.25) ** 2 + ((v + 0.05) / 0.35) ** 2 <= 1)  # patient right = −x
    lung_left = in_chest & (((u - 0.35) / 0.25) ** 2 + ((v + 0.05) / 0.35) ** 2 <= 1)
    bone = every_slice & (u ** 2 + (v - 0.32) ** 2 <= 0.1 ** 2)
    muscle = every_slice & (u ** 2 + (v - 0.32) ** 2 <= 0.2 ** 2) & ~bone
    return {"body": body, "lung_left": lung_left, "lung_right": lung_right, "adipose_tissue": body & ~inner,
            "bone": bone, "skeletal_muscle": muscle}


def _emphysema(masks: dict[str, np.ndarray]) -> np.ndarray:
    """A low-attenuation patch in the upper half of the left lung."""
    upper = np.zeros_like(masks["lung_left"])
    upper[upper.shape[0] * 2 // 3:] = True
    rows = masks["lung_left"].shape[1]
    upper[:, : rows // 2] = False
    return masks["lung_left"] & upper


def phantom_hounsfield(masks: dict[str, np.ndarray], seed: int = 0) -> np.ndarray:
    """CT numbers of the phantom with scanner-like noise (σ 10 HU), int16."""
    hu = np.full(masks["body"].shape, -1000.0)
    for key, value in (("body", 40), ("adipose_tissue", -100), ("skeletal_muscle", 55), ("bone", 700),
                       ("lung_left", -850), ("lung_right", -850)):
        hu[masks[key]] = value
    hu[_emphysema(masks)] = -975
    hu += np.random.default_rng(seed).normal(0, 10, hu.shape)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def make_ct_series(n_slices: int = 40, rows: int = 64, columns: int = 64, *, seed: int = 0) -> list[Dataset]:
    """The phantom as single-frame CT Image Storage datasets with pixel data, in InstanceNumber order."""
    masks = phantom_masks(n_slices, rows, columns)
    stored = (phantom_hounsfield(masks, seed) + 1024).astype(np.uint16)  # Rescale Intercept −1024
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    spacing = FIELD_OF_VIEW_MM / columns, FIELD_OF_VIEW_MM / rows
    z0 = -300.0
    datasets = []
    for instance_number, k in enumerate(reversed(range(n_slices)), start=1):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = STUDY_DATE
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = STUDY_TIME
        ds.AccessionNumber = ACCESSION
        ds.Modality = "CT"
        ds.Manufacturer = "Phantom Scanners"
        ds.ManufacturerModelName = "Geometric CT"
        ds.InstitutionName = "Radnode Test Hospital"
        ds.ReferringPhysicianName = "Referrer^Rita"
        ds.StudyDescription = "CT CHEST WITHOUT CONTRAST"
        ds.SeriesDescription = "Chest 2.5mm"
        for keyword, value in PATIENT.items():
            setattr(ds, keyword, value)
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = SLICE_SPACING_MM
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyID, ds.SeriesNumber, ds.AcquisitionNumber, ds.InstanceNumber = "1", 3, 1, instance_number
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.ImagePositionPatient = [-FIELD_OF_VIEW_MM / 2 + spacing[0] / 2, -FIELD_OF_VIEW_MM / 2 + spacing[1] / 2,
                                   z0 + k * SLICE_SPACING_MM]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = z0 + k * SLICE_SPACING_MM
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = stored[k].tobytes()
        datasets.append(ds)
    return datasets


def write_series(datasets: list[Dataset], folder: Path) -> list[Path]:
    """Write each dataset as a DICOM file named by its SOP Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def phantom_result(volume: Volume, algorithm_name: str = "radnode test phantom",
                   algorithm_version: str = "1.0") -> PipelineResult:
    """Segments (the true masks) and measurements computed from ``volume`` the way a pipeline would.

    Every structure gets its volume (mL) and mean attenuation (HU); lungs also the percentage of
    voxels below −950 HU.
    """
    masks = phantom_masks(*volume.shape)
    segments = [Segment(STRUCTURES[key], masks[key]) for key in STRUCTURES]
    measurements = []
    for segment in segments:
        key, mask = segment.structure.key, segment.mask
        values = volume.array[mask]
        measurements.append(Measurement(key, VOLUME, float(mask.sum()) * volume.voxel_volume_ml, MILLILITER))
        measurements.append(Measurement(key, ATTENUATION, float(values.mean()), HOUNSFIELD, MEAN))
        if key.startswith("lung_"):
            measurements.append(Measurement(key, LAA950, 100.0 * float((values < -950).mean()), PERCENT))
    return PipelineResult(segments, measurements, algorithm_name, algorithm_version)
