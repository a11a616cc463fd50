"""MR helpers: choosing the 3D T1-weighted series of a brain study, and writing a volume as an MR series.

A brain MR study holds many series (localizers, T2, FLAIR, diffusion, a 3D T1). The brain pipeline
needs the 3D T1; :func:`select_t1_series` picks it from the acquisition attributes (MR Acquisition Type,
echo and repetition times, scanning sequence) and says for every other series why it was skipped.
:func:`write_mr_series` writes a volume as an MR Image Storage series (tests, demos, benchmarks).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, PYDICOM_ROOT_UID, ExplicitVRLittleEndian, generate_uid

from radnode.imaging.series import (
    MR_IMAGE_STORAGE,
    InputError,
    Series,
    StudyInput,
    VolumeCriteria,
    check_series,
)
from radnode.imaging.volume import Volume

MR_VOLUME_CRITERIA = VolumeCriteria(modality="MR", sop_classes=(MR_IMAGE_STORAGE,), min_slices=64,
                                    require_axial=False)
"""A 3D T1 is often acquired sagittal; any orientation is fine, the model sees a reoriented copy."""

T1_MAX_ECHO_TIME_MS = 15.0
"""T1-weighted gradient-echo (MPRAGE, SPGR, TFE) and spin-echo T1 use short TE; T2/PD/FLAIR use far longer."""
T1_MAX_REPETITION_TIME_MS = 3000.0
"""MPRAGE TR is up to about 2500 ms; T2-weighted and FLAIR sequences use longer TRs."""
T1_MAX_VOXEL_MM = 2.0
"""Largest voxel edge accepted: thicker slices are a 2D acquisition in disguise, too coarse for volumetry."""
_NON_T1_WORDS = ("FLAIR", "T2", "DWI", "DTI", "ADC", "SWI", "PD", "TOF", "BOLD", "PERF")


def _number(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def t1_problem(series: Series) -> str | None:
    """Why ``series`` is not a 3D T1-weighted acquisition, or None when it is one.

    Uses the MR Image module: MR Acquisition Type must be 3D, Scanning Sequence must not be echo-planar,
    TE and TR must be T1-short, and the description must not name another contrast.
    """
    ds = series.first
    name = series.describe()
    acquisition = str(ds.get("MRAcquisitionType", "") or "").upper()
    if acquisition != "3D":
        return f"{name}: MR Acquisition Type {acquisition or 'missing'}, a 3D acquisition is needed"
    sequence = {str(v).upper() for v in ds.get("ScanningSequence", []) or []}
    if "EP" in sequence:
        return f"{name}: echo-planar sequence (diffusion or functional), not a T1"
    echo_time = _number(ds, "EchoTime")
    if echo_time is None:
        return f"{name}: no Echo Time, cannot tell the weighting"
    if echo_time > T1_MAX_ECHO_TIME_MS:
        return f"{name}: Echo Time {echo_time:g} ms is not T1-weighted (at most {T1_MAX_ECHO_TIME_MS:g} ms)"
    repetition_time = _number(ds, "RepetitionTime")
    if repetition_time is not None and repetition_time > T1_MAX_REPETITION_TIME_MS:
        return (f"{name}: Repetition Time {repetition_time:g} ms is not T1-weighted "
                f"(at most {T1_MAX_REPETITION_TIME_MS:g} ms)")
    words = f"{ds.get('SeriesDescription', '')} {ds.get('ProtocolName', '')}".upper().replace("_", " ").split()
    other = [w for w in _NON_T1_WORDS if w in words]
    if other:
        return f"{name}: description names {other[0]}, not a T1"
    thickness = _number(ds, "SliceThickness") or 0.0
    pixel = max(float(v) for v in ds.PixelSpacing) if "PixelSpacing" in ds else 0.0
    if max(thickness, pixel) > T1_MAX_VOXEL_MM:
        return f"{name}: voxels of {max(thickness, pixel):g} mm, at most {T1_MAX_VOXEL_MM:g} mm for brain volumetry"
    return None


def select_t1_series(study: StudyInput,
                     criteria: VolumeCriteria = MR_VOLUME_CRITERIA) -> tuple[Series, list[str]]:
    """The 3D T1-weighted series of a study, and why each other series was skipped.

    Among usable T1 series a non-contrast one wins (contrast changes the brain/CSF contrast the model
    saw in training), then the one with most slices, then the thinnest slices. Raises InputError
    listing every rejection when none is usable.
    """
    if study.unreadable:
        raise InputError("unreadable input: " + "; ".join(study.unreadable))
    usable: list[Series] = []
    skipped: list[str] = []
    for series in study.series:
        problem = check_series(series, criteria) or t1_problem(series)
        (skipped.append(problem) if problem else usable.append(series))
    if not usable:
        raise InputError("no usable 3D T1-weighted MR series: " + "; ".join(skipped))

    def rank(s: Series) -> tuple[bool, int, float]:
        return (bool(s.first.get("ContrastBolusAgent")), -len(s.datasets), _number(s.first, "SliceThickness") or 0.0)

    usable.sort(key=rank)
    chosen, others = usable[0], usable[1:]
    skipped += [f"{s.describe()}: a 3D T1 too, but {chosen.describe()} is preferred "
                f"(non-contrast, more or thinner slices)" for s in others]
    return chosen, skipped


def nifti_to_axial_volume(path: str | Path, modality: str = "MR") -> Volume:
    """A NIfTI image as an axial Volume in DICOM's usual layout: slices foot→head, rows anterior→posterior,
    columns right→left (LPS). Axes are permuted and flipped only, never resampled."""
    import nibabel as nib  # test and benchmark inputs only; the node itself reads DICOM

    image = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(image.dataobj, dtype=np.float32)  # RAS+ voxel axes: i toward right, j anterior, k superior
    lps = np.diag([-1.0, -1.0, 1.0]) @ image.affine[:3, :]
    # Columns toward patient left (LPS +x) = RAS −x: flip i; rows toward posterior (LPS +y): flip j.
    array = np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0))
    nx, ny, nz = data.shape
    zooms = np.linalg.norm(image.affine[:3, :3], axis=0)
    origin = lps @ np.array([nx - 1, ny - 1, 0, 1.0])
    step_z = lps[:, 2]
    positions = origin[None, :] + np.arange(nz)[:, None] * step_z[None, :]
    row_cosines = -lps[:, 0] / zooms[0]
    column_cosines = -lps[:, 1] / zooms[1]
    return Volume(array=array, spacing=(float(zooms[2]), float(zooms[1]), float(zooms[0])), positions=positions,
                  orientation=tuple(float(v) for v in (*row_cosines, *column_cosines)),  # type: ignore[arg-type]
                  modality=modality)


def write_mr_series(
    volume: Volume,
    out_dir: str | Path,
    *,
    series_description: str = "T1 MPRAGE 3D",
    series_number: int = 3,
    echo_time_ms: float = 3.0,
    repetition_time_ms: float = 2300.0,
    inversion_time_ms: float | None = 900.0,
    acquisition_type: str = "3D",
    scanning_sequence: tuple[str, ...] = ("GR", "IR"),
    patient_id: str = "MRBRAIN001",
    patient_name: str = "Brain^Phantom",
    accession: str = "ACCMR001",
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    uid_root: str = PYDICOM_ROOT_UID,
) -> list[Path]:
    """Write ``volume`` as an MR Image Storage series, one Explicit VR Little Endian file per slice.

    Intensities are stored as unsigned 16-bit after shifting the minimum to 0 (and scaling down only if
    they exceed 16 bits): MR intensities have no physical unit.
    The acquisition attributes (TE, TR, TI, MR Acquisition Type, Scanning Sequence) are those a T1
    selector reads, so tests can build multi-series studies with T1, T2, FLAIR-like series.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now()
    study_uid = study_uid or generate_uid(prefix=uid_root)
    series_uid = generate_uid(prefix=uid_root)
    frame_uid = frame_of_reference_uid or generate_uid(prefix=uid_root)
    pixels = volume.array - float(volume.array.min())
    scale = 65535.0 / float(pixels.max()) if pixels.max() > 65535 else 1.0
    stored = np.rint(pixels * scale).astype("<u2")
    dz, dy, dx = volume.spacing
    normal = volume.slice_direction
    paths: list[Path] = []
    for index in range(volume.shape[0]):
        sop_uid = generate_uid(prefix=uid_root)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = now.strftime("%H%M%S")
        ds.AccessionNumber = accession
        ds.Modality = "MR"
        ds.Manufacturer = "radnode"
        ds.ManufacturerModelName = "Synthetic MR writer"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "MR brain"
        ds.SeriesDescription = series_description
        ds.ProtocolName = series_description
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "HEAD"
        ds.PatientPosition = "HFS"
        ds.ScanningSequence = list(scanning_sequence)
        ds.SequenceVariant = ["SK", "SP", "MP"] if "IR" in scanning_sequence else ["SP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = acquisition_type
        ds.SliceThickness = f"{dz:g}"
        ds.SpacingBetweenSlices = f"{dz:g}"
        ds.RepetitionTime = f"{repetition_time_ms:g}"
        ds.EchoTime = f"{echo_time_ms:g}"
        if inversion_time_ms is not None:
            ds.InversionTime = f"{inversion_time_ms:g}"
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = "3"
        ds.ImagingFrequency = "123.2"
        ds.ImagedNucleus = "1H"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in volume.positions[index]]
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in volume.orientation]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{float(np.dot(normal, volume.positions[index])):.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.PixelSpacing = [f"{dy:.10g}", f"{dx:.10g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(stored[index]).tobytes()
        path = out_dir / f"MR{series_number:03d}_{index + 1:04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
