"""The Orthanc the node works with (``orthanc.url``): results are stored into it with ``POST /instances``, so its
own routing, viewers and DICOMweb see them. ``orthanc-modality`` and ``orthanc-dicomweb`` build on this type.
"""

from __future__ import annotations

from typing import Any, Literal

from radnode.destinations.base import (
    Check, Destination, DestinationError, Item, Outcome, SendContext, sop_instance_uid,
)
from radnode.destinations.credentials import http_failure
from radnode.destinations.registry import destination_type
from radnode.security.secrets import SecretError


class OrthancRequestError(RuntimeError):
    """An Orthanc REST call that failed; the message says which call and why."""


@destination_type
class OrthancDestination(Destination):
    """``{type: orthanc}``; one line: ``orthanc``. Needs ``orthanc.url`` in the node's configuration."""

    kind = "orthanc"
    type: Literal["orthanc"] = "orthanc"

    @classmethod
    def shorthand(cls, argument: str) -> dict[str, Any]:
        if argument:
            raise DestinationError(f"'orthanc' takes no argument (got 'orthanc:{argument}'); for one of Orthanc's "
                             "modalities write orthanc-modality:NAME")
        return {}

    def describe(self) -> str:
        return "Orthanc"

    def send(self, items: list[Item], context: SendContext) -> list[Outcome]:
        outcomes, stored = self.store_into_orthanc(items, context)
        return outcomes + [Outcome(item, True, f"{item.name} → Orthanc (instance {orthanc_id})",
                                   sent_uid=sop_instance_uid(item.path)) for item, orthanc_id in stored]

    def check(self, context: SendContext) -> Check:
        """``GET /system`` of the node's Orthanc: it answers and takes the node's credentials."""
        if not context.orthanc.url:
            return Check(False, "orthanc.url is not configured")
        try:
            version = self.orthanc_request(context, "GET", "/system").json().get("Version", "?")
        except (OrthancRequestError, ValueError, AttributeError) as e:
            return Check(False, f"Orthanc {context.orthanc.url}: {e}")
        return Check(True, f"Orthanc {version} at {context.orthanc.url}")

    def store_into_orthanc(self, items: list[Item], context: SendContext
                           ) -> tuple[list[Outcome], list[tuple[Item, str]]]:
        """``POST /instances`` for each item: failures as outcomes, and (item, Orthanc id) of those stored."""
        failed, stored = [], []
        for item in items:
            try:
                answer = self.orthanc_request(context, "POST", "/instances", data=item.path.read_bytes(),
                                              headers={"Content-Type": "application/dicom"}).json()
                stored.append((item, str(answer["ID"])))
            except (OrthancRequestError, OSError, ValueError, KeyError) as e:
                failed.append(Outcome(item, False, f"store into Orthanc: {e}"))
        return failed, stored

    @staticmethod
    def orthanc_request(context: SendContext, method: str, path: str, **kwargs: Any) -> Any:
        """One call to the node's Orthanc with the destination's timeouts; raises for every failure."""
        import requests

        orthanc = context.orthanc
        if not orthanc.url:
            raise OrthancRequestError("orthanc.url is not configured")
        timeout = (context.timeouts.connect_seconds, context.timeouts.network_seconds)
        try:
            auth = (orthanc.username, orthanc.password.reveal() if orthanc.password else "") if orthanc.username \
                else None
        except SecretError as e:
            raise OrthancRequestError(f"orthanc.password: {e}") from None
        try:
            response = requests.request(method, f"{orthanc.url}{path}", auth=auth, timeout=timeout, **kwargs)
        except requests.Timeout:
            raise OrthancRequestError(f"{method} {path}: timed out after {context.timeouts.network_seconds:g} s"
                                      ) from None
        except requests.RequestException as e:
            raise OrthancRequestError(f"{method} {path}: {http_failure(e)}") from None
        if response.status_code >= 400:
            raise OrthancRequestError(f"{method} {path}: HTTP {response.status_code} {response.text[:200]}")
        return response


class OrthancRelay(OrthancDestination):
    """A destination Orthanc sends to: results are stored into Orthanc, then Orthanc sends them on in one
    synchronous job (``orthanc_path``); they are delivered only when that job succeeded."""

    def orthanc_path(self) -> str:
        """The Orthanc call that sends stored instances on."""
        raise NotImplementedError

    def send(self, items: list[Item], context: SendContext) -> list[Outcome]:
        outcomes, stored = self.store_into_orthanc(items, context)
        if not stored:
            return outcomes
        path = self.orthanc_path()
        try:
            self.orthanc_request(context, "POST", path, json={"Resources": [i for _, i in stored], "Synchronous": True})
        except OrthancRequestError as e:
            return outcomes + [Outcome(item, False, f"Orthanc {e}") for item, _ in stored]
        return outcomes + [Outcome(item, True, f"{item.name} → {self.describe()} via Orthanc",
                                   sent_uid=sop_instance_uid(item.path)) for item, _ in stored]
