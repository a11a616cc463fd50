"""Reading a folder of DICOM files, choosing the series a pipeline needs, and building its volume.

Every rejection carries a reason a person can act on ("series 3: 2 slices missing between z=−120.0
and z=−130.0"), because the job log is where a PACS administrator looks when no result came back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pydicom.pixels
from pydicom import Dataset
from pydicom.filereader import read_deferred_data_element
from pydicom.uid import UID

from radnode.imaging.identity import PatientIdentityError, check_one_patient
from radnode.imaging.plausibility import implausible
from radnode.imaging.volume import Volume

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")


DEFER_BYTES = 4096
"""Values larger than this (pixel data above all) are read from the file when used, not when it is read."""
PIXEL_DATA = 0x7FE00010
IMAGE_PIXEL_KEYWORDS = ("SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "Rows", "Columns",
                        "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "NumberOfFrames",
                        "ExtendedOffsetTable", "ExtendedOffsetTableLengths")
"""What decoding pixel data needs besides the transfer syntax (Image Pixel module)."""
INT16 = np.iinfo(np.int16)


class InputError(ValueError):
    """The input cannot be used by the pipeline; the message says what was wrong and where."""


@dataclass
class Series:
    """The instances of one series as read from disk, headers and pixels."""

    uid: str
    datasets: list[Dataset]
    paths: list[Path]

    @property
    def first(self) -> Dataset:
        return self.datasets[0]

    @property
    def modality(self) -> str:
        return str(self.first.get("Modality", ""))

    def describe(self) -> str:
        """Short human name: number, description, modality and instance count."""
        number = self.first.get("SeriesNumber", "?")
        text = str(self.first.get("SeriesDescription", "")).strip()
        label = f"series {number}" + (f" '{text}'" if text else "")
        return f"{label} ({self.modality}, {len(self.datasets)} instances)"


@dataclass
class StudyInput:
    """All readable series of a study folder plus the files that could not be read."""

    series: list[Series]
    unreadable: list[str] = field(default_factory=list)


def read_study_folder(folder: str | Path) -> StudyInput:
    """Read every DICOM file under ``folder`` (recursively), grouped by SeriesInstanceUID.

    Files that are not DICOM, are truncated or lack the identifying UIDs are listed in
    ``unreadable`` with the reason, never silently dropped. A folder whose series belong to more than one
    patient (or disagree on who the patient is) is refused with both identities named. Pixel data and other
    large values are left on disk (read when used: :func:`build_volume` decodes one slice at a time), so a
    study's headers, not its pixels, are what stays in memory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    groups: dict[str, Series] = {}
    unreadable: list[str] = []
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    for path in files:
        if path.name in {"DICOMDIR"}:
            continue
        try:
            ds = pydicom.dcmread(path, defer_size=DEFER_BYTES)
        except RecursionError:
            unreadable.append(f"{path.name}: not a readable DICOM file (sequences nested too deep)")
            continue
        except Exception as e:  # pydicom and the codecs raise many types (zlib.error, struct.error, ...): name it
            unreadable.append(f"{path.name}: not a readable DICOM file ({type(e).__name__}: {str(e)[:120]})")
            continue
        series_uid = ds.get("SeriesInstanceUID")
        if not series_uid or not ds.get("SOPInstanceUID"):
            unreadable.append(f"{path.name}: no SeriesInstanceUID/SOPInstanceUID")
            continue
        groups.setdefault(str(series_uid), Series(str(series_uid), [], [])).datasets.append(ds)
        groups[str(series_uid)].paths.append(path)
    if not groups and not unreadable:
        raise InputError(f"{folder}: no files")
    try:
        check_one_patient((s.describe(), s.first) for s in groups.values())
    except PatientIdentityError as e:
        raise InputError(f"{folder}: {e}") from None
    return StudyInput(series=list(groups.values()), unreadable=unreadable)


@dataclass(frozen=True)
class VolumeCriteria:
    """What makes a series usable as a 3D volume for a pipeline."""

    modality: str = "CT"
    sop_classes: tuple[str, ...] = (CT_IMAGE_STORAGE,)
    min_slices: int = 10
    require_axial: bool = True
    max_obliquity_degrees: float = 10.0
    spacing_tolerance: float = 0.1
    """Largest allowed relative deviation of a slice gap from the median gap."""


def _normal(ds: Dataset) -> np.ndarray:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    return np.cross(iop[:3], iop[3:])


