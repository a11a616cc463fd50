"""The pipelines' SEG writer: its frames encoded in a child process beside the SR and report writers.

The SEG it writes must be the one the in-process writer made before (frames byte for byte, checked against a
digest recorded with the previous writer), valid for dciodvfy and dcmqi, and the header it passes on at once
must say what the written file says; a child that fails must fail the run with its reason.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pydicom
import pytest

from support.dicom_tools import dciodvfy_errors
from support.validators import dcmqi
from radnode.execution import RunState, run_in_child, run_state
from radnode.imaging.ct_tissue import segment_ct_tissues
from radnode.imaging.series import VolumeCriteria, load_volume
from radnode.imaging.volume import Volume
from radnode.operators.result_writers import write_segmentation
from radnode.outputs.algorithm import AlgorithmInfo
from radnode.outputs.seg import HEADER_KEYWORDS, build_segmentation, plan_segmentation, segmentation_header
from radnode.phantom import make_ct_phantom, write_ct_series
from radnode.results import PipelineResult, Segment

UID_ROOT = "1.2.826.0.1.3680043.8.498."
ALGORITHM = AlgorithmInfo("radnode test phantom", "1.0")
PREVIOUS_WRITER_PIXEL_DATA_SHA256 = "7f2440e71bba5c719c0520c641f163e344961f7c05a9a99958fdb8df28462900"
"""SHA-256 of the Pixel Data of ``build_segmentation`` on ct_tissue's segments of ``make_ct_phantom(40, 128,
seed=0)``, recorded with the in-process writer of commit 4854992 (160 frames), before the SEG moved to a child."""
PREVIOUS_WRITER_FRAMES = 160


class _Run:
    """What an operator's ``fragment`` is to the writer: the application object its run state hangs on."""


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Volume, list[Segment]]:
    folder = tmp_path_factory.mktemp("ct")
    write_ct_series(make_ct_phantom(40, 128, seed=0), folder)
    volume, skipped = load_volume(folder, VolumeCriteria())
    assert skipped == []
    return volume, segment_ct_tissues(volume)


def _write_like_the_pipeline(volume: Volume, segments: list[Segment], out: Path) -> tuple[pydicom.Dataset, RunState]:
    """The SEG writer's compute, as the pipeline runs it: header passed on, the file from the child, joined."""
    run = _Run()
    header = write_segmentation(run, volume, PipelineResult(segments, [], ALGORITHM.name, ALGORITHM.version), out, ALGORITHM,
                                UID_ROOT)
    state = run_state(run)
    assert len(state.children) == 1, "the SEG was not written in a child process"
    state.join_children()
    return header, state


def test_the_child_writes_the_previous_writers_frames_and_a_valid_seg(
        phantom: tuple[Volume, list[Segment]], tmp_path: Path) -> None:
    volume, segments = phantom
    header, state = _write_like_the_pipeline(volume, segments, tmp_path)
    written = pydicom.dcmread(tmp_path / "seg.dcm")
    assert int(written.NumberOfFrames) == PREVIOUS_WRITER_FRAMES
    assert hashlib.sha256(written.PixelData).hexdigest() == PREVIOUS_WRITER_PIXEL_DATA_SHA256
    phase = state.phases["write_seg"]
    assert phase.seconds > 0 and phase.cpu_seconds > 0 and phase.peak_rss_bytes > 0
    for keyword in HEADER_KEYWORDS:
        assert header[keyword].value == written[keyword].value, keyword
    assert [(int(i.SegmentNumber), str(i.TrackingID), str(i.TrackingUID)) for i in header.SegmentSequence] == \
        [(int(i.SegmentNumber), str(i.TrackingID), str(i.TrackingUID)) for i in written.SegmentSequence]
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []
    (tmp_path / "dcmqi").mkdir()
    dcmqi("segimage2itkimage", "--inputDICOM", str(tmp_path / "seg.dcm"), "--outputDirectory",
          str(tmp_path / "dcmqi"), "--outputType", "nii")
    assert list((tmp_path / "dcmqi").glob("*.nii*"))


def test_the_child_writes_what_the_in_process_writer_writes_from_the_same_plan(
        phantom: tuple[Volume, list[Segment]], tmp_path: Path) -> None:
    volume, segments = phantom
    plan = plan_segmentation(volume, segments, ALGORITHM, uid_root=UID_ROOT)
    build_segmentation(volume, segments, ALGORITHM, uid_root=UID_ROOT, plan=plan).save_as(tmp_path / "here.dcm")
    run = _Run()
    run_in_child(run, "write_seg", lambda: build_segmentation(volume, segments, ALGORITHM, uid_root=UID_ROOT,
                                                              plan=plan).save_as(tmp_path / "child.dcm"))
    run_state(run).join_children()
    here, child = (pydicom.dcmread(tmp_path / name) for name in ("here.dcm", "child.dcm"))
    # made anew on every build: the clock (dates, times, ContributionDateTime) and highdicom's Dimension
    # Organization UID
    fresh = {"ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime",
             "ContributingEquipmentSequence", "DimensionOrganizationSequence", "DimensionIndexSequence"}
    assert {e.keyword for e in here} == {e.keyword for e in child}
    assert [e.keyword for e in here if e.keyword not in fresh and e.value != child[e.tag].value] == []
    header = segmentation_header(volume, plan)
    assert all(header[k].value == here[k].value for k in HEADER_KEYWORDS)


def test_a_failing_child_fails_the_run_with_its_reason() -> None:
    run = _Run()

    def fail() -> None:
        raise ValueError("no frames for you")

    run_in_child(run, "write_seg", fail)
    with pytest.raises(RuntimeError, match="write_seg failed: ValueError: no frames for you"):
        run_state(run).join_children()

    run_in_child(run, "write_seg", lambda: os.kill(os.getpid(), 9))
    with pytest.raises(RuntimeError, match="write_seg .* killed by signal 9"):
        run_state(run).join_children()


def test_with_one_cpu_the_phase_runs_in_the_job_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run, pids = _Run(), []
    run_in_child(run, "write_seg", lambda: pids.append(os.getpid()))
    assert pids == [os.getpid()] and run_state(run).children == []
    assert "write_seg" in run_state(run).phases
