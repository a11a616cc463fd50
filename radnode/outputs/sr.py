"""The measurements of a pipeline result as a TID 1500 Measurement Report (Comprehensive 3D SR).

One TID 1411 volumetric measurement group per segment points at that segment of the SEG, so a reader
finds for every number the region it was measured on. Before it, a cross-section group (TID 1501) with
the same Tracking Unique Identifier gives the area of the segment's largest cross-section, inferred from
its outline on that source image: the form in which viewers (OHIF among them) list a measurement and
show it; OHIF 3 shows nothing of a group without image coordinates. :func:`read_measurements` parses the
volumetric measurements (the pipeline's numbers) back; the run manifest and the FHIR Bundle take their
numbers from it so all outputs agree. The cross-section areas locate each structure for a reader.
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes

from radnode.imaging.volume import Volume
from radnode.outputs.algorithm import AlgorithmInfo, declare_private_coding_schemes, device_uid, new_uid, stable_uid
from radnode.outputs.contour import largest_cross_section
from radnode.outputs.layout import RunOutput
from radnode.results import PipelineResult, Segment, Structure
from radnode.uncertainty import (
    NEEDS_REVIEW,
    NO_REVIEW_NEEDED,
    NO_UNITS,
    REVIEW_CONFIDENCE,
    REVIEW_FINDING,
    UNCERTAINTY_CONCEPTS,
    UncertainPipelineResult,
)

PROCEDURE_REPORTED: dict[str, Code] = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,  # LN 25045-6
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,  # LN 25056-3
    "PT": codes.cid100.PETUnspecifiedBodyRegion,  # LN 44136-0
}
"""Procedure Reported (CID 100 Quantitative Diagnostic Imaging Procedure) by modality; these LOINC codes
name the imaging study without claiming a body region the pipeline does not know."""

CROSS_SECTION_TRACKING_PREFIX = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI:"
"""Tracking Identifier of the cross-section groups, the structure key after it: OHIF's SR import (the
Cornerstone3D adapters) loads a measurement group into its Measurements panel only if the identifier names
one of its tools, and a closed outline with its area is its freehand ROI."""

ANATOMICAL_STRUCTURE_CATEGORIES = {"123037004", "91723000"}
"""SNOMED CT category codes (CID 7150) whose property type is itself an anatomic location (finding site)."""


def procedure_reported(modality: str) -> Code:
    """The CID 100 procedure code for a modality; SCT 363679005 "Imaging procedure" when none is specific."""
    return PROCEDURE_REPORTED.get(modality.upper(), codes.cid100.ImagingProcedure)


def _finding_sites(structure: Structure) -> list[hd.sr.FindingSite] | None:
    """Finding Site for anatomical structures (the structure itself, with laterality); none for tissues."""
    if structure.category.scheme_designator != "SCT" or structure.category.value not in ANATOMICAL_STRUCTURE_CATEGORIES:
        return None
    return [hd.sr.FindingSite(anatomic_location=structure.property_type, laterality=structure.laterality)]


def observation_uid(uid_root: str, tracking_uid: str, concept: str, derivation: str | None) -> str:
    """Observation UID (0040,A171) of one measurement of a tracked structure: the same on every run of the
    study (see :func:`radnode.outputs.algorithm.stable_uid`); FHIR identifies the Observation by it."""
    return stable_uid(uid_root, "observation", tracking_uid, concept, derivation or "")


def _review_evaluations(result: PipelineResult, key: str) -> list[hd.sr.QualitativeEvaluation] | None:
    """The segment's review decision as a coded finding with its confidence (IHE AI Results: a qualitative
    finding carries how sure the algorithm is): "Automatic segmentation quality" = human review required or
    within limits, HAS PROPERTIES the samples' agreement (Dice) as the confidence."""
    if not isinstance(result, UncertainPipelineResult) or result.uncertainty is None:
        return None
    scores = result.uncertainty.scores_for(key)
    if scores is None:
        return None
    flagged = bool(scores.exceeded(result.uncertainty.limits))
    evaluation = hd.sr.QualitativeEvaluation(REVIEW_FINDING, NEEDS_REVIEW if flagged else NO_REVIEW_NEEDED)
    evaluation[0].ContentSequence = [hd.sr.NumContentItem(
        name=REVIEW_CONFIDENCE, value=round(float(scores.agreement), 4), unit=NO_UNITS,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES)]
    return [evaluation]