def check_series(series: Series, criteria: VolumeCriteria) -> str | None:
    """Return why ``series`` cannot be used as a volume, or None when it can."""
    name = series.describe()
    if series.modality != criteria.modality:
        return f"{name}: modality {series.modality or 'missing'}, pipeline needs {criteria.modality}"
    sop_classes = {str(ds.get("SOPClassUID", "")) for ds in series.datasets}
    if not sop_classes <= set(criteria.sop_classes):
        names = ", ".join(sorted(UID(s).name for s in sop_classes))
        return f"{name}: not an image volume ({names})"
    image_types = {str(v).upper() for ds in series.datasets for v in ds.get("ImageType", [])}
    if "LOCALIZER" in image_types:
        return f"{name}: localizer (ImageType LOCALIZER)"
    n = len(series.datasets)
    if n < criteria.min_slices:
        return f"{name}: {n} slices, at least {criteria.min_slices} needed for a volume"
    for keyword in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "PixelData"):
        lacking = sum(1 for ds in series.datasets if keyword not in ds)
        if lacking:
            return f"{name}: {lacking} instance(s) without {keyword}"
    for ds, path in zip(series.datasets, series.paths):
        if (problem := implausible(ds, series.modality)) is not None:
            return f"{name}: {path.name}: {problem}"
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in series.datasets}
    if len(shapes) > 1:
        return f"{name}: slices of different sizes {sorted(shapes)}"
    orientations = np.array([ds.ImageOrientationPatient for ds in series.datasets], dtype=float)
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        return f"{name}: slices with different orientations"
    normal = _normal(series.first)
    if criteria.require_axial:
        tilt = np.degrees(np.arccos(min(1.0, abs(normal[2]))))
        if tilt > criteria.max_obliquity_degrees:
            return f"{name}: not axial (slice normal {tilt:.0f}° from the patient's long axis)"
    return _spacing_problem(series, normal, criteria.spacing_tolerance)


def _spacing_problem(series: Series, normal: np.ndarray, tolerance: float) -> str | None:
    """Find duplicated, missing or irregular slices from positions along the slice normal."""
    name = series.describe()
    z = np.sort(np.array([np.dot(normal, np.asarray(ds.ImagePositionPatient, float)) for ds in series.datasets]))
    gaps = np.diff(z)
    duplicates = int(np.sum(gaps < 1e-3))
    if duplicates:
        where = z[1:][gaps < 1e-3][0]
        return f"{name}: {duplicates} duplicated slice position(s) (first at {where:.2f} mm along the slice normal)"
    step = float(np.median(gaps))
    deviation = np.abs(gaps - step) / step
    if deviation.max() > tolerance:
        i = int(np.argmax(deviation))
        missing = int(round(gaps[i] / step)) - 1
        if missing >= 1:
            return (f"{name}: {missing} slice(s) missing between {z[i]:.2f} and {z[i + 1]:.2f} mm "
                    f"(regular spacing {step:.2f} mm)")
        return f"{name}: non-uniform slice spacing ({gaps.min():.2f} to {gaps.max():.2f} mm)"
    return None


def select_volume_series(study: StudyInput, criteria: VolumeCriteria,
                         series_check: Callable[[Series], str | None] | None = None) -> tuple[Series, list[str]]:
    """Pick the series to process and say why each other one was skipped.

    ``series_check`` (optional) says why a series that is a usable volume is still not the one wanted (e.g. a
    model's ``input.series`` condition), or None. Among usable series the one with most slices wins, then the
    thinnest slices. Raises InputError listing every rejection when none is usable.
    """
    if study.unreadable:
        raise InputError("unreadable input: " + "; ".join(study.unreadable))
    usable: list[Series] = []
    skipped: list[str] = []
    for series in study.series:
        problem = check_series(series, criteria) or (series_check(series) if series_check else None)
        (skipped.append(problem) if problem else usable.append(series))
    if not usable:
        raise InputError(f"no usable {criteria.modality} volume: " + "; ".join(skipped))
    usable.sort(key=lambda s: (-len(s.datasets), float(s.first.get("SliceThickness", 0) or 0)))
    chosen, others = usable[0], usable[1:]
    skipped += [f"{s.describe()}: usable, but {chosen.describe()} has more or thinner slices" for s in others]
    return chosen, skipped


def _temporal_vr(tag: int) -> bool:
    """Whether a public attribute is a date, time or date-time (by the data dictionary, without decoding it)."""
    try:
        return pydicom.datadict.dictionary_VR(tag) in ("DA", "TM", "DT")
    except KeyError:  # private or unknown: not copied into created objects' date fields
        return False


def _valid_temporal(elem: pydicom.DataElement) -> bool:
    """Whether a DA/TM/DT element parses (writers copy these into the objects they create)."""
    try:
        for value in (elem.value if elem.VM > 1 else [elem.value]):
            if value not in (None, ""):
                {"DA": pydicom.valuerep.DA, "TM": pydicom.valuerep.TM, "DT": pydicom.valuerep.DT}[elem.VR](str(value))
    except (ValueError, TypeError):
        return False
    return True


def _header(ds: Dataset) -> Dataset:
    """A copy of the dataset without pixel data, for writers that reference the source (the pixel data,
    possibly still on disk, is never read). A date or time that is not one (a Study Date of "2024136") is
    emptied: the results are still written, with that attribute empty, and the run's warnings say so (see
    :class:`radnode.imaging.identity.StudyIdentity`)."""
    header = Dataset()
    for tag in ds.keys():
        if tag != PIXEL_DATA:
            raw = ds.get_item(tag, keep_deferred=True)  # copied as read (decoded when used), unless still on disk
            elem = ds[tag] if getattr(raw, "value", b"") is None else raw
            if _temporal_vr(tag) and not _valid_temporal(ds[tag]):
                elem = pydicom.DataElement(tag, ds[tag].VR, "")
            header[tag] = elem
    header.file_meta = getattr(ds, "file_meta", Dataset())
    return header


