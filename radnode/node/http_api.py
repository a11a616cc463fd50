"""The node's small HTTP endpoint: events from the Orthanc plugin, a health check and the job list (stdlib,
loopback).

``POST /orthanc/events`` with a JSON object (``{"type": "stored", "id": ORTHANC_INSTANCE_ID, "remote_aet": …}``
or ``{"type": "stable-study", "id": ORTHANC_STUDY_ID}``) answers 202 at once: the event is queued and the
node fetches from Orthanc in its own thread, so the plugin's HTTP call never waits for the work.
``GET /health`` answers the job counts by state and how many are flagged for review.
``GET /jobs`` answers every job, oldest first (``{"jobs": [...]}``, see :func:`job_json`), filtered by
``?state=done`` and ``?needs_review=true`` (flagged for human review) or ``false`` (assessed, not flagged):
a radiologist's review worklist. ``GET /jobs/ID`` answers one job with its event log.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from radnode.node.store import Event, Job, JobState

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 64 * 1024
"""Events are a few hundred bytes; anything larger is refused unread."""

_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def job_json(job: Job) -> dict[str, Any]:
    """A job as the API answers it. ``needs_review``: true when the run flagged the study for human review,
    false when its uncertainty was within the limits, null when not assessed (no uncertainty, or not run).
    ``purged_at``: when retention removed the job's files (null: they are kept). ``sibling_of``: the study's
    main job when this job runs another pipeline the rules selected for it (null for the main job). ``reason``:
    why it failed, or why the study was not processed (``not processed: …``, e.g. the node's own results come
    back); ``own_results``: instances recorded with the job that are results of the node's own (never
    processed). ``priority``: stat, routine or off-peak."""
    return {"id": job.id, "study_instance_uid": job.study_instance_uid, "patient_id": job.patient_id,
            "pipeline": job.pipeline, "state": job.state.value, "reason": job.reason,
            "needs_review": job.needs_review, "review_reasons": list(job.review_reasons),
            "priority": job.priority.value, "calling_ae": job.calling_ae, "peer_address": job.peer_address,
            "instances": job.instances, "late_instances": job.late_instances, "runs": job.runs,
            "created_at": job.created_at, "updated_at": job.updated_at, "purged_at": job.purged_at,
            "sibling_of": job.sibling_of, "own_results": job.own_results}


def job_filters(query: Mapping[str, list[str]]) -> dict[str, Any]:
    """``state`` and ``needs_review`` from a query string's parameters; ValueError names a bad one."""
    unknown = set(query) - {"state", "needs_review"}
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(sorted(unknown))}; known: state, needs_review")
    filters: dict[str, Any] = {}
    if "state" in query:
        try:
            filters["state"] = JobState(query["state"][-1])
        except ValueError:
            raise ValueError(f"state {query['state'][-1]!r}: expected one of "
                             f"{', '.join(s.value for s in JobState)}") from None
    if "needs_review" in query:
        value = query["needs_review"][-1].lower()
        if value not in _BOOLEANS:
            raise ValueError(f"needs_review {value!r}: expected true or false")
        filters["needs_review"] = _BOOLEANS[value]
    return filters


class _Handler(BaseHTTPRequestHandler):
    server: "_ApiServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's signature
        log.debug("api: " + format, *args)

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        if url.path == "/health":
            self._answer(200, self.server.health())
        elif parts == ["jobs"]:
            try:
                filters = job_filters(parse_qs(url.query, keep_blank_values=True))
            except ValueError as e:
                self._answer(400, {"error": str(e)})
                return
            self._answer(200, {"jobs": [job_json(job) for job in self.server.source.jobs(**filters)]})
        elif len(parts) == 2 and parts[0] == "jobs" and parts[1].isdigit():
            job = self.server.source.job(int(parts[1]))
            if job is None:
                self._answer(404, {"error": f"no job {parts[1]}"})
                return
            events = [{"at": e.at, "kind": e.kind, "message": e.message} for e in self.server.source.events(job.id)]
            self._answer(200, {**job_json(job), "events": events})
        else:
            self._answer(404, {"error": f"no resource {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/orthanc/events":
            self._answer(404, {"error": f"no resource {self.path}"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_EVENT_BYTES:
            self._answer(413, {"error": "event too large"})
            self.close_connection = True
            return
        try:
            event = json.loads(self.rfile.read(length))
            self.server.on_event(event)
        except (ValueError, TypeError) as e:
            self._answer(400, {"error": str(e)})
            return
        self._answer(202, {"queued": True})


class JobSource(Protocol):
    """What the job endpoints read (the node, or its job store)."""

    def jobs(self, state: JobState | None = None, needs_review: bool | None = None) -> list[Job]: ...

    def job(self, job_id: int) -> Job | None: ...

    def events(self, job_id: int, after_id: int = 0) -> list[Event]: ...


class _NoJobs:
    def jobs(self, state: JobState | None = None, needs_review: bool | None = None) -> list[Job]:
        return []

    def job(self, job_id: int) -> Job | None:
        return None

    def events(self, job_id: int, after_id: int = 0) -> list[Event]:
        return []


class _ApiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], on_event: Callable[[Any], None],
                 health: Callable[[], dict[str, Any]], jobs: JobSource | None) -> None:
        super().__init__(address, _Handler)
        self.on_event = on_event
        self.health = health
        self.source: JobSource = jobs if jobs is not None else _NoJobs()


class NodeApi:
    """The HTTP listener in a thread; ``on_event`` must only validate and queue (it raises ValueError to refuse);
    ``jobs`` answers the job endpoints (without it they list nothing)."""

    def __init__(self, host: str, port: int, on_event: Callable[[Any], None],
                 health: Callable[[], dict[str, Any]], jobs: JobSource | None = None) -> None:
        self._server = _ApiServer((host, port), on_event, health, jobs)
        self._thread = threading.Thread(target=self._server.serve_forever, name="radnode-api", daemon=True)

    @property
    def port(self) -> int:
        """The port listened on (useful with port 0)."""
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()
        log.info("HTTP API listening on %s:%d", self._server.server_address[0], self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
