"""The node's small HTTP endpoint: events from the Orthanc plugin and a health check (stdlib, loopback).

``POST /orthanc/events`` with a JSON object (``{"type": "stored", "id": ORTHANC_INSTANCE_ID, "remote_aet": …}``
or ``{"type": "stable-study", "id": ORTHANC_STUDY_ID}``) answers 202 at once: the event is queued and the
node fetches from Orthanc in its own thread, so the plugin's HTTP call never waits for the work.
``GET /health`` answers the job counts by state.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 64 * 1024
"""Events are a few hundred bytes; anything larger is refused unread."""


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
        if self.path == "/health":
            self._answer(200, self.server.health())
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


class _ApiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], on_event: Callable[[Any], None],
                 health: Callable[[], dict[str, Any]]) -> None:
        super().__init__(address, _Handler)
        self.on_event = on_event
        self.health = health


class NodeApi:
    """The HTTP listener in a thread; ``on_event`` must only validate and queue (it raises ValueError to refuse)."""

    def __init__(self, host: str, port: int, on_event: Callable[[Any], None],
                 health: Callable[[], dict[str, Any]]) -> None:
        self._server = _ApiServer((host, port), on_event, health)
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
