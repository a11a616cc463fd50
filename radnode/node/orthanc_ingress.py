"""Ingress from Orthanc: the plugin's events, turned into instances pulled over Orthanc's REST API.

A ``stored`` event pulls one instance (``GET /instances/{id}/file``) into the spool through the same
:class:`Ingest` as the node's own SCP, so routing, indexing and jobs are shared. A ``stable-study``
event first pulls any instance of the study the node does not have (an event lost while the node was
down or busy is caught up here; no instance is lost), then marks the study's series complete: Orthanc
shows no association release, its StableAge is the release signal of this path.

A stable-study event the plugin could not deliver (the node was stopped, or could not take it) is caught up
from Orthanc's own change log (``GET /changes``): at each start the node handles every study that became
stable since its previous start (``checkpoint`` keeps where the log was then), and only then moves the
checkpoint on; the first start only records where the log is. Events still queued when the node stops are
dropped the same way (a stop must not wait out Orthanc's retries) and caught up at the next start.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any

import requests

from radnode.config import OrthancConfig
from radnode.node.scp import Ingest, Origin, Refused

log = logging.getLogger(__name__)

EVENT_TYPES = ("stored", "stable-study")
RETRY_SECONDS = (0.5, 2.0, 5.0)
"""Waits between attempts at an event Orthanc could not answer; then it is dropped (stable-study catches up)."""
CHANGES_PAGE = 1000
"""Changes read per ``GET /changes`` while catching up."""


def validate_event(event: Any) -> dict[str, str]:
    """The event as the plugin sends it, or ValueError saying what is wrong."""
    if not isinstance(event, dict) or event.get("type") not in EVENT_TYPES:
        raise ValueError(f"expected an object with type in {EVENT_TYPES}")
    if not isinstance(event.get("id"), str) or not event["id"].replace("-", "").isalnum():
        raise ValueError("expected 'id': an Orthanc resource id")
    return {"type": event["type"], "id": event["id"], "remote_aet": str(event.get("remote_aet") or "")}


class OrthancIngress:
    """A queue of plugin events and the thread that carries them out against Orthanc's REST API."""

    def __init__(self, config: OrthancConfig, ingest: Ingest, timeout: float = 30.0,
                 checkpoint: Path | None = None) -> None:
        if not config.url:
            raise ValueError("orthanc.url is not configured")
        self.url = config.url
        self.ingest = ingest
        self.timeout = timeout
        self.checkpoint = checkpoint
        """The file keeping the sequence number Orthanc's change log had at the node's previous start (None: no
        catch-up)."""
        self._session = requests.Session()
        if config.username:
            self._session.auth = (config.username, config.password.reveal() if config.password else "")
        self._events: queue.Queue[dict[str, str] | None] = queue.Queue()
        self._stopping = threading.Event()
        """Set by :meth:`stop`: no queued event is handled any more and a retry wait ends at once."""
        self._thread = threading.Thread(target=self._run, name="radnode-orthanc-ingress", daemon=True)

    def submit(self, event: Any) -> None:
        """Validate and queue one event (called from the HTTP handler; returns at once)."""
        self._events.put(validate_event(event))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the attempt in hand and stop; queued events and retries are dropped (Orthanc keeps the instances,
        the next start's catch-up pulls them): with Orthanc down, each would hold the stop for seconds."""
        self._stopping.set()
        self._events.put(None)
        self._thread.join()
        self._session.close()

    def _run(self) -> None:
        self._catch_up()
        while (event := self._events.get()) is not None and not self._stopping.is_set():
            self._carry_out(event)

    def _carry_out(self, event: dict[str, str]) -> bool:
        """Handle one event, retrying what Orthanc or the disk could not do; False when it was dropped (retries
        given up, or the node stopping)."""
        for wait in (*RETRY_SECONDS, None):
            if self._stopping.is_set():
                log.info("Orthanc event %s %s dropped: the node is stopping", event["type"], event["id"])
                return False
            try:
                self._handle(event)
                return True
            except requests.HTTPError as e:
                if e.response is not None and e.response.status_code == 404:  # deleted from Orthanc since
                    log.info("Orthanc event %s %s: no longer in Orthanc, nothing to pull", event["type"], event["id"])
                    return True
                error: Exception = e
            except (requests.RequestException, ValueError, KeyError, OSError) as e:  # OSError: disk low
                error = e
            if wait is None:
                log.error("Orthanc event %s %s dropped: %s", event["type"], event["id"], error)
            else:
                log.warning("Orthanc event %s %s failed (%s); retry in %g s", event["type"], event["id"], error, wait)
                self._stopping.wait(wait)
        return False

    def _catch_up(self) -> None:
        """Handle the studies Orthanc's change log says became stable since the previous start (their events may
        never have reached the node), then record where the log is now; the first start only records it. A study
        not handled, or an Orthanc that does not answer, leaves the checkpoint for the next start to try again."""
        if self.checkpoint is None:
            return
        try:
            last = int(self._get("/changes?last").json()["Last"])
            since = int(self.checkpoint.read_text()) if self.checkpoint.exists() else None
            studies: list[str] = []
            while since is not None and since < last:
                page = self._get(f"/changes?since={since}&limit={CHANGES_PAGE}").json()
                studies += [c["ID"] for c in page["Changes"] if c["ChangeType"] == "StableStudy" and c["Seq"] <= last
                            and c["ID"] not in studies]
                if page["Done"] or not page["Changes"]:
                    break
                since = int(page["Last"])
        except (requests.RequestException, ValueError, KeyError, TypeError, OSError) as e:
            log.error("Orthanc's change log cannot be read (%s): studies it took while the node was stopped are "
                      "pulled when their next event comes, or at the next start", e)
            return
        if studies:
            log.info("catching up with %d study(ies) Orthanc reported stable while the node was stopped", len(studies))
        handled = [self._carry_out({"type": "stable-study", "id": study, "remote_aet": ""}) for study in studies]
        if all(handled):
            partial = self.checkpoint.with_name(self.checkpoint.name + ".partial")
            partial.write_text(str(last))
            os.replace(partial, self.checkpoint)

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
        if not study.get("IsStable", True):  # receiving again since the event (one caught up at start, say)
            log.info("study %s receiving again in Orthanc: its next stable-study event completes it", event["id"])
            return
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
