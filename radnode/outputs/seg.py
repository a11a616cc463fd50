"""The segments of a pipeline result as a binary DICOM Segmentation on the source series' geometry.

The SEG references each source slice frame by frame (same Frame of Reference, plane positions taken
from the source slices' Image Position (Patient)), so a viewer overlays it exactly on the CT.
"""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np

from radnode.imaging.volume import Volume
from radnode.outputs.algorithm import AlgorithmInfo, declare_private_coding_schemes, new_uid, stable_uid
from radnode.outputs.layout import RunOutput
from radnode.results import Segment


def tracking_uid(uid_root: str, study_uid: str, algorithm: AlgorithmInfo, structure_key: str) -> str:
    """The Tracking UID of a structure found by an algorithm in a study: the same on every run of the study,
    so a re-run's SEG, SR and FHIR Observations track the same finding (and FHIR updates it in place)."""
    return stable_uid(uid_root, "tracking", study_uid, algorithm.name, structure_key)


def _segment_description(number: int, segment: Segment, algorithm: AlgorithmInfo,
                         uid_root: str, study_uid: str) -> hd.seg.SegmentDescription:
    """Segment Description: SNOMED CT category/type (+ laterality modifier), AUTOMATIC, the algorithm."""
    structure = segment.structure
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=structure.label,
        segmented_property_category=structure.category,
        segmented_property_type=copy.deepcopy(structure.property_type),  # modified below; keep the Structure's
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm.identification(),
        tracking_uid=tracking_uid(uid_root, study_uid, algorithm, structure.key),
        tracking_id=structure.key,
        display_color=hd.color.CIELabColor.from_rgb(*structure.color_rgb),
    )
    if structure.laterality is not None:
        # Segmented Property Type Modifier Code Sequence (0062,0011), nested in the property type item.
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_dataset(structure.laterality)
        ]
    return description


def _pixel_array(segments: list[Segment]) -> np.ndarray:
    """The masks in the layout highdicom handles fastest: a label map when no two segments overlap.

    A label map (frames, rows, columns) of segment numbers encodes the same BINARY SEG as the stacked
    (frames, rows, columns, segments) masks, but highdicom skips its per-segment overlap pass and the
    stack's memory: 3.4× faster and 18× less memory at 117 segments in ``radnode bench``.
    Overlapping segments (e.g. the body around its organs) keep the stacked layout.
    """
    coverage = np.zeros(segments[0].mask.shape, dtype=np.uint16)
    for segment in segments:
        coverage += segment.mask
    if coverage.max(initial=0) <= 1 and len(segments) < 2**16:
        labels = np.zeros(coverage.shape, dtype=np.uint8 if len(segments) < 256 else np.uint16)
        for number, segment in enumerate(segments, start=1):
            labels[segment.mask] = number
        return labels
    return np.stack([s.mask.astype(bool, copy=False) for s in segments], axis=-1)


def build_segmentation(
    volume: Volume,
    segments: list[Segment],
    algorithm: AlgorithmInfo,
    *,
    uid_root: str,
    series_number: int = RunOutput.SEG.series_number,
    series_description: str | None = None,
) -> hd.seg.Segmentation:
    """A BINARY SEG with one segment per ``segments`` item (in order, numbered from 1), empty frames omitted.

    Segments may overlap: each has its own frames. Raises ValueError when a mask is not on the volume grid.
    """
    if not segments:
        raise ValueError("a segmentation needs at least one segment")
    if len(volume.source) != volume.shape[0]:
        raise ValueError(f"volume has {volume.shape[0]} slices but {len(volume.source)} source datasets")
    for segment in segments:
        if segment.mask.shape != volume.shape:
            raise ValueError(f"mask of {segment.structure.key!r} has shape {segment.mask.shape}, "
                             f"volume {volume.shape}")
    seg = hd.seg.Segmentation(
        source_images=volume.source,
        pixel_array=_pixel_array(segments),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment_description(i, s, algorithm, uid_root, str(volume.study.StudyInstanceUID))
                              for i, s in enumerate(segments, start=1)],
        series_instance_uid=new_uid(uid_root),
        series_number=series_number,
        sop_instance_uid=new_uid(uid_root),
        instance_number=1,
        **algorithm.image_equipment(),
        series_description=series_description or f"{algorithm.name} segmentation",
        content_label="SEGMENTATION",
        content_description=f"{algorithm.name} {algorithm.version}"[:64],
        omit_empty_frames=True,
        contributing_equipment=[algorithm.contributing_equipment()],
    )
    declare_private_coding_schemes(seg, uid_root, coded_in=seg.SegmentSequence)
    return seg
