"""Operators that turn a folder of DICOM files into the volume a pipeline needs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from holoscan.core import ExecutionContext, InputContext, Operator, OperatorSpec, OutputContext

from radnode.execution import timed_phase
from radnode.imaging.series import Series, VolumeCriteria, build_volume, read_study_folder, select_volume_series

log = logging.getLogger(__name__)


class StudyFolderLoaderOperator(Operator):
    """Reads every DICOM file of a study folder, grouped by series (unreadable files are kept as reasons)."""

    def __init__(self, fragment, *args, input_folder: Path, **kwargs):
        self.input_folder = Path(input_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("study")

    @timed_phase("load")
    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        study = read_study_folder(self.input_folder)
        log.info("read %d series from %s", len(study.series), self.input_folder)
        op_output.emit(study, "study")


class VolumeSeriesSelectorOperator(Operator):
    """Chooses the one series to process by explicit criteria and logs why every other one was skipped."""

    def __init__(self, fragment, *args, criteria: VolumeCriteria,
                 series_check: Callable[[Series], str | None] | None = None, **kwargs):
        """``series_check``: why a usable volume series is still not wanted, or None (see select_volume_series)."""
        self.criteria = criteria
        self.series_check = series_check
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study")
        spec.output("series")

    @timed_phase("select_series")
    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        series, skipped = select_volume_series(op_input.receive("study"), self.criteria, self.series_check)
        log.info("selected %s", series.describe())
        for reason in skipped:
            log.info("skipped %s", reason)
        op_output.emit(series, "series")


class SeriesToVolumeOperator(Operator):
    """Stacks the selected series into a Volume in patient space (rescaled pixel values)."""

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("series")
        spec.output("volume")

    @timed_phase("build_volume")
    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        volume = build_volume(op_input.receive("series"))
        log.info("volume %s voxels, spacing %s mm", "x".join(map(str, volume.shape)),
                 "x".join(f"{s:.3g}" for s in volume.spacing))
        op_output.emit(volume, "volume")
