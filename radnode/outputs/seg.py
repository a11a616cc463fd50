"""The segments of a pipeline result as a binary DICOM Segmentation on the source series' geometry.

The SEG references each source slice frame by frame (same Frame of Reference, plane positions taken
from the source slices' Image Position (Patient)), so a viewer overlays it exactly on the CT.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import highdicom as hd
from highdicom.spatial import VOLUME_INDEX_CONVENTION, get_normal_vector
import numpy as np
from pydicom import Dataset
from pydicom.uid import SegmentationStorage

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


@dataclass
class _Layer:
    """Segments highdicom can take as one label-map style array (no two of them overlap): the array and, for
    each of its values 1..k, the segment's number in the SEG."""

    array: np.ndarray
    numbers: list[int]


def _layers(segments: list[Segment]) -> list[_Layer]:
    """The segments as few non-overlapping layers, without copying what is already one.

    Segments of one label map are one layer (the map itself, relabelled only when its values are not
    1..k). Bool masks are packed first-fit: a mask alone is passed as it is; a mask that overlaps none of a
    layer's joins it, the layer becoming a label map (the smallest unsigned type that holds its masks)."""
    shared: dict[int, tuple[np.ndarray, list[tuple[int, int]]]] = {}
    packed: list[_Layer] = []
    bool_count = sum(not s.shares_labels for s in segments)
    for number, segment in enumerate(segments, start=1):
        if segment.shares_labels:
            shared.setdefault(id(segment.labels), (segment.labels, []))[1].append((segment.value, number))
            continue
        mask = segment.labels
        for layer in packed:
            if not _overlap(layer.array, mask):
                if layer.array.dtype == bool:  # a second mask: the layer becomes a label map
                    layer.array = layer.array.astype(_label_dtype(bool_count))
                layer.numbers.append(number)
                layer.array[mask] = len(layer.numbers)
                break
        else:
            packed.append(_Layer(mask, [number]))
    layers = []
    for labels, members in shared.values():
        members.sort()
        values = [value for value, _ in members]
        if values != list(range(1, len(values) + 1)) or int(labels.max(initial=0)) > len(values):
            lookup = np.zeros(max(int(labels.max(initial=0)), max(values)) + 1, dtype=_label_dtype(len(values)))
            lookup[values] = np.arange(1, len(values) + 1)
            labels = lookup[labels]
        layers.append(_Layer(labels, [number for _, number in members]))
    return sorted(layers + packed, key=lambda layer: min(layer.numbers))


def _label_dtype(count: int) -> type:
    return np.uint8 if count < 2**8 else np.uint16


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two masks / label maps share a voxel, a few slices at a time (stops at the first)."""
    step = max(1, 4 * 1024 * 1024 // max(1, int(np.prod(a.shape[1:]))))
    return any(np.logical_and(a[z:z + step], b[z:z + step]).any() for z in range(0, len(a), step))


@dataclass(frozen=True)
class SegmentationPlan:
    """Everything a SEG says but its frames: its UIDs, series and segment descriptions, decided before any
    frame is encoded, so the SR and the report that reference the SEG can be written while its frames are
    (:func:`segmentation_header`)."""

    descriptions: list[hd.seg.SegmentDescription]
    settings: dict
    """highdicom's Segmentation arguments other than the pixels and the segment descriptions."""


HEADER_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                   "SeriesNumber", "InstanceNumber", "SeriesDescription")
"""What :func:`segmentation_header` carries of the SEG besides its Segment Sequence: what the SR's evidence and
references and the FHIR ImagingStudy read."""


