"""The segments of a pipeline result as a binary DICOM Segmentation on the source series' geometry.

The SEG references each source slice frame by frame (same Frame of Reference, plane positions taken
from the source slices' Image Position (Patient)), so a viewer overlays it exactly on the CT.
"""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np

from radnode.imaging.volume import Volume
from radnode.outputs.algorithm import AlgorithmInfo, declare_private_coding_schemes, new_uid
from radnode.results import Segment

SEG_SERIES_NUMBER = 901
"""Default Series Number for SEG results: high, so result series sort after acquired ones in viewers."""


def _segment_description(number: int, segment: Segment, algorithm: AlgorithmInfo,
                         uid_root: str) -> hd.seg.SegmentDescription:
    """Segment Description: SNOMED CT category/type (+ laterality modifier), AUTOMATIC, the algorithm."""
    structure = segment.structure
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=structure.label,
        segmented_property_category=structure.category,
        segmented_property_type=copy.deepcopy(structure.property_type),  # modified below; keep the Structure's
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm.identification(),
        tracking_uid=new_uid(uid_root),
        tracking_id=structure.key,
        display_color=hd.color.CIELabColor.from_rgb(*structure.color_rgb),
    )
    if structure.laterality is not None:
        # Segmented Property Type Modifier Code Sequence (0062,0011), nested in the property type item.
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_dataset(structure.laterality)
        ]
    return description


def build_segmentation(
    volume: Volume,
    segments: list[Segment],
    algorithm: AlgorithmInfo,
    *,
    uid_root: str,
    series_number: int = SEG_SERIES_NUMBER,
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
    # (frames, rows, columns, segments): highdicom's layout for possibly overlapping binary segments.
    pixel_array = np.stack([s.mask.astype(bool, copy=False) for s in segments], axis=-1)
    seg = hd.seg.Segmentation(
        source_images=volume.source,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment_description(i, s, algorithm, uid_root)
                              for i, s in enumerate(segments, start=1)],
        series_instance_uid=new_uid(uid_root),
        series_number=series_number,
        sop_instance_uid=new_uid(uid_root),
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=algorithm.device_serial_number,
        series_description=series_description or f"{algorithm.name} segmentation",
        content_label="SEGMENTATION",
        content_description=f"{algorithm.name} {algorithm.version}"[:64],
        omit_empty_frames=True,
        contributing_equipment=[algorithm.contributing_equipment()],
    )
    declare_private_coding_schemes(seg, uid_root, coded_in=seg.SegmentSequence)
    return seg
