"""One of Orthanc's DICOMweb servers (``DicomWeb.Servers``): results are stored into Orthanc, then Orthanc sends
them by STOW-RS in one synchronous job (for a STOW-RS server the node reaches itself, use ``dicomweb``)."""

from __future__ import annotations

from typing import Any, Literal

from radnode.destinations.orthanc import OrthancRelay
from radnode.destinations.orthanc_modality import OrthancName
from radnode.destinations.registry import destination_type


@destination_type
class OrthancDicomwebDestination(OrthancRelay):
    """``{type: orthanc-dicomweb, server: RESEARCH}``; one line: ``orthanc-dicomweb:RESEARCH``."""

    kind = "orthanc-dicomweb"
    type: Literal["orthanc-dicomweb"] = "orthanc-dicomweb"  # type: ignore[assignment]
    server: OrthancName

    @classmethod
    def shorthand(cls, argument: str) -> dict[str, Any]:
        return {"server": argument}

    def describe(self) -> str:
        return f"Orthanc DICOMweb server {self.server}"

    def orthanc_path(self) -> str:
        return f"/dicom-web/servers/{self.server}/stow"