def plan_segmentation(
    volume: Volume,
    segments: list[Segment],
    algorithm: AlgorithmInfo,
    *,
    uid_root: str,
    series_number: int = RunOutput.SEG.series_number,
    series_description: str | None = None,
) -> SegmentationPlan:
    """The SEG's UIDs and descriptions (new UIDs under ``uid_root``); ValueError when the segments cannot make
    one (none, or a mask not on the volume grid)."""
    if not segments:
        raise ValueError("a segmentation needs at least one segment")
    if len(volume.source) != volume.shape[0]:
        raise ValueError(f"volume has {volume.shape[0]} slices but {len(volume.source)} source datasets")
    for segment in segments:
        if segment.shape != volume.shape:
            raise ValueError(f"mask of {segment.structure.key!r} has shape {segment.shape}, "
                             f"volume {volume.shape}")
    study_uid = str(volume.study.StudyInstanceUID)
    descriptions = [_segment_description(i, s, algorithm, uid_root, study_uid) for i, s in enumerate(segments, start=1)]
    settings = dict(
        source_images=volume.source,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
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
    return SegmentationPlan(descriptions, settings)


def segmentation_header(volume: Volume, plan: SegmentationPlan) -> Dataset:
    """The SEG of ``plan`` without its frames: :data:`HEADER_KEYWORDS` and the Segment Sequence, equal to those
    of the SEG :func:`build_segmentation` makes from the plan."""
    header = Dataset()
    header.SOPClassUID = SegmentationStorage
    header.SOPInstanceUID = plan.settings["sop_instance_uid"]
    header.StudyInstanceUID = volume.study.StudyInstanceUID
    header.SeriesInstanceUID = plan.settings["series_instance_uid"]
    header.Modality = "SEG"
    header.SeriesNumber = plan.settings["series_number"]
    header.InstanceNumber = plan.settings["instance_number"]
    header.SeriesDescription = plan.settings["series_description"]
    header.SegmentSequence = copy.deepcopy(plan.descriptions)
    return header


def build_segmentation(
    volume: Volume,
    segments: list[Segment],
    algorithm: AlgorithmInfo,
    *,
    uid_root: str,
    series_number: int = RunOutput.SEG.series_number,
    series_description: str | None = None,
    plan: SegmentationPlan | None = None,
) -> hd.seg.Segmentation:
    """A BINARY SEG with one segment per ``segments`` item (in order, numbered from 1), empty frames omitted;
    its UIDs and descriptions from ``plan`` when given (:func:`plan_segmentation`), else new ones.

    Segments may overlap: each has its own frames. highdicom builds the SEG of each non-overlapping layer
    from its label map (never a stacked (frames, rows, columns, segments) copy, which for a 600-slice CT
    and six segments is 0.9 GB, plus highdicom's 8-byte-per-voxel overlap check); the layers' frames are
    then put together in the order highdicom gives a SEG of the stacked masks: by segment, then along the
    slice normal. Raises ValueError when a mask is not on the volume grid.
    """
    if plan is None:
        plan = plan_segmentation(volume, segments, algorithm, uid_root=uid_root, series_number=series_number,
                                 series_description=series_description)
    descriptions, settings = plan.descriptions, plan.settings
    layers = _layers(segments)
    rows, columns = volume.shape[1:]
    if len(layers) == 1:
        seg = hd.seg.Segmentation(pixel_array=layers[0].array, segment_descriptions=descriptions, **settings)
    elif (rows * columns) % 8:  # frames not whole bytes: only highdicom itself can interleave them
        seg = hd.seg.Segmentation(pixel_array=np.stack([s.mask for s in segments], axis=-1),
                                  segment_descriptions=descriptions, **settings)
    else:
        parts = [hd.seg.Segmentation(pixel_array=layer.array, segment_descriptions=[
            _renumbered(descriptions[number - 1], local) for local, number in enumerate(layer.numbers, start=1)],
            **settings) for layer in layers]
        seg = _joined(parts, [layer.numbers for layer in layers], descriptions, volume,
                      overlap=any(_overlap(a.array, b.array) for i, a in enumerate(layers) for b in layers[i + 1:]))
    declare_private_coding_schemes(seg, uid_root, coded_in=seg.SegmentSequence)
    return seg


def _renumbered(description: hd.seg.SegmentDescription, number: int) -> hd.seg.SegmentDescription:
    """A copy of a segment description under another segment number (its layer's own numbering)."""
    copied = copy.deepcopy(description)
    copied.SegmentNumber = number
    return copied


def _joined(parts: list[hd.seg.Segmentation], numbers: list[list[int]],
            descriptions: list[hd.seg.SegmentDescription], volume: Volume, overlap: bool) -> hd.seg.Segmentation:
    """One SEG from the SEGs of the layers (same source, UIDs and settings), its frames ordered, numbered
    and indexed as highdicom orders a SEG of all segments: by segment number, then by position along the
    slice normal, the position index counting the planes where any segment has a frame."""
    joined = parts[0]
    frame_bytes = joined.Rows * joined.Columns // 8
    # the normal highdicom sorts a SEG's planes along (for axial LPS: towards the feet)
    normal = get_normal_vector(volume.orientation, index_convention=VOLUME_INDEX_CONVENTION)
    frames = []
    for part, part_numbers in zip(parts, numbers):
        data = memoryview(part.PixelData)  # frames are views: the pixel data exists once, then once joined
        shared = part.SharedFunctionalGroupsSequence[0]
        for index, item in enumerate(part.PerFrameFunctionalGroupsSequence):
            if "SegmentIdentificationSequence" not in item:  # a one-segment SEG shares it; here it is per frame
                item.SegmentIdentificationSequence = copy.deepcopy(shared.SegmentIdentificationSequence)
            number = part_numbers[item.SegmentIdentificationSequence[0].ReferencedSegmentNumber - 1]
            distance = float(np.dot(normal, [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]))
            frames.append((number, distance, item, data[index * frame_bytes:(index + 1) * frame_bytes]))
        del data
    frames.sort(key=lambda frame: (frame[0], frame[1]))
    rank = {d: i for i, d in enumerate(sorted({frame[1] for frame in frames}), start=1)}
    for number, distance, item, _ in frames:
        item.SegmentIdentificationSequence[0].ReferencedSegmentNumber = number
        item.FrameContentSequence[0].DimensionIndexValues = [number, rank[distance]]
    shared = joined.SharedFunctionalGroupsSequence[0]
    if "SegmentIdentificationSequence" in shared:
        del shared.SegmentIdentificationSequence
    joined.SegmentSequence = descriptions
    joined.PerFrameFunctionalGroupsSequence = [frame[2] for frame in frames]
    joined.NumberOfFrames = len(frames)
    pixel_data = b"".join(frame[3] for frame in frames)
    del frames  # the views, then the parts' own pixel data
    for part in parts:
        del part.PixelData
    joined.PixelData = pixel_data + b"\x00" if len(pixel_data) % 2 else pixel_data
    joined.SegmentsOverlap = "YES" if overlap else "NO"
    if "DimensionOrganizationType" in joined:  # highdicom's "3D" holds for one segment only
        del joined.DimensionOrganizationType
    return hd.seg.Segmentation.from_dataset(joined, copy=False)
