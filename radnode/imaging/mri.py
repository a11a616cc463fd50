"""MR helpers: choosing the 3D T1-weighted series of a brain study, and writing a volume as an MR series.

A brain MR study holds many series (localizers, T2, FLAIR, diffusion, a 3D T1). The brain pipeline
needs the 3D T1; :func:`select_t1_series` picks it from the acquisition attributes (MR Acquisition Type,
echo and repetition times, scanning sequence) and says for every other series why it was skipped.
:func:`write_mr_series` writes a volume as an MR Image Storage series (tests, demos, benchmarks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

from radnode.imaging.series import (
    MR_IMAGE_STORAGE,
    InputError,
    Series,
    StudyInput,
    VolumeCriteria,
    check_series,
)
from radnode.imaging.synthetic import SeriesIdentity, write_image_series
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
    pixels = volume.array - float(volume.array.min())
    scale = 65535.0 / float(pixels.max()) if pixels.max() > 65535 else 1.0
    dz, dy, dx = volume.spacing
    identity = SeriesIdentity(
        patient_id=patient_id, patient_name=patient_name, accession=accession,
        study_uid=study_uid or generate_uid(prefix=uid_root), series_uid=generate_uid(prefix=uid_root),
        frame_of_reference_uid=frame_of_reference_uid or generate_uid(prefix=uid_root),
        study_description="MR brain", series_description=series_description, series_number=series_number,
        body_part="HEAD", model_name="Synthetic MR writer")
    mr_attributes: dict[str, object] = {
        "ProtocolName": series_description, "ScanningSequence": list(scanning_sequence),
        "SequenceVariant": ["SK", "SP", "MP"] if "IR" in scanning_sequence else ["SP"], "ScanOptions": "",
        "MRAcquisitionType": acquisition_type, "SliceThickness": f"{dz:g}", "SpacingBetweenSlices": f"{dz:g}",
        "RepetitionTime": f"{repetition_time_ms:g}", "EchoTime": f"{echo_time_ms:g}", "EchoTrainLength": 1,
        "MagneticFieldStrength": "3", "ImagingFrequency": "123.2", "ImagedNucleus": "1H"}
    if inversion_time_ms is not None:
        mr_attributes["InversionTime"] = f"{inversion_time_ms:g}"
    paths = write_image_series(
        np.rint(pixels * scale).astype(np.uint16), volume.positions, volume.orientation, (dy, dx), out_dir,
        sop_class_uid=MR_IMAGE_STORAGE, modality="MR", image_type=["ORIGINAL", "PRIMARY", "M", "NONE"],
        identity=identity, modality_attributes=mr_attributes, uid_root=uid_root,
        file_name=lambda index, sop_uid: f"MR{series_number:03d}_{index + 1:04d}.dcm")
    return paths
