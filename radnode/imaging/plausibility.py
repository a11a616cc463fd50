"""Physically implausible image attributes, found from the header before anything large is allocated.

A header is data a sender controls. Trusted blindly, ``RescaleSlope 1e30`` becomes a delivered report of
−2.9e31 HU, ``PixelSpacing 0`` a division by zero deep in a pipeline, and ``Rows 65535`` a 384 GiB
allocation. :func:`implausible` reads only header attributes (ingest calls it on every instance with the tags
in :data:`PLAUSIBILITY_TAGS`; the series loader calls it again on what it reads) and names the attribute at
fault, so the refusal tells a PACS administrator what to fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

PLAUSIBILITY_TAGS = ["RescaleSlope", "RescaleIntercept", "PixelSpacing", "SliceThickness", "ImagePositionPatient",
                     "ImageOrientationPatient", "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel",
                     "BitsAllocated", "BitsStored"]
"""The header attributes :func:`implausible` checks."""

MAX_RESCALE_SLOPE = 1e4
"""|Rescale Slope| above this is refused (CT uses 1, PET and MR scalings stay far below)."""
MIN_RESCALE_SLOPE = 1e-9
"""|Rescale Slope| below this (zero included) collapses every pixel to the intercept: refused."""
MAX_RESCALE_INTERCEPT = 1e6
"""|Rescale Intercept| above this is refused (CT uses about −1024)."""
MAX_CT_VALUE = 1e5
"""A CT's rescaled values (Hounsfield units) must stay within ±this over the stored pixel range."""
MAX_PIXEL_SPACING_MM = 1e3
"""A pixel wider than a metre is not a medical image."""
MAX_PIXEL_BYTES = 4 * 2**30
"""Native pixel data of one instance above 4 GiB cannot be encoded (a 32-bit length) and is refused."""


def _numbers(value: Any) -> list[float] | None:
    """The value as a list of floats (one or several), None when absent; ValueError when not numeric."""
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
    return [float(v) for v in items]


def _integer(attributes: Mapping[str, Any], keyword: str) -> int | None:
    value = attributes.get(keyword)
    if value is None or value == "":
        return None
    return int(value)


def implausible(attributes: Mapping[str, Any] | Any, modality: str = "") -> str | None:
    """Why the header cannot describe a real image (naming the attribute and its value), or None.

    ``attributes`` is a pydicom Dataset or any mapping by keyword; absent attributes are not checked here
    (whether a pipeline needs them is the series loader's question).
    """
    try:
        return _check(attributes, modality or str(attributes.get("Modality", "") or ""))
    except (TypeError, ValueError, OverflowError) as e:
        return f"an image attribute is not a number ({type(e).__name__}: {e})"


