"""The web service in a thread: uvicorn (asyncio, one event loop) serving the console's FastAPI app.

Connections cost a socket on the event loop, not a thread: blocking work (the job store) runs in AnyIO's
bounded thread pool. ``api.max_connections`` caps open connections and requests together (beyond it uvicorn
answers 503 at once), and a connection with no request in progress is closed after
``api.idle_timeout_seconds``: uvicorn alone starts that clock only after a first response, so a client that
connects and never sends a byte (or trickles a request's headers) would hold its slot for ever; here the clock
also runs from the connection's start until a whole request head has arrived.

With ``api.tls`` the listener speaks HTTPS only (TLS 1.2 or newer).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from radnode.config import ApiConfig

log = logging.getLogger(__name__)


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head, from the connection's start."""

    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a whole request head arrived: the request's own handling takes over

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"web service cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class WebServer:
    """uvicorn serving ``app`` on ``api.host:api.port`` in its own thread; ``start`` returns once it listens."""

    def __init__(self, app: object, config: ApiConfig) -> None:
        self.config = config
        self._socket = _listening_socket(config.host, config.port)
        tls = config.tls
        self._uvicorn = uvicorn.Server(uvicorn.Config(
            app, http=BoundedH11Protocol, ws="none", lifespan="off", log_config=None, access_log=False,
            limit_concurrency=config.max_connections, timeout_keep_alive=max(1, round(config.idle_timeout_seconds)),
            ssl_certfile=str(tls.certificate) if tls else None, ssl_keyfile=str(tls.private_key) if tls else None,
            server_header=False, timeout_graceful_shutdown=5))
        if tls:
            self._check_tls()
        self._thread = threading.Thread(target=self._run, name="radnode-web", daemon=True)

    def _check_tls(self) -> None:
        """Load the certificate now, so a wrong path or key is refused at start with its file named."""
        config = self._uvicorn.config
        try:
            config.load()
        except (ssl.SSLError, OSError) as e:
            self._socket.close()
            raise ValueError(f"api.tls: certificate {self.config.tls.certificate} / key "  # type: ignore[union-attr]
                             f"{self.config.tls.private_key} cannot be used ({e})") from None
        assert config.ssl is not None
        config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1]

    @property
    def scheme(self) -> str:
        return "https" if self.config.tls else "http"

    def _run(self) -> None:
        self._uvicorn.run(sockets=[self._socket])

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout / 0.02)):
            if self._uvicorn.started or not self._thread.is_alive():
                break
            deadline.wait(0.02)
        if not self._uvicorn.started:
            raise RuntimeError(f"web service did not start on {self.config.host}:{self.port}")
        log.info("web console and API on %s://%s:%d (OpenAPI at /openapi.json)", self.scheme, self.config.host,
                 self.port)

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()
