"""The feedback loop: a clinician's corrected SEG comes back, is matched to its job and measured, never processed.

The node runs the real ct_tissue pipeline (``radnode run``) on a phantom CT received from DCMTK's storescu; the
correction is a new SEG written by highdicom from another creator (segments eroded and dilated by a few
voxels) and sent back with storescu. Its figures are checked against Dice, volumes and HD95 computed here
with numpy and scipy alone, on masks read here with pydicom alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from factories import seg_masks_by_source, write_chest_phantom, write_correction
from radnode.console.accounts import Role
from radnode.node.egress import outbox_dir
from radnode.node.service import Node
from radnode.node.store import JobState
from support.console import api_json, token_for
from support.dicom_tools import storescu
from support.node import final_job, node_config
from support.waiting import wait_until


def independent_agreement(result: np.ndarray, corrected: np.ndarray,
                          spacing: tuple[float, float, float]) -> dict[str, float]:
    """Dice, volumes (mL) and the symmetric 95th-percentile distance between the masks' surface voxels (a
    voxel of the mask with a background neighbour across a face), computed with numpy and scipy."""
    voxel_ml = float(np.prod(spacing)) / 1000

    def surface(mask: np.ndarray) -> np.ndarray:
        return mask & ~ndimage.binary_erosion(mask)

    def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return ndimage.distance_transform_edt(~surface(b), sampling=spacing)[surface(a)]

    both = np.count_nonzero(result & corrected)
    hd95 = max(np.percentile(distances(result, corrected), 95), np.percentile(distances(corrected, result), 95))
    return {"dice": 2 * both / (np.count_nonzero(result) + np.count_nonzero(corrected)),
            "result_volume_ml": np.count_nonzero(result) * voxel_ml,
            "corrected_volume_ml": np.count_nonzero(corrected) * voxel_ml, "hd95_mm": float(hd95)}


def spacing_of(source: list[Path]) -> tuple[float, float, float]:
    """(slice, row, column) spacing of a phantom series, from its headers."""
    first, *_ = (pydicom.dcmread(p, stop_before_pixels=True) for p in source)
    rows, columns = (float(v) for v in first.PixelSpacing)
    return float(first.SliceThickness), rows, columns


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A node running the real pipelines (``radnode run``) with its web service, matching corrections at once."""
    with Node(node_config(tmp_path, feedback={"preload_metrics": True}), poll_seconds=0.1) as running:
        yield running


