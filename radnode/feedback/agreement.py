"""How far a clinician's correction is from the node's segmentation, per segment: the figures a quality
committee reads (Dice, volume difference in mL and %, 95th-percentile Hausdorff distance in mm).

Dice and HD95 are MONAI's (``monai.metrics.compute_dice`` and ``compute_hausdorff_distance`` with
``percentile=95``, symmetric, on the masks' surface voxels at the voxel spacing), so the figures are the ones
the MONAI community reports. The node's segment is the prediction, the correction the reference.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class SegmentAgreement:
    """One segment of the node's SEG beside the clinician's segment of the same coded property type."""

    segment: str
    """The node's Segment Label."""
    property_type: str
    """The coded property type both share, as ``SCHEME VALUE (meaning)`` plus any modifier."""
    result_segment_number: int
    correction_segment_number: int
    dice: float
    result_volume_ml: float
    corrected_volume_ml: float
    volume_difference_ml: float
    """Corrected minus the node's."""
    volume_difference_percent: float | None
    """``volume_difference_ml`` over the node's volume, in percent (None when the node's segment is empty)."""
    hd95_mm: float | None
    """Symmetric 95th-percentile surface distance (None when either segment is empty)."""
    uncertainty: dict[str, float] = field(default_factory=dict)
    """The node's uncertainty scores of its segment, by concept code (``UNC-MEAN``, ``UNC-BOUNDARY``,
    ``UNC-AGREEMENT``: ``radnode.uncertainty``), from the run's manifest; empty when the pipeline scores none."""

    def to_record(self) -> dict[str, object]:
        """As the job store keeps it (JSON by field name)."""
        return asdict(self)


def monai_metrics():  # type: ignore[no-untyped-def]
    """``monai.metrics``, imported without the stack-size warning Holoscan prints when MONAI imports it: the node
    process runs no Holoscan graph (jobs run in their own processes, under ``ulimit -s`` as documented)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Current stack size", category=RuntimeWarning)
        import monai.metrics
    return monai.metrics


def measure(result: np.ndarray, corrected: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, float | None]:
    """Dice, both volumes, their difference and HD95 of two boolean masks on one grid with voxel ``spacing``
    (mm, in the masks' axis order)."""
    import torch

    metrics = monai_metrics()
    compute_dice, compute_hausdorff_distance = metrics.compute_dice, metrics.compute_hausdorff_distance

    if result.shape != corrected.shape:
        raise ValueError(f"masks of shape {result.shape} and {corrected.shape} are not on one grid")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    result_ml = float(np.count_nonzero(result)) * voxel_ml
    corrected_ml = float(np.count_nonzero(corrected)) * voxel_ml
    prediction = torch.from_numpy(np.ascontiguousarray(result, dtype=bool))[None, None].float()
    reference = torch.from_numpy(np.ascontiguousarray(corrected, dtype=bool))[None, None].float()
    dice = float(compute_dice(prediction, reference, include_background=True, ignore_empty=False)[0, 0])
    hd95: float | None = None
    if result.any() and corrected.any():
        hd95 = float(compute_hausdorff_distance(prediction, reference, include_background=True, percentile=95,
                                                spacing=list(spacing))[0, 0])
    difference = corrected_ml - result_ml
    return {"dice": dice, "result_volume_ml": result_ml, "corrected_volume_ml": corrected_ml,
            "volume_difference_ml": difference,
            "volume_difference_percent": 100.0 * difference / result_ml if result_ml else None, "hd95_mm": hd95}
