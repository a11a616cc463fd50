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
        """Each item stored into Orthanc and its outcome handed to egress at once, so a kill mid-send never loses
        the record of one already stored."""
        return [context.answered(self.send_one(item, context)) for item in items]

    def send_one(self, item: Item, context: SendContext) -> Outcome:
        """One item's delivery: stored into Orthanc."""
        try:
            orthanc_id = self.store_into_orthanc(item, context)
        except OrthancRequestError as e:
            return Outcome(item, False, f"store into Orthanc: {e}")
        return Outcome(item, True, f"{item.name} → Orthanc (instance {orthanc_id})",
                       sent_uid=sop_instance_uid(item.path))

    def check(self, context: SendContext) -> Check:
        """``GET /system`` of the node's Orthanc: it answers and takes the node's credentials."""
        if not context.orthanc.url:
            return Check(False, "orthanc.url is not configured")
        try:
            version = self.orthanc_request(context, "GET", "/system").json().get("Version", "?")
        except (OrthancRequestError, ValueError, AttributeError) as e:
            return Check(False, f"Orthanc {context.orthanc.url}: {e}")
        return Check(True, f"Orthanc {version} at {context.orthanc.url}")

    def store_into_orthanc(self, item: Item, context: SendContext) -> str:
        """``POST /instances`` of one item; its Orthanc id, or OrthancRequestError saying why not."""
        try:
            data = item.path.read_bytes()
        except OSError as e:
            raise OrthancRequestError(f"cannot read {item.name}: {e.strerror}") from None
        answer = self.orthanc_request(context, "POST", "/instances", data=data,
                                      headers={"Content-Type": "application/dicom"})
        try:
            return str(answer.json()["ID"])
        except (ValueError, KeyError, TypeError):
            raise OrthancRequestError(f"POST /instances: answer without an instance ID: {answer.text[:200]}") from None

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
    """A destination Orthanc sends to: each result is stored into Orthanc, then Orthanc sends it on in a
    synchronous job of its own (``orthanc_path``); it is delivered only when that job succeeded. One job per item,
    so when the peer refuses one result the others are recorded delivered and a re-send sends only that one
    (Orthanc's job reports success or failure for all its instances together)."""

    def orthanc_path(self) -> str:
        """The Orthanc call that sends stored instances on."""
        raise NotImplementedError

    def send_one(self, item: Item, context: SendContext) -> Outcome:
        try:
            orthanc_id = self.store_into_orthanc(item, context)
        except OrthancRequestError as e:
            return Outcome(item, False, f"store into Orthanc: {e}")
        try:
            self.orthanc_request(context, "POST", self.orthanc_path(), json={"Resources": [orthanc_id],
                                                                             "Synchronous": True})
        except OrthancRequestError as e:
            return Outcome(item, False, f"Orthanc {e}")
        return Outcome(item, True, f"{item.name} → {self.describe()} via Orthanc",
                       sent_uid=sop_instance_uid(item.path))
