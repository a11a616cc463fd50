"""The IHE IOCM rejection note: a Key Object Selection that withdraws results a newer version replaced.

When instances of a study arrive after its results went out, the node runs the whole study again and the new
SEG/SR supersede the earlier ones. The earlier objects are already in the PACS; IHE IOCM (Imaging Object
Change Management) withdraws them with a KOS whose document title is DCM 113001 "Rejected for Quality
Reasons" (the results were computed on an incomplete study) and which references each rejected instance, so
the PACS hides or deletes them. Written with highdicom's ``ko`` module, with the node's own equipment
identification (Manufacturer and Contributing Equipment, ``provenance.py``), so a copy coming back is
recognised as the node's own and never processed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom import Dataset
from pydicom.sr.codedict import codes

from radnode import __version__
from radnode.outputs.algorithm import AlgorithmInfo, new_uid
from radnode.outputs.layout import RunOutput

REJECTED_FOR_QUALITY_REASONS = codes.DCM.RejectedForQualityReasons
"""DCM 113001: the IOCM title for instances withdrawn because they are wrong (here: made from part of a study)."""

SUPERSEDED = "Rejected for Quality Reasons (superseded results)"

_EQUIPMENT = AlgorithmInfo("radnode result versions", __version__)


def build_rejection_note(rejected: Sequence[Dataset], *, uid_root: str, institution_name: str | None = None,
                         description: str = SUPERSEDED) -> hd.ko.KeyObjectSelectionDocument:
    """A KOS rejecting every instance in ``rejected`` (their headers suffice), in the study they belong to;
    ``description``: its Series Description, saying why (superseded, rejected by a reviewer)."""
    if not rejected:
        raise ValueError("a rejection note needs at least one instance to reject")
    content = hd.ko.KeyObjectSelection(document_title=REJECTED_FOR_QUALITY_REASONS, referenced_objects=rejected)
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=rejected, content=content, series_instance_uid=new_uid(uid_root),
        series_number=RunOutput.REJECTION_NOTE.series_number, sop_instance_uid=new_uid(uid_root),
        instance_number=1, manufacturer=_EQUIPMENT.manufacturer, institution_name=institution_name,
        contributing_equipment=[_EQUIPMENT.contributing_equipment()])
    note.SeriesDescription = description[:64]
    note.ManufacturerModelName, note.SoftwareVersions = _EQUIPMENT.name, _EQUIPMENT.version
    return note


def write_rejection_note(rejected_files: Sequence[Path], target: Path, *, uid_root: str,
                         institution_name: str | None = None, description: str = SUPERSEDED) -> str:
    """Write the rejection note of the objects in ``rejected_files`` to ``target``; returns its SOP Instance UID."""
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in rejected_files]
    note = build_rejection_note(headers, uid_root=uid_root, institution_name=institution_name,
                                description=description)
    note.save_as(target, enforce_file_format=True)
    return str(note.SOPInstanceUID)
