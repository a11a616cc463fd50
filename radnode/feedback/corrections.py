"""Matching a clinician's corrected SEG to the job whose SEG it corrects, and recording their agreement.

A correction candidate (a foreign SEG referencing a source series, recorded ``pending`` at arrival by any
ingress: C-STORE, STOW-RS, Orthanc) is matched here, in the node's feedback thread, never by a pipeline:

1. the jobs whose input held a series the correction references (newest first, siblings included);
2. in each job's outbox, the node's own SEG (``outputs/provenance.own_result``) with the same Frame of
   Reference that references the same series and has segments of the coded property types the correction
   has (Segmented Property Type plus its modifiers, e.g. laterality);
3. both SEGs read onto the source series' grid (highdicom, frame by source instance, in slice order) and each
   shared segment measured (``agreement.measure``: Dice, volumes, HD95 at the source's voxel spacing).

A correction whose jobs are still running waits; one that fits no job is settled ``unmatched`` with the
reason and stays listed; one that cannot be read ``unreadable``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset

from radnode.config import Config
from radnode.execution import ManifestError, RunManifest
from radnode.feedback.agreement import SegmentAgreement, measure, monai_metrics
from radnode.node.egress import outbox_dir
from radnode.node.store import FINAL_STATES, Correction, CorrectionState, JobState, JobStore
from radnode.outputs.provenance import own_result

log = logging.getLogger(__name__)

PropertyKey = tuple[tuple[str, str], tuple[tuple[str, str], ...]]
"""A segment's Segmented Property Type (value, scheme) and its modifiers' codes, sorted."""


def _code(item: Dataset) -> tuple[str, str]:
    return str(item.CodeValue), str(item.CodingSchemeDesignator)


def property_key(segment: Dataset) -> PropertyKey | None:
    """The coded property type of a Segment Sequence item (None when it has none)."""
    types = segment.get("SegmentedPropertyTypeCodeSequence") or []
    if not types:
        return None
    modifiers = types[0].get("SegmentedPropertyTypeModifierCodeSequence") or []
    return _code(types[0]), tuple(sorted(_code(m) for m in modifiers))


def _key_text(segment: Dataset) -> str:
    item = segment.SegmentedPropertyTypeCodeSequence[0]
    text = f"{item.CodingSchemeDesignator} {item.CodeValue} ({item.CodeMeaning})"
    modifiers = item.get("SegmentedPropertyTypeModifierCodeSequence") or []
    return text + "".join(f", {m.CodeMeaning}" for m in modifiers)


def referenced_series(seg: Dataset) -> list[str]:
    """The source series a SEG references (Referenced Series Sequence), in its order."""
    return [str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence") or []
            if item.get("SeriesInstanceUID")]


@dataclass(frozen=True)
class SourceGrid:
    """A source series' slices in order along their normal and the voxel spacing (slice, row, column) in mm."""

    sop_instance_uids: list[str]
    spacing: tuple[float, float, float]