def _check(ds: Mapping[str, Any] | Any, modality: str) -> str | None:
    for keyword in ("RescaleSlope", "RescaleIntercept", "PixelSpacing", "SliceThickness",
                    "ImagePositionPatient", "ImageOrientationPatient"):
        try:
            values = _numbers(ds.get(keyword))
        except (TypeError, ValueError):
            return f"{keyword} {ds.get(keyword)!r} is not a number"
        if values is not None and not all(math.isfinite(v) for v in values):
            return f"{keyword} {_show(values)} is not finite"
    slope = _numbers(ds.get("RescaleSlope"))
    if slope is not None:
        if len(slope) != 1 or not MIN_RESCALE_SLOPE <= abs(slope[0]) <= MAX_RESCALE_SLOPE:
            return f"RescaleSlope {_show(slope)} out of range (|slope| {MIN_RESCALE_SLOPE:g} to {MAX_RESCALE_SLOPE:g})"
    intercept = _numbers(ds.get("RescaleIntercept"))
    if intercept is not None and (len(intercept) != 1 or abs(intercept[0]) > MAX_RESCALE_INTERCEPT):
        return f"RescaleIntercept {_show(intercept)} out of range (|intercept| up to {MAX_RESCALE_INTERCEPT:g})"
    if modality == "CT" and (slope or intercept):
        bits = _integer(ds, "BitsStored") or 16
        top = (slope[0] if slope else 1.0) * (2 ** min(bits, 32)) + (intercept[0] if intercept else 0.0)
        bottom = -(abs(slope[0]) if slope else 1.0) * (2 ** min(bits, 32)) + (intercept[0] if intercept else 0.0)
        if abs(top) > MAX_CT_VALUE and abs(bottom) > MAX_CT_VALUE:
            return (f"RescaleSlope {_show(slope or [1.0])} / RescaleIntercept {_show(intercept or [0.0])} put every "
                    f"{bits}-bit CT value beyond ±{MAX_CT_VALUE:g} HU")
    spacing = _numbers(ds.get("PixelSpacing"))
    if spacing is not None:
        if len(spacing) != 2:
            return f"PixelSpacing {_show(spacing)} needs 2 values (row, column)"
        if not all(0 < v <= MAX_PIXEL_SPACING_MM for v in spacing):
            return f"PixelSpacing {_show(spacing)} out of range (each above 0 and up to {MAX_PIXEL_SPACING_MM:g} mm)"
    thickness = _numbers(ds.get("SliceThickness"))
    if thickness is not None and (len(thickness) != 1 or thickness[0] < 0):
        return f"SliceThickness {_show(thickness)} is negative"
    position = _numbers(ds.get("ImagePositionPatient"))
    if position is not None and len(position) != 3:
        return f"ImagePositionPatient {_show(position)} needs 3 values"
    orientation = _numbers(ds.get("ImageOrientationPatient"))
    if orientation is not None:
        if len(orientation) != 6:
            return f"ImageOrientationPatient {_show(orientation)} needs 6 values"
        row, col = orientation[:3], orientation[3:]
        if any(abs(math.hypot(*v) - 1) > 0.01 for v in (row, col)) or abs(sum(a * b for a, b in zip(row, col))) > 0.01:
            return f"ImageOrientationPatient {_show(orientation)} is not two orthogonal unit vectors"
    return _frame_problem(ds)


def _frame_problem(ds: Mapping[str, Any] | Any) -> str | None:
    """Rows, Columns and the bits that make the pixel data's size: positive, and allocatable."""
    rows, columns = _integer(ds, "Rows"), _integer(ds, "Columns")
    for keyword, value in (("Rows", rows), ("Columns", columns)):
        if value is not None and value <= 0:
            return f"{keyword} {value} must be positive"
    if rows is None or columns is None:
        return None
    frames, samples, bits = (_integer(ds, k) for k in ("NumberOfFrames", "SamplesPerPixel", "BitsAllocated"))
    frames = 1 if frames is None else frames
    samples = 1 if samples is None else samples
    bits = 16 if bits is None else bits
    if frames <= 0:
        return f"NumberOfFrames {frames} must be positive"
    if samples not in (1, 3, 4):
        return f"SamplesPerPixel {samples} is not 1, 3 or 4"
    if bits not in (1, 8, 16, 32, 64):
        return f"BitsAllocated {bits} is not 1, 8, 16, 32 or 64"
    size = rows * columns * frames * samples * bits // 8
    if size > MAX_PIXEL_BYTES:
        return (f"Rows {rows} × Columns {columns} × NumberOfFrames {frames} × SamplesPerPixel {samples} × "
                f"BitsAllocated {bits} make {size / 2**30:.1f} GiB of pixel data (at most "
                f"{MAX_PIXEL_BYTES / 2**30:g} GiB per instance)")
    return None


def native_size_problem(attributes: Mapping[str, Any] | Any, pixel_bytes: int) -> str | None:
    """For uncompressed pixel data of ``pixel_bytes`` (what the instance really holds): why it cannot hold the
    frames the header declares, or None."""
    try:
        rows, columns = _integer(attributes, "Rows"), _integer(attributes, "Columns")
        if rows is None or columns is None:
            return None
        frames = _integer(attributes, "NumberOfFrames") or 1
        samples = _integer(attributes, "SamplesPerPixel") or 1
        bits = _integer(attributes, "BitsAllocated") or 16
    except (TypeError, ValueError):
        return None
    expected = (rows * columns * frames * samples * bits + 7) // 8
    if pixel_bytes < expected:
        return (f"PixelData holds {pixel_bytes} bytes, Rows {rows} × Columns {columns} × NumberOfFrames {frames} × "
                f"BitsAllocated {bits} need {expected}")
    return None


def _show(values: list[float]) -> str:
    return "/".join(f"{v:g}" for v in values)  # not a backslash: the text goes into an LO ErrorComment
