"""A DICOMweb server reached by STOW-RS (PS3.18 §10.5) with dicomweb-client: a cloud archive, a research PACS,
a viewer's store; basic or bearer authentication, its secret named in the configuration, read per request.

One request per job carries every DICOM result; the server's answer says per instance what it stored
(ReferencedSOPSequence) and what it refused (FailedSOPSequence with its FailureReason), and each delivery is
settled by that answer alone: an instance the server does not confirm is not delivered.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from radnode.destinations.base import Check, Item, Outcome, SendContext
from radnode.destinations.credentials import HttpDestination, http_check, http_failure, http_session
from radnode.destinations.registry import destination_type
from radnode.security.secrets import SecretError

_FAILURE_REASONS = {0xA700: "out of resources", 0xA900: "data set does not match SOP class",
                    0xC000: "cannot understand", 0x0110: "processing failure", 0x0122: "SOP class not supported",
                    0x0111: "duplicate SOP instance", 0xC122: "referenced transfer syntax not supported"}
"""STOW-RS FailureReason codes (PS3.18 Table I.2-1) in words."""


@destination_type
class DicomwebDestination(HttpDestination):
    """``{type: dicomweb, url: https://pacs.example.org/dicom-web, auth: {type: bearer, token: {env: T}}}``;
    one line (no authentication): ``dicomweb:URL``."""

    kind = "dicomweb"
    type: Literal["dicomweb"] = "dicomweb"
    url: str
    """The service's base URL (``…/dicom-web``); STOW-RS goes to ``<url>/studies``."""
    stow_url_prefix: Annotated[str, Field(pattern=r"^[\w./-]*$")] | None = None
    """Path segment some servers put before ``/studies`` for STOW-RS only (dicomweb-client's option)."""

    def describe(self) -> str:
        return f"STOW-RS {self.url}" + self.authentication()

    def check(self, context: SendContext) -> Check:
        """A QIDO-RS search for one study (``GET <url>/studies?limit=1``) with the destination's credentials: the
        service answers and takes them (a STOW-only service that refuses searches fails this check)."""
        answer = http_check(self, "studies?limit=1", "application/dicom+json", context)
        if isinstance(answer, Check):
            return answer
        return Check(True, f"QIDO-RS {answer.url}: HTTP {answer.status_code}")

    def send(self, items: list[Item], context: SendContext) -> list[Outcome]:
        import pydicom
        import requests
        from dicomweb_client.api import DICOMwebClient
        from pydicom.errors import InvalidDicomError

        outcomes, datasets = [], {}
        for item in items:
            try:
                datasets[item] = pydicom.dcmread(item.path)
            except (OSError, InvalidDicomError) as e:
                outcomes.append(Outcome(item, False, f"cannot read {item.name} from the outbox: {e}"))
        if not datasets:
            return outcomes
        try:
            session = http_session(self.auth)  # credentials on the session: the library logs request headers
        except SecretError as e:
            return outcomes + [Outcome(item, False, f"credentials for {self.url}: {e}") for item in datasets]
        t = context.timeouts
        client = DICOMwebClient(self.url, session=session, stow_url_prefix=self.stow_url_prefix,
                                timeout=(t.connect_seconds, t.network_seconds))
        client.set_http_retry_params(retry=False)  # egress retries, with its back-off and its record
        try:
            with session:
                answer = client.store_instances(list(datasets.values()))
        except requests.HTTPError as e:
            status = e.response.status_code if e.response is not None else "?"
            body = e.response.text[:200] if e.response is not None else ""
            why = "authentication refused" if status in (401, 403) else body
            return outcomes + [Outcome(item, False, f"STOW-RS {self.url}: HTTP {status} {why}".rstrip())
                               for item in datasets]
        except requests.Timeout:
            return outcomes + [Outcome(item, False, f"STOW-RS {self.url}: timed out after {t.network_seconds:g} s")
                               for item in datasets]
        except (requests.RequestException, ValueError) as e:
            return outcomes + [Outcome(item, False, f"STOW-RS {self.url}: {http_failure(e)}") for item in datasets]
        return outcomes + self._per_instance(answer, datasets)

    def _per_instance(self, answer: Any, datasets: dict[Item, Any]) -> list[Outcome]:
        """Each item settled by the server's Store Instances Response."""
        stored = {str(ref.ReferencedSOPInstanceUID) for ref in answer.get("ReferencedSOPSequence", [])}
        refused = {str(ref.ReferencedSOPInstanceUID): int(ref.get("FailureReason", 0))
                   for ref in answer.get("FailedSOPSequence", [])}
        outcomes = []
        for item, ds in datasets.items():
            uid = str(ds.SOPInstanceUID)
            if uid in stored:
                outcomes.append(Outcome(item, True, f"{item.name} → {self.describe()}", sent_uid=uid))
            elif uid in refused:
                code = refused[uid]
                outcomes.append(Outcome(item, False, f"STOW-RS {self.url} refused {item.name}: failure reason "
                                                     f"0x{code:04X} ({_FAILURE_REASONS.get(code, 'unknown')})"))
            else:
                outcomes.append(Outcome(item, False, f"STOW-RS {self.url} did not confirm {item.name}"))
        return outcomes