def _pixels(series: Series, index: int) -> np.ndarray:
    """The decoded pixels of one instance. Pixel data left on disk by :func:`read_study_folder` is read
    into a throw-away dataset with the Image Pixel attributes, never into the series' own (which keeps
    only headers); pixel data already in the dataset is decoded from there."""
    ds = series.datasets[index]
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    try:
        if raw is not None and getattr(raw, "value", b"") is None:  # still on disk
            source = Dataset()
            source.file_meta = ds.file_meta
            for keyword in IMAGE_PIXEL_KEYWORDS:
                if keyword in ds:
                    source[keyword] = ds[keyword]
            source[PIXEL_DATA] = read_deferred_data_element(open, str(series.paths[index]), None, raw)
            ds = source
        return pydicom.pixels.pixel_array(ds)
    except Exception as e:  # decoders raise many types; name the file either way
        raise InputError(f"{series.paths[index].name}: pixel data cannot be decoded "
                         f"({type(e).__name__}: {e})") from None


def _rescale(ds: Dataset) -> tuple[float, float]:
    return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)


def max_volume_bytes() -> int:
    """The largest volume :func:`build_volume` allocates: half the machine's physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError):
        return 16 * 2**30


def build_volume(series: Series) -> Volume:
    """Stack a checked series into a Volume ordered along the slice normal, pixels rescaled.

    A CT whose Rescale Slope/Intercept are whole numbers becomes int16 Hounsfield units (two bytes a voxel,
    as the scanner stored them); anything else float32 after Rescale Slope/Intercept. Slices are decoded one
    at a time into the volume. Raises InputError naming the file when pixel data cannot be decoded.
    """
    normal = _normal(series.first)
    order = sorted(range(len(series.datasets)),
                   key=lambda i: float(np.dot(normal, np.asarray(series.datasets[i].ImagePositionPatient, float))))
    first = series.datasets[order[0]]
    rows, cols = int(first.Rows), int(first.Columns)
    size = len(order) * rows * cols * np.dtype(np.float32).itemsize
    if size > max_volume_bytes():
        raise InputError(f"{series.describe()}: Rows {rows} × Columns {cols} × {len(order)} slices make a "
                         f"{size / 2**30:.1f} GiB volume, more than the {max_volume_bytes() / 2**30:.1f} GiB this "
                         "machine can hold (half its memory)")
    whole = series.modality == "CT" and all(v.is_integer() for ds in series.datasets for v in _rescale(ds))
    array = _stack(series, order, np.int16 if whole else np.float32)
    if array is None:  # a slice's HU beyond int16
        array = _stack(series, order, np.float32)
    positions = np.array([series.datasets[i].ImagePositionPatient for i in order], dtype=float)
    z = positions @ normal
    slice_spacing = float(np.median(np.diff(z))) if len(z) > 1 else float(first.get("SliceThickness", 1.0))
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    return Volume(
        array=array,
        spacing=(slice_spacing, row_spacing, col_spacing),
        positions=positions,
        orientation=tuple(float(v) for v in first.ImageOrientationPatient),  # type: ignore[arg-type]
        source=[_header(series.datasets[i]) for i in order],
        modality=series.modality,
    )


def _stack(series: Series, order: list[int], dtype: type) -> np.ndarray | None:
    """The rescaled slices in ``order`` as one ``dtype`` array; None when an int16 slice would overflow."""
    first = series.datasets[order[0]]
    rows, cols = int(first.Rows), int(first.Columns)
    array = np.empty((len(order), rows, cols), dtype=dtype)
    for k, i in enumerate(order):
        pixels = _pixels(series, i)
        if pixels.shape != (rows, cols):
            raise InputError(f"{series.paths[i].name}: pixel data of shape {pixels.shape}, expected {(rows, cols)}")
        slope, intercept = _rescale(series.datasets[i])
        if dtype is np.int16:
            ends = [int(v) * int(slope) + int(intercept) for v in (pixels.min(initial=0), pixels.max(initial=0))]
            if min(ends) < INT16.min or max(ends) > INT16.max:
                return None
            # int16 arithmetic wraps, but the result fits, so it comes out exact
            np.multiply(pixels, int(slope), out=array[k], casting="unsafe")
            array[k] += np.int16(intercept)
        else:
            np.multiply(pixels, slope, out=array[k], casting="unsafe")
            array[k] += intercept
    return array


def load_volume(folder: str | Path, criteria: VolumeCriteria) -> tuple[Volume, list[str]]:
    """Read a study folder, select the volume series and build it; returns the skip reasons too."""
    study = read_study_folder(folder)
    series, skipped = select_volume_series(study, criteria)
    return build_volume(series), skipped


def iter_files(paths: Iterable[Path]) -> Iterable[Path]:
    """Every file under the given files or folders."""
    for p in paths:
        if p.is_dir():
            yield from (q for q in sorted(p.rglob("*")) if q.is_file())
        elif p.is_file():
            yield p
