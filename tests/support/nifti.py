"""Load a NIfTI image (RAS+ world) as a radnode Volume (DICOM LPS), for tests against NIfTI ground truth."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from radnode.imaging.volume import Volume

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def nifti_to_volume(path: Path) -> Volume:
    """Volume whose ``[slice, row, column]`` are the NIfTI ``[k, j, i]`` axes, geometry converted RAS→LPS.

    The voxel order is kept (no resampling, no flipping): the orientation and positions carry the
    geometry, so the result can be compared voxel-for-voxel with a label map loaded by :func:`nifti_labels`.
    """
    image = nib.load(str(path))
    affine = image.affine
    data = np.asarray(image.dataobj, dtype=np.float32).transpose(2, 1, 0)
    linear = _RAS_TO_LPS @ affine[:3, :3]
    origin = _RAS_TO_LPS @ affine[:3, 3]
    steps = np.linalg.norm(linear, axis=0)  # mm per step along i, j, k
    row_cosines = linear[:, 0] / steps[0]
    column_cosines = linear[:, 1] / steps[1]
    positions = origin[None, :] + np.arange(data.shape[0])[:, None] * linear[:, 2][None, :]
    return Volume(
        array=np.ascontiguousarray(data),
        spacing=(float(steps[2]), float(steps[1]), float(steps[0])),
        positions=positions,
        orientation=tuple(float(v) for v in (*row_cosines, *column_cosines)),  # type: ignore[arg-type]
    )


def nifti_labels(path: Path) -> np.ndarray:
    """Integer label map in the same ``[k, j, i]`` order as :func:`nifti_to_volume`."""
    return np.ascontiguousarray(np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0))