def _cross_section_group(
    volume: Volume,
    segment: Segment,
    tracking_uid: str,
    structure: Structure,
    sites: list[hd.sr.FindingSite] | None,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations | None:
    """A TID 1501 group: the area of the segment's largest cross-section, inferred from its outline on
    its source image (:func:`radnode.outputs.contour.largest_cross_section`); None for an empty segment."""
    section = largest_cross_section(segment)
    if section is None:
        return None
    image = volume.source[section.slice_index]
    outline = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=section.points.astype(np.float32),
        source_image=hd.sr.SourceImageForRegion(str(image.SOPClassUID), str(image.SOPInstanceUID)),
    )
    area = hd.sr.Measurement(
        name=codes.SCT.Area,
        value=round(section.area_pixels * volume.spacing[1] * volume.spacing[2], 1),
        unit=codes.UCUM.SquareMillimeter,
        algorithm_id=algorithm_id,
        finding_sites=sites,
        referenced_coordinates=[outline],
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid,
                                                     identifier=CROSS_SECTION_TRACKING_PREFIX + structure.key),
        finding_category=structure.category,
        finding_type=structure.property_type,
        finding_sites=sites,
        algorithm_id=algorithm_id,
        measurements=[area],
    )
    # The structure's name as a text qualitative evaluation: what a viewer labels the outline with
    # (the coded finding alone loses laterality: two "Lung" entries).
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=structure.label, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def build_measurement_report(
    volume: Volume,
    seg: Dataset,
    result: PipelineResult,
    algorithm: AlgorithmInfo,
    *,
    uid_root: str,
    series_number: int = RunOutput.MEASUREMENT_SR.series_number,
    parametric_map: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report with one TID 1411 group per SEG segment, measurements from ``result``.

    Segments are matched to result structures by Tracking ID (the structure key, as written by
    :func:`radnode.outputs.seg.build_segmentation`); the group reuses the segment's Tracking UID.
    Evidence is the source series, the SEG and the uncertainty ``parametric_map`` when there is one (each
    uncertainty score names it as its source of measurement). A result with uncertainty adds to each scored
    group a qualitative evaluation "Automatic segmentation quality": human review required or not, with the
    confidence. Every measurement has an Observation UID that is stable across re-runs of the study.
    Each segment with voxels also gets a cross-section group (:func:`_cross_section_group`) just before
    its volumetric group; a segment without voxels, measurements or evaluation gets no group at all.
    """
    structures = {s.structure.key: s.structure for s in result.segments}
    segments = {s.structure.key: s for s in result.segments}
    series_uid = str(volume.study.SeriesInstanceUID)
    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version,
                                                 family=algorithm.family, manufacturer=algorithm.manufacturer)
    groups = []
    for item in seg.SegmentSequence:
        key = str(item.TrackingID)
        if key not in structures:
            raise ValueError(f"SEG segment {item.SegmentNumber} ({key!r}) has no structure in the result")
        structure = structures[key]
        sites = _finding_sites(structure)
        measurements = []
        for m in result.measurements_for(key):
            on_map = parametric_map is not None and m.name.value in UNCERTAINTY_CONCEPTS
            measurement = hd.sr.Measurement(
                name=m.name,
                value=float(m.value),
                unit=m.unit,
                derivation=m.derivation,
                algorithm_id=algorithm_id,
                finding_sites=sites,
                # an uncertainty score is measured on the uncertainty map: its source is the Parametric Map
                referenced_images=[hd.sr.SourceImageForMeasurement(
                    str(parametric_map.SOPClassUID), str(parametric_map.SOPInstanceUID))] if on_map else None,
            )
            measurement[0].ObservationUID = observation_uid(
                uid_root, str(item.TrackingUID), m.name.value, m.derivation.value if m.derivation else None)
            measurements.append(measurement)
        evaluations = _review_evaluations(result, key)
        cross_section = _cross_section_group(volume, segments[key], item.TrackingUID, structure, sites, algorithm_id)
        if cross_section is None and not measurements and not evaluations:
            continue  # an empty segment with nothing said about it: no group (viewers need a region per group)
        if cross_section is not None:
            groups.append(cross_section)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=item.TrackingUID, identifier=key),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=int(item.SegmentNumber),
                source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
            ),
            finding_category=structure.category,
            finding_type=structure.property_type,
            finding_sites=sites,
            algorithm_id=algorithm_id,
            measurements=measurements,
            qualitative_evaluations=evaluations,
        ))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(algorithm, uid_root),
            name=algorithm.name,
            manufacturer_name=algorithm.manufacturer,
            model_name=algorithm.name,
            serial_number=algorithm.device_serial_number,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure_reported(volume.modality),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*volume.source, seg, *([parametric_map] if parametric_map is not None else [])],
        content=report[0],
        series_instance_uid=new_uid(uid_root),
        series_number=series_number,
        sop_instance_uid=new_uid(uid_root),
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        series_description=f"{algorithm.name} measurements",
        is_complete=True,
        contributing_equipment=[algorithm.contributing_equipment()],
    )
    declare_private_coding_schemes(sr, uid_root)
    return sr


def _code(concept: Dataset | None) -> dict[str, str] | None:
    """A coded concept as a plain mapping (value, scheme_designator, meaning)."""
    if concept is None:
        return None
    return {"value": str(concept.value), "scheme_designator": str(concept.scheme_designator),
            "meaning": str(concept.meaning)}


def _code_value(code: Dataset) -> str:
    """Code Value of a code item, whichever of Code Value, Long Code Value or URN Code Value holds it."""
    return str(code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue") or "")


def _observation_uids(sr_dataset: Dataset) -> dict[tuple[str, str, str | None], str]:
    """(Tracking UID, concept code, derivation code) → Observation UID of each NUM item, read from the raw
    content tree (highdicom's parsed templates do not keep the attribute)."""
    found: dict[tuple[str, str, str | None], str] = {}
    def walk(items: Any, tracking: str | None) -> None:
        for item in items:
            name = _code_value(item.ConceptNameCodeSequence[0]) if "ConceptNameCodeSequence" in item else None
            if item.get("ValueType") == "CONTAINER" and name == "125007":
                uids = [str(c.UID) for c in item.get("ContentSequence", [])
                        if c.get("ValueType") == "UIDREF" and _code_value(c.ConceptNameCodeSequence[0]) == "112040"]
                walk(item.get("ContentSequence", []), uids[0] if uids else None)
            elif item.get("ValueType") == "NUM" and tracking and "ObservationUID" in item:
                derivation = next((_code_value(c.ConceptCodeSequence[0]) for c in item.get("ContentSequence", [])
                                   if c.get("ValueType") == "CODE"
                                   and _code_value(c.ConceptNameCodeSequence[0]) == "121401"), None)
                found[(tracking, str(name), derivation)] = str(item.ObservationUID)
            elif "ContentSequence" in item:
                walk(item.ContentSequence, tracking)
    walk(sr_dataset.get("ContentSequence", []), None)
    return found


def read_measurements(sr_dataset: Dataset) -> list[dict[str, Any]]:
    """Every measurement of a TID 1500 report, in document order, as plain data.

    Each item: ``structure`` (Tracking Identifier), ``tracking_uid``, ``segment_number`` and
    ``seg_sop_instance_uid`` (the referenced SEG segment, None if the group references none),
    ``finding_type``, ``concept``, ``derivation`` (mappings of value/scheme_designator/meaning or None),
    ``observation_uid`` (the NUM item's Observation UID, None if it has none),
    ``value`` (float) and ``unit`` (UCUM code).
    """
    sr = hd.sr.Comprehensive3DSR.from_dataset(sr_dataset, copy=True)
    observation_uids = _observation_uids(sr_dataset)
    rows: list[dict[str, Any]] = []
    for group in sr.content.get_volumetric_roi_measurement_groups():
        # each of highdicom's group properties searches the group's content tree: read each once per group
        segment = group.referenced_segment
        segment_item = segment[0] if segment is not None else None
        tracking_uid = group.tracking_uid
        common = {
            "structure": group.tracking_identifier,
            "tracking_uid": str(tracking_uid) if tracking_uid else None,
            "segment_number": (int(segment_item.ReferencedSOPSequence[0].ReferencedSegmentNumber)
                               if segment_item is not None else None),
            "seg_sop_instance_uid": (str(segment_item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                                     if segment_item is not None else None),
            "finding_type": _code(group.finding_type),
        }
        for m in group.get_measurements():
            rows.append({
                **common,
                "concept": _code(m.name),
                "derivation": _code(m.derivation),
                "observation_uid": observation_uids.get((str(tracking_uid), str(m.name.value),
                                                         str(m.derivation.value) if m.derivation else None)),
                "value": m.value,
                "unit": str(m.unit.value),
            })
    return rows
