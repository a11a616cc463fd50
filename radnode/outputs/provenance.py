"""How the node's results name their maker, and how the node recognises them when they come back.

Every result radnode writes (SEG, measurement SR, report SR, Parametric Map; a future KOS likewise) carries
``Manufacturer`` "radnode" and a Contributing Equipment item naming radnode as *Processing Equipment*
(DCM 109102) with the algorithm's model name and version (``algorithm.py``; highdicom adds its own
library item after it). Results sent on to a PACS or
Orthanc often come back to the node (a PACS forwarding a whole study, Orthanc's own routing); processing
them would start a loop. :func:`own_result` recognises them by that identification, whatever the rule file
says. A foreign object is not recognised: one another system wrote (its own Manufacturer), or one that
modified a radnode result (it adds a *Modifying Equipment*, DCM 109103, item after radnode's, as PS3.3
C.7.5.1.1.1 asks). A foreign SEG that references a source series is a *correction candidate*
(:func:`correction_candidate`): a radiologist's edit of an AI segmentation (OHIF, 3D Slicer) comes back as a
new SEG from another creator; the node never processes it and matches it to its job (``radnode/feedback``).

Light on purpose (no highdicom): the node's ingress imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MANUFACTURER = "radnode"
"""Manufacturer (0008,0070) of every result, and of the Contributing Equipment item naming the algorithm."""

PROCESSING_EQUIPMENT = ("109102", "DCM")
"""Purpose of Reference of that item: DCM 109102 "Processing Equipment" (made new instances from others)."""
MODIFYING_EQUIPMENT = ("109103", "DCM")
"""Purpose of Reference of equipment that changed an instance afterwards (DCM 109103 "Modifying Equipment")."""

PROVENANCE_TAGS = ("Manufacturer", "ContributingEquipmentSequence", "Modality", "ReferencedSeriesSequence")
"""The attributes :func:`own_result` and :func:`correction_candidate` read (parsed at ingest beside the rules'
keywords)."""


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return " ".join(str(v).strip() for v in value)
    return str(value).strip()


def _purposes(item: Any) -> set[tuple[str, str]]:
    return {(_text(c.get("CodeValue")), _text(c.get("CodingSchemeDesignator")))
            for c in item.get("PurposeOfReferenceCodeSequence") or []}


def own_result(attributes: Mapping[str, Any] | Any) -> str | None:
    """Why ``attributes`` (a data set or a mapping of keywords) are a result radnode wrote, in words, or None
    when they are not: ``Manufacturer`` is radnode, a Contributing Equipment item names radnode as Processing
    Equipment, and no Modifying Equipment item follows it (a phantom radnode wrote as *input* has no such item;
    another system's correction has its own Manufacturer, an edit of a result its Modifying Equipment item)."""
    if _text(attributes.get("Manufacturer")) != MANUFACTURER:
        return None
    items = list(attributes.get("ContributingEquipmentSequence") or [])
    ours = [i for i, item in enumerate(items)
            if _text(item.get("Manufacturer")) == MANUFACTURER and PROCESSING_EQUIPMENT in _purposes(item)]
    if not ours or any(MODIFYING_EQUIPMENT in _purposes(item) for item in items[ours[-1] + 1:]):
        return None
    last = items[ours[-1]]
    algorithm = " ".join(t for t in (_text(last.get("ManufacturerModelName")), _text(last.get("SoftwareVersions")))
                         if t) or "unnamed algorithm"
    modality = _text(attributes.get("Modality")) or "object"
    return (f"the {modality} is a result of {MANUFACTURER} ({algorithm}), told by its Manufacturer and Contributing "
            "Equipment: never processed")


def correction_candidate(attributes: Mapping[str, Any] | Any) -> str | None:
    """Why ``attributes`` may be a clinician's correction of a segmentation, in words, or None: a SEG that is
    not :func:`own_result` and references at least one source series (Referenced Series Sequence, as OHIF,
    3D Slicer and highdicom write it). Whether it corrects one of the node's results (same source series and
    Frame of Reference, segments of the same coded property types) is decided when it is matched to a job."""
    if _text(attributes.get("Modality")) != "SEG" or own_result(attributes) is not None:
        return None
    referenced = [_text(item.get("SeriesInstanceUID")) for item in attributes.get("ReferencedSeriesSequence") or []]
    referenced = [uid for uid in referenced if uid]
    if not referenced:
        return None
    maker = _text(attributes.get("Manufacturer")) or "an unnamed manufacturer"
    return (f"a SEG from {maker} referencing series {', '.join(referenced)}: a correction candidate, recorded "
            "and matched to the node's result, never processed")
