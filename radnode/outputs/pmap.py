"""A voxel-wise uncertainty map as a DICOM Parametric Map registered to the source series.

One frame per source slice, same Frame of Reference and plane positions as the source (highdicom
derives them from the source images), float32 values with a Real World Value Mapping that names the
quantity, so a viewer can overlay the map on the image and read values out of it.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import Dataset

from radnode.imaging.volume import Volume
from radnode.outputs.algorithm import AlgorithmInfo, declare_private_coding_schemes, new_uid
from radnode.outputs.layout import RunOutput
from radnode.uncertainty import NO_UNITS, PRIVATE_SCHEME, UncertaintyReport

ENTROPY_QUANTITY = hd.sr.CodedConcept("UNC-ENTROPY", PRIVATE_SCHEME, "Normalised predictive entropy")


def _frame_anatomy(region: hd.sr.CodedConcept) -> Dataset:
    """Frame Anatomy functional group item: the region the map covers, laterality unpaired ('U')."""
    item = Dataset()
    item.AnatomicRegionSequence = [hd.sr.CodedConcept(region.value, region.scheme_designator, region.meaning)]
    item.FrameLaterality = "U"
    return item


def _frames_along_slice_normal(pmap: hd.pm.ParametricMap) -> None:
    """Reorder the frames so they run along the slice normal (row × column direction), first frame lowest.

    highdicom sorts a map's frames along its own volume convention, which for an axial series runs head to
    foot; dcmqi's ``paramap2itkimage`` (what 3D Slicer and IDC use) takes the lowest position as the origin
    and fills the volume in frame order, so it reads such a map upside down. With the frames in
    normal order every consumer places each frame where its Image Position (Patient) says. The frames, their
    per-frame functional groups and their dimension index values move together.
    """
    orientation = np.asarray(pmap.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                             .ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    frames = list(pmap.PerFrameFunctionalGroupsSequence)
    distances = [float(np.dot(normal, np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float)))
                 for f in frames]
    order = np.argsort(distances, kind="stable")
    if np.array_equal(order, np.arange(len(frames))):
        return
    frame_bytes = int(pmap.Rows) * int(pmap.Columns) * 4
    data = pmap.FloatPixelData
    pmap.FloatPixelData = b"".join(data[i * frame_bytes:(i + 1) * frame_bytes] for i in order)
    pmap.PerFrameFunctionalGroupsSequence = [frames[i] for i in order]
    for index, item in enumerate(pmap.PerFrameFunctionalGroupsSequence, start=1):
        item.FrameContentSequence[0].DimensionIndexValues = index


def build_uncertainty_map(volume: Volume, report: UncertaintyReport, algorithm: AlgorithmInfo, *,
                          anatomic_region: hd.sr.CodedConcept, uid_root: str,
                          series_number: int = RunOutput.UNCERTAINTY_MAP.series_number) -> hd.pm.ParametricMap:
    """The report's map (normalised predictive entropy in [0, 1]) as a float Parametric Map on the source grid.

    ``anatomic_region`` (e.g. the segmented structure) fills the Frame Anatomy functional group the
    Parametric Map IOD requires.
    """
    if report.map.shape != volume.shape:
        raise ValueError(f"uncertainty map of shape {report.map.shape}, volume {volume.shape}")
    if len(volume.source) != volume.shape[0]:
        raise ValueError(f"volume has {volume.shape[0]} slices but {len(volume.source)} source datasets")
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ENTROPY",
        lut_explanation=f"Normalised predictive entropy, {report.method}"[:64],
        unit=NO_UNITS,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=ENTROPY_QUANTITY,
    )
    pmap = hd.pm.ParametricMap(
        source_images=volume.source,
        pixel_array=np.ascontiguousarray(report.map, dtype=np.float32),
        series_instance_uid=new_uid(uid_root),
        series_number=series_number,
        sop_instance_uid=new_uid(uid_root),
        instance_number=1,
        **algorithm.image_equipment(),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="UNCERTAINTY",
        content_description=f"{algorithm.name} uncertainty ({report.n_samples} samples)"[:64],
        series_description=f"{algorithm.name} uncertainty map"[:64],
        contributing_equipment=[algorithm.contributing_equipment()],
    )
    pmap.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [_frame_anatomy(anatomic_region)]
    _frames_along_slice_normal(pmap)
    # The mapping (with its private quantity code) sits in the shared functional groups, not per frame.
    declare_private_coding_schemes(pmap, uid_root, coded_in=pmap.SharedFunctionalGroupsSequence)
    return pmap
