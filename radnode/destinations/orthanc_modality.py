"""One of Orthanc's DICOM modalities (``DicomModalities``): results are stored into Orthanc, then Orthanc
C-STOREs each in a synchronous job of its own."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from radnode.destinations.base import Check, SendContext
from radnode.destinations.orthanc import OrthancRelay, OrthancRequestError
from radnode.destinations.registry import destination_type

OrthancName = Annotated[str, Field(pattern=r"^[\w.-]+$")]
"""A name in Orthanc's configuration (``DicomModalities``, ``DicomWeb.Servers``)."""


@destination_type
class OrthancModalityDestination(OrthancRelay):
    """``{type: orthanc-modality, modality: PACS}``; one line: ``orthanc-modality:PACS``."""

    kind = "orthanc-modality"
    type: Literal["orthanc-modality"] = "orthanc-modality"  # type: ignore[assignment]
    modality: OrthancName

    @classmethod
    def shorthand(cls, argument: str) -> dict[str, Any]:
        return {"modality": argument}

    def describe(self) -> str:
        return f"Orthanc modality {self.modality}"

    def orthanc_path(self) -> str:
        return f"/modalities/{self.modality}/store"

    def check(self, context: SendContext) -> Check:
        """Orthanc C-ECHOes the modality (``POST /modalities/NAME/echo``): the path the results take."""
        try:
            self.orthanc_request(context, "POST", f"/modalities/{self.modality}/echo",
                                 json={"Timeout": max(1, round(context.timeouts.acse_seconds))})
        except OrthancRequestError as e:
            return Check(False, f"C-ECHO through Orthanc to {self.modality}: {e}")
        return Check(True, f"Orthanc C-ECHOed its modality {self.modality}")
