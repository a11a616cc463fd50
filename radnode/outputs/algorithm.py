"""Who made a result: the algorithm's identity as DICOM codes and equipment, and new UIDs under the site root.

Every SEG, SR and FHIR resource the node writes names the same algorithm, so a reader can tell which
software (and which version) produced a number, as the IHE AI Results (AIR) profile asks.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid

from radnode.outputs.provenance import MANUFACTURER


@dataclass(frozen=True)
class AlgorithmInfo:
    """Name, version and family (CID 7162 Surface Processing Algorithm Family) of a pipeline's algorithm."""

    name: str
    version: str
    family: Code = field(default_factory=lambda: codes.cid7162.ArtificialIntelligence)
    """DCM 123110 "Artificial Intelligence" by default; model-free pipelines name their own family,
    e.g. ``codes.cid7162.MorphologicalOperations``."""
    manufacturer: str = MANUFACTURER
    device_serial_number: str = field(default_factory=lambda: socket.gethostname()[:64] or MANUFACTURER)
    """Device Serial Number (0018,1000) of the equipment that ran it: the node's host name."""

    def identification(self) -> hd.AlgorithmIdentificationSequence:
        """Algorithm Identification Sequence for SEG segments and SR measurements (TID 4019)."""
        return hd.AlgorithmIdentificationSequence(
            name=self.name, family=self.family, version=self.version, source=self.manufacturer,
        )

    def image_equipment(self) -> dict[str, str]:
        """General Equipment of a generated image object (SEG, Parametric Map), as highdicom's keywords."""
        return {"manufacturer": self.manufacturer, "manufacturer_model_name": self.name,
                "software_versions": self.version, "device_serial_number": self.device_serial_number}

    def contributing_equipment(self) -> hd.ContributingEquipment:
        """Contributing Equipment item naming the algorithm as the equipment that made the new instance.

        Purpose of Reference is DCM 109102 "Processing Equipment" (equipment that processed composite
        instances to create new ones); 109103 "Modifying Equipment" would claim the source was changed.
        """
        return hd.ContributingEquipment(
            manufacturer=self.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.name,
            software_versions=self.version,
            contribution_description=f"{self.name} {self.version}: automatic analysis",
        )


def new_uid(uid_root: str) -> UID:
    """A new unique DICOM UID under the configured site root (e.g. ``1.2.826.0.1.3680043.8.498.``)."""
    return generate_uid(prefix=uid_root)


def stable_uid(uid_root: str, *parts: str) -> UID:
    """A UID under the site root derived from ``parts``: the same parts give the same UID on every run.

    For identities that must survive a re-run of the same study (the Tracking UID of a structure, the
    Observation UID of its measurements, the report's identifier), so a superseding result updates the
    EHR's records in place instead of adding new ones. Instances themselves (SOP Instance UIDs) stay new.
    """
    return generate_uid(prefix=uid_root, entropy_srcs=list(parts))


def device_uid(algorithm: AlgorithmInfo, uid_root: str) -> UID:
    """Device Observer UID of the algorithm on this node: stable for the same name, version and host."""
    return generate_uid(prefix=uid_root, entropy_srcs=[algorithm.manufacturer, algorithm.name,
                                                       algorithm.version, algorithm.device_serial_number])


def declare_private_coding_schemes(dataset: Dataset, uid_root: str, *,
                                   coded_in: Iterable[Dataset] | None = None) -> None:
    """Add a Coding Scheme Identification Sequence (0008,0110) item for each private (``99``…) scheme used.

    DICOM PS3.3 C.12.1.1.2.3 asks for every private Coding Scheme Designator to be identified there,
    so a receiver can tell whose codes they are. Each gets a Coding Scheme UID derived from the site root
    and the designator (the same on every instance), which FHIR writers turn into ``urn:oid:`` systems.
    ``coded_in`` limits the search to the items that can hold codes (e.g. a SEG's segment descriptions
    rather than its thousands of per-frame items).
    """
    items = [dataset] if coded_in is None else list(coded_in)
    used = sorted({str(e.value) for item in items for e in item.iterall()
                   if e.keyword == "CodingSchemeDesignator" and str(e.value).startswith("99")})
    declared = {str(i.CodingSchemeDesignator) for i in dataset.get("CodingSchemeIdentificationSequence", [])}
    for designator in used:
        if designator in declared:
            continue
        item = Dataset()
        item.CodingSchemeDesignator = designator
        item.CodingSchemeUID = coding_scheme_uid(designator, uid_root)
        item.CodingSchemeName = f"{designator} private codes"
        item.CodingSchemeResponsibleOrganization = MANUFACTURER
        dataset.setdefault("CodingSchemeIdentificationSequence", []).value.append(item)


def coding_scheme_uid(designator: str, uid_root: str) -> UID:
    """Coding Scheme UID of a private scheme of this site: stable for the same root and designator."""
    return generate_uid(prefix=uid_root, entropy_srcs=["coding scheme", designator])
