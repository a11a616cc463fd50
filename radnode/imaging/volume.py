"""A reconstructed image volume and its geometry in DICOM patient coordinates (LPS)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from pydicom import Dataset


@dataclass
class Volume:
    """Voxels indexed ``[slice, row, column]`` with the geometry needed to map them back to the source.

    ``source`` holds the source slices' datasets (pixel data dropped) in array order, so writers can
    reference each frame's SOP instance and position exactly.
    """

    array: np.ndarray | None
    """(n_slices, rows, columns), rescale applied: int16 Hounsfield units for a CT with whole-number rescale
    (as stored, two bytes a voxel), float32 otherwise. None in :meth:`geometry`'s copy."""
    spacing: tuple[float, float, float]
    """(slice spacing, row spacing, column spacing) in mm; slice spacing measured from positions."""
    positions: np.ndarray
    """(n_slices, 3) ImagePositionPatient of each slice, in array order."""
    orientation: tuple[float, float, float, float, float, float]
    """ImageOrientationPatient: row direction cosines then column direction cosines."""
    source: list[Dataset] = field(default_factory=list)
    modality: str = "CT"
    grid_shape: tuple[int, int, int] = (0, 0, 0)
    """The voxel grid's shape, kept when the voxels are dropped (set from ``array``)."""

    def __post_init__(self) -> None:
        if self.array is not None:
            self.grid_shape = tuple(self.array.shape)  # type: ignore[assignment]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid_shape

    def geometry(self) -> "Volume":
        """This volume without its voxels, for the steps after the last that reads them: writers reference
        slices, positions and spacing, never values, and the pixels (315 MB for a 600-slice CT) can go as
        soon as the last reader is done with the volume."""
        return replace(self, array=None)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (mm³ / 1000)."""
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def slice_direction(self) -> np.ndarray:
        """Unit normal of the slices (row × column direction)."""
        row = np.asarray(self.orientation[:3], dtype=float)
        col = np.asarray(self.orientation[3:], dtype=float)
        return np.cross(row, col)

    @property
    def affine(self) -> np.ndarray:
        """4×4 map from voxel index (slice, row, column, 1) to LPS millimetres."""
        row = np.asarray(self.orientation[:3], dtype=float)
        col = np.asarray(self.orientation[3:], dtype=float)
        a = np.eye(4)
        step = (self.positions[-1] - self.positions[0]) / max(len(self.positions) - 1, 1)
        a[:3, 0] = step if len(self.positions) > 1 else self.slice_direction * self.spacing[0]
        a[:3, 1] = col * self.spacing[1]
        a[:3, 2] = row * self.spacing[2]
        a[:3, 3] = self.positions[0]
        return a

    @property
    def study(self) -> Dataset:
        """A source dataset carrying the patient/study attributes (the first slice)."""
        return self.source[0]
