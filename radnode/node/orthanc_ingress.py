"""Ingress from Orthanc: the plugin's events, turned into instances pulled over Orthanc's REST API.

A ``stored`` event pulls one instance (``GET /instances/{id}/file``) into the spool through the same
:class:`Ingest` as the node's own SCP, so routing, indexing and jobs are shared. A ``stable-study``
event first pulls any instance of the study the node does not have (an event lost while the node was
down or busy is caught up here; no instance is lost), then marks the study's series complete: Orthanc
shows no association release, its StableAge is the release signal of this path.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import requests

from radnode.config import OrthancConfig
from radnode.node.scp import Ingest, Origin, Refused

log = logging.getLogger(__name__)

EVENT_TYPES = ("stored", "stable-study")
RETRY_SECONDS = (0.5, 2.0, 5.0)
"""Waits between attempts at an event Orthanc could not answer; then it is dropped (stable-study catches up)."""


def validate_event(event: Any) -> dict[str, str]:
    """The event as the plugin sends it, or ValueError saying what is wrong."""
    if not isinstance(event, dict) or event.get("type") not in EVENT_TYPES:
        raise ValueError(f"expected an object with type in {EVENT_TYPES}")
    if not isinstance(event.get("id"), str) or not event["id"].replace("-", "").isalnum():
        raise ValueError("expected 'id': an Orthanc resource id")
    return {"type": event["type"], "id": event["id"], "remote_aet": str(event.get("remote_aet") or "")}


class OrthancIngress:
    """A queue of plugin events and the thread that carries them out against Orthanc's REST API."""

    def __init__(self, config: OrthancConfig, ingest: Ingest, timeout: float = 30.0) -> None:
        if not config.url:
            raise ValueError("orthanc.url is not configured")
        self.url = config.url
        self.ingest = ingest
        self.timeout = timeout
        self._session = requests.Session()
        if config.username:
            self._session.auth = (config.username, config.password.reveal() if config.password else "")
        self._events: queue.Queue[dict[str, str] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="radnode-orthanc-ingress", daemon=True)

    def submit(self, event: Any) -> None:
        """Validate and queue one event (called from the HTTP handler; returns at once)."""
        self._events.put(validate_event(event))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the event in hand and stop; queued events are dropped (Orthanc keeps the instances)."""
        self._events.put(None)
        self._thread.join()
        self._session.close()

    def _run(self) -> None:
        while (event := self._events.get()) is not None:
            for wait in (*RETRY_SECONDS, None):
                try:
                    self._handle(event)
                    break
                except (requests.RequestException, ValueError, KeyError, OSError) as e:  # OSError: disk low
                    if wait is None:
                        log.error("Orthanc event %s %s dropped: %s", event["type"], event["id"], e)
                    else:
                        log.warning("Orthanc event %s %s failed (%s); retry in %g s", event["type"], event["id"],
                                    e, wait)
                        time.sleep(wait)

    def _get(self, path: str) -> requests.Response:
        response = self._session.get(f"{self.url}{path}", timeout=self.timeout)
        response.raise_for_status()
        return response

    def _handle(self, event: dict[str, str]) -> None:
        if event["type"] == "stored":
            self._pull(event["id"], event["remote_aet"])
            return
        study = self._get(f"/studies/{event['id']}").json()
        for instance in self._get(f"/studies/{event['id']}/instances").json():
            if not self.ingest.store.has_instance(instance["MainDicomTags"].get("SOPInstanceUID", "")):
                self._pull(instance["ID"], "")
        marked = self.ingest.store.study_stable(study["MainDicomTags"]["StudyInstanceUID"])
        log.info("study %s stable in Orthanc: %d series marked complete", event["id"], marked)

    def _pull(self, instance_id: str, remote_aet: str) -> None:
        """Fetch one instance's file from Orthanc and ingest it as it is stored there."""
        data = self._get(f"/instances/{instance_id}/file").content
        origin = Origin(remote_aet, f"orthanc {self.url}", "orthanc")
        try:
            self.ingest.receive(data, b"", origin)
        except Refused as e:
            log.warning("Orthanc instance %s not taken: %s", instance_id, e)