@pytest.mark.slow
def test_a_corrected_seg_sent_back_is_matched_to_its_job_measured_and_never_processed(
        node: Node, tmp_path: Path) -> None:
    source = write_chest_phantom(tmp_path / "ct", 40, 64, 64)
    assert storescu(node.port, tmp_path / "ct").returncode == 0
    wait_until(lambda: len(node.jobs()) == 1)
    job = final_job(node, node.jobs()[0].id, timeout=120)
    assert (job.state, job.pipeline) == (JobState.DONE, "ct_tissue"), job.reason
    result_seg = outbox_dir(node.config, job.id) / "seg.dcm"

    (tmp_path / "correction").mkdir()
    corrected = write_correction(result_seg, source, tmp_path / "correction" / "seg.dcm",
                                 {"Right lung": -2, "Bone": 1})
    sent = time.monotonic()
    assert storescu(node.port, tmp_path / "correction", calling_ae="WORKSTATION", options=("-R",)).returncode == 0
    token = token_for(node, Role.VIEWER)
    wait_until(lambda: [c["state"] for c in api_json(node, "/api/corrections", token)["corrections"]] != ["pending"],
               timeout=30)
    assert [c["state"] for c in api_json(node, "/api/corrections", token)["corrections"]] == ["matched"], \
        api_json(node, "/api/corrections", token)
    matched_after = time.monotonic() - sent
    assert matched_after < 15, f"matched {matched_after:.1f} s after it was sent"

    answer = api_json(node, f"/api/jobs/{job.id}", token)
    (correction,) = answer["corrections"]
    assert correction["result_sop_instance_uid"] == pydicom.dcmread(result_seg, stop_before_pixels=True).SOPInstanceUID
    ours = seg_masks_by_source(result_seg, source)
    spacing = spacing_of(source)
    by_label = {s["segment"]: s for s in correction["segments"]}
    assert set(by_label) == {"Body", "Left lung", "Right lung", "Bone", "Adipose tissue", "Skeletal muscle"}
    for figures in correction["segments"]:
        number = figures["result_segment_number"]
        expected = independent_agreement(ours[number], corrected[number], spacing)
        for name, value in expected.items():
            assert figures[name] == pytest.approx(value, abs=1e-3), (figures["segment"], name)
        difference = expected["corrected_volume_ml"] - expected["result_volume_ml"]
        assert figures["volume_difference_ml"] == pytest.approx(difference, abs=1e-3)
        assert figures["volume_difference_percent"] == pytest.approx(100 * difference / expected["result_volume_ml"],
                                                                     abs=1e-3)
    assert by_label["Right lung"]["dice"] < 0.95 and by_label["Right lung"]["volume_difference_ml"] < 0
    assert by_label["Bone"]["dice"] < 0.95 and by_label["Bone"]["volume_difference_ml"] > 0
    assert by_label["Left lung"]["dice"] == 1 and by_label["Left lung"]["hd95_mm"] == 0
    assert by_label["Right lung"]["property_type"].endswith(", Right")  # laterality told the lungs apart

    # never processed: still the one job, run once, and the correction is in its log, not a job's input
    assert [(j.id, j.runs) for j in node.jobs()] == [(job.id, 1)]
    assert "correction" in [e.kind for e in node.events(job.id)]
    listed = api_json(node, "/api/corrections", token)["corrections"]
    assert [(c["state"], c["job_id"], c["calling_ae"]) for c in listed] == [("matched", job.id, "WORKSTATION")]


def test_a_correction_that_fits_no_job_is_kept_and_listed_with_why(tmp_path: Path) -> None:
    """A corrected SEG of a series the node never processed: recorded, listed ``unmatched``, no job runs."""
    from factories import phantom_result
    from radnode.imaging.series import VolumeCriteria, load_volume
    from radnode.outputs.algorithm import AlgorithmInfo
    from radnode.outputs.seg import build_segmentation

    source = write_chest_phantom(tmp_path / "ct", 12, 24, 24)
    volume, _ = load_volume(tmp_path / "ct", VolumeCriteria())
    build_segmentation(volume, phantom_result(volume).segments, AlgorithmInfo("ct_tissue", "0.1.0"),
                       uid_root="1.2.826.0.1.3680043.8.498.").save_as(tmp_path / "ours.dcm")
    (tmp_path / "correction").mkdir()
    write_correction(tmp_path / "ours.dcm", source, tmp_path / "correction" / "seg.dcm", {"Body": -1})
    with Node(node_config(tmp_path), poll_seconds=0.1) as node:
        _unmatched_correction_is_listed(node, tmp_path, source)


def _unmatched_correction_is_listed(node: Node, tmp_path: Path, source: list[Path]) -> None:
    assert storescu(node.port, tmp_path / "correction", calling_ae="WORKSTATION", options=("-R",)).returncode == 0
    token = token_for(node, Role.VIEWER)
    wait_until(lambda: [c["state"] for c in api_json(node, "/api/corrections", token)["corrections"]] == ["unmatched"])
    (listed,) = api_json(node, "/api/corrections", token)["corrections"]
    series = pydicom.dcmread(source[0], stop_before_pixels=True).SeriesInstanceUID
    assert listed["job_id"] is None and f"no job received its source series {series}" in listed["message"]
    wait_until(lambda: node.jobs() and node.jobs()[0].state is JobState.DONE)
    (job,) = node.jobs()
    assert job.pipeline == "" and job.runs == 0 and "correction candidate" in (job.reason or "")
