"""One of Orthanc's DICOMweb servers (``DicomWeb.Servers``): results are stored into Orthanc, then Orthanc sends
each by STOW-RS in a synchronous job of its own (for a STOW-RS server the node reaches itself, use ``dicomweb``)."""

from __future__ import annotations

from typing import Any, Literal

from radnode.destinations.base import Check, SendContext
from radnode.destinations.orthanc import OrthancRelay, OrthancRequestError
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

    def check(self, context: SendContext) -> Check:
        """Orthanc's DICOMweb plugin relays a QIDO-RS search for one study to the server
        (``POST /dicom-web/servers/NAME/get``): Orthanc knows the server and reaches it."""
        try:
            self.orthanc_request(context, "POST", f"/dicom-web/servers/{self.server}/get",
                                 json={"Uri": "/studies", "Arguments": {"limit": "1"}})
        except OrthancRequestError as e:
            return Check(False, f"QIDO-RS through Orthanc to {self.server}: {e}")
        return Check(True, f"Orthanc reached its DICOMweb server {self.server}")