def source_grid(paths: Iterable[str | Path]) -> SourceGrid:
    """The grid of a single-frame source series from its files' headers (no pixel data read)."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    headers = [h for h in headers if "ImagePositionPatient" in h and "ImageOrientationPatient" in h]
    if not headers:
        raise ValueError("the source series has no images with a position and orientation")
    orientation = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    headers.sort(key=lambda h: float(np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=float))))
    z = np.array([np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=float)) for h in headers])
    slice_spacing = float(np.median(np.diff(z))) if len(z) > 1 else float(headers[0].get("SliceThickness", 1.0))
    row_spacing, column_spacing = (float(v) for v in headers[0].PixelSpacing)
    return SourceGrid([str(h.SOPInstanceUID) for h in headers], (slice_spacing, row_spacing, column_spacing))


def _masks(seg, grid: SourceGrid, numbers: list[int]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """(slices, rows, columns, segments) booleans of a highdicom SEG on the source grid."""
    return seg.get_pixels_by_source_instance(grid.sop_instance_uids, segment_numbers=numbers,
                                             assert_missing_frames_are_empty=True, dtype=bool)


def uncertainty_scores(outputs: Path, seg_sop_instance_uid: str) -> dict[int, dict[str, float]]:
    """Per segment number of the node's SEG, its uncertainty scores by concept code, from the run's manifest
    in ``outputs`` (none when the pipeline scores none or there is no radnode manifest)."""
    from radnode.uncertainty import PRIVATE_SCHEME, UNCERTAINTY_CONCEPTS

    try:
        measurements = RunManifest.read(outputs).measurements
    except (OSError, ManifestError):
        return {}
    scores: dict[int, dict[str, float]] = {}
    for m in measurements:
        concept = m.get("concept") or {}
        if m.get("seg_sop_instance_uid") == seg_sop_instance_uid and concept.get("value") in UNCERTAINTY_CONCEPTS \
                and concept.get("scheme_designator") == PRIVATE_SCHEME and m.get("segment_number") is not None:
            scores.setdefault(int(m["segment_number"]), {})[concept["value"]] = float(m["value"])
    return scores


def compare(result, correction, grid: SourceGrid,  # type: ignore[no-untyped-def]
            uncertainty: dict[int, dict[str, float]] | None = None) -> tuple[list[SegmentAgreement], list[str]]:
    """Each segment of ``correction`` (highdicom SEG) beside ``result``'s segment of the same property type
    (with its ``uncertainty`` scores by segment number), and the labels of the correction's segments
    ``result`` has none of."""
    ours = {property_key(s): s for s in result.SegmentSequence}
    pairs = [(ours[property_key(s)], s) for s in correction.SegmentSequence if property_key(s) in ours]
    unmatched = [str(s.SegmentLabel) for s in correction.SegmentSequence if property_key(s) not in ours]
    if not pairs:
        return [], unmatched
    result_masks = _masks(result, grid, [int(r.SegmentNumber) for r, _ in pairs])
    corrected_masks = _masks(correction, grid, [int(c.SegmentNumber) for _, c in pairs])
    agreements = []
    for k, (r, c) in enumerate(pairs):
        figures = measure(result_masks[..., k], corrected_masks[..., k], grid.spacing)
        agreements.append(SegmentAgreement(segment=str(r.SegmentLabel), property_type=_key_text(r),
                                           result_segment_number=int(r.SegmentNumber),
                                           correction_segment_number=int(c.SegmentNumber),
                                           uncertainty=(uncertainty or {}).get(int(r.SegmentNumber), {}), **figures))
    return agreements, unmatched


class CorrectionMatcher:
    """Settles the store's pending corrections (one :meth:`tick` per round of the node's feedback thread)."""

    BUSY_STATES = (JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING, JobState.DELIVERING)
    """While a job is in one of these, the preload waits: its imports hold the interpreter for seconds, which the
    node's receiving and its jobs' start need more."""

    def __init__(self, config: Config, store: JobStore) -> None:
        self.config = config
        self.store = store
        self.metrics_loaded = not config.feedback.preload_metrics
        """highdicom and MONAI's metrics imported (``feedback.preload_metrics``), or no preload wanted."""

    def tick(self) -> None:
        if not self.metrics_loaded and self._idle():  # the heavy imports now, not on the first correction
            import highdicom  # noqa: F401

            monai_metrics()
            self.metrics_loaded = True
        for correction in self.store.pending_corrections():
            try:
                self.settle(correction)
            except Exception as e:  # never lose it, never stop the thread: it is listed with why
                log.exception("correction %s cannot be matched", correction.sop_instance_uid)
                self.store.settle_correction(correction.sop_instance_uid, CorrectionState.UNREADABLE,
                                             f"cannot be compared: {type(e).__name__}: {e}")

    def _idle(self) -> bool:
        """No study arriving, queued, running or being delivered (a correction pending loads the metrics itself)."""
        counts, _ = self.store.job_counts()
        return not any(counts.get(state.value) for state in self.BUSY_STATES)

    def settle(self, correction: Correction) -> None:
        """Match one pending correction and record the outcome (or leave it pending while its jobs run)."""
        import highdicom as hd

        sop = correction.sop_instance_uid
        try:
            corrected = hd.seg.segread(correction.path)
        except Exception as e:
            self.store.settle_correction(sop, CorrectionState.UNREADABLE, f"not a readable SEG: {e}")
            return
        series_uids = referenced_series(corrected)
        candidates = self.store.jobs_with_series(series_uids)
        if any(state not in FINAL_STATES and state is not JobState.DELIVERING for _, _, state in candidates):
            return  # a job of its source is still being processed: its result is not there yet
        reasons: list[str] = []
        for job_id, pipeline, _ in candidates:
            for path in sorted(outbox_dir(self.config, job_id).glob("*.dcm")):
                header = pydicom.dcmread(path, stop_before_pixels=True)
                if header.get("Modality") != "SEG" or own_result(header) is None:
                    continue
                if header.get("FrameOfReferenceUID") != corrected.get("FrameOfReferenceUID"):
                    reasons.append(f"job {job_id}'s {path.name} has another Frame of Reference")
                    continue
                shared = [uid for uid in series_uids if uid in referenced_series(header)]
                if not shared:
                    continue
                result = hd.seg.segread(path)
                grid = source_grid(i.path for i in self.store.job_inputs(job_id)
                                   if i.series_instance_uid == shared[0])
                scores = uncertainty_scores(path.parent, str(result.SOPInstanceUID))
                agreements, extra = compare(result, corrected, grid, scores)
                if not agreements:
                    reasons.append(f"job {job_id}'s {path.name} has no segment of the correction's property types")
                    continue
                worst = min(a.dice for a in agreements)
                message = (f"{pipeline} result {result.SOPInstanceUID}: {len(agreements)} segment(s) compared, "
                           f"lowest Dice {worst:.3f}")
                if extra:
                    message += f"; not in the node's result, not compared: {', '.join(extra)}"
                self.store.settle_correction(sop, CorrectionState.MATCHED, message, job_id=job_id,
                                             result_sop_instance_uid=str(result.SOPInstanceUID),
                                             model_version=" ".join(str(header.get(k, "")) for k in (
                                                 "ManufacturerModelName", "SoftwareVersions")).strip(),
                                             agreement=[a.to_record() for a in agreements])
                log.info("correction %s matched to job %d (%s)", sop, job_id, message)
                return
        if not candidates:
            reasons.append(f"no job received its source series {', '.join(series_uids)}")
        elif not reasons:
            reasons.append("the jobs of its source series have no SEG result of the node's in their outbox")
        self.store.settle_correction(sop, CorrectionState.UNMATCHED, "; ".join(reasons))
