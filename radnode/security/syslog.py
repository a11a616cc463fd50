"""Audit messages to a syslog collector: RFC 5424 format over TLS (RFC 5425) or UDP (RFC 5426), as IHE
ATNA's Record Audit Event transaction (ITI-20) sends them.

Each message: ``<85>1 TIMESTAMP HOST radnode PID IHE+RFC-3881 - BOM<AuditMessage …>`` (facility 10
security/authorization, severity 5 notice; MSGID as ITI-20 asks; the XML as UTF-8 with its BOM). Over TLS each
frame is ``LENGTH SP MESSAGE`` (octet counting). Sending happens in a thread of its own from a bounded
queue, so a slow or absent collector never holds up ingress; the local audit log has every message whatever
the collector does. While the collector is unreachable the sender reconnects with back-off and keeps up to
:data:`QUEUE_LIMIT` messages, logging (once per outage) what it drops beyond that.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import queue
import socket
import ssl
import threading
import time

from radnode.config import SyslogConfig

log = logging.getLogger(__name__)

PRIORITY = 10 * 8 + 5
"""Facility 10 (security/authorization messages), severity 5 (notice)."""
MSGID = "IHE+RFC-3881"
BOM = "\ufeff"
QUEUE_LIMIT = 10000
MAX_UDP_BYTES = 65000


def rfc5424(message: str, hostname: str, app_name: str, timestamp: dt.datetime | None = None) -> bytes:
    """One RFC 5424 syslog message carrying ``message`` (UTF-8, with the BOM RFC 5424 6.4 asks for)."""
    stamp = (timestamp or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="milliseconds")
    header = f"<{PRIORITY}>1 {stamp} {hostname[:255] or '-'} {app_name[:48]} {os.getpid()} {MSGID} -"
    return f"{header} {BOM}{message}".encode("utf-8")


class SyslogSender:
    """Sends messages to one collector from a background thread (see the module docstring)."""

    def __init__(self, config: SyslogConfig, hostname: str, app_name: str = "radnode") -> None:
        self.config, self.hostname, self.app_name = config, hostname, app_name
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_LIMIT)
        self._context: ssl.SSLContext | None = None
        if config.transport == "tls":
            from radnode.security.tls import client_context

            self._context = client_context(config.tls, "audit.syslog.tls")
        self.sent = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="radnode-audit-syslog", daemon=True)
        self._thread.start()

    def send(self, message: str) -> None:
        """Queue one message (never blocks; a full queue drops it and says so once)."""
        try:
            self._queue.put_nowait(rfc5424(message, self.hostname, self.app_name))
        except queue.Full:
            if not self.dropped:
                log.error("audit syslog %s:%d: %d messages queued and not delivered; dropping new ones (they are "
                          "in the local audit log)", self.config.host, self.config.port, QUEUE_LIMIT)
            self.dropped += 1

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (up to ``timeout`` seconds), then stop the thread."""
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()) + 0.5)

    def _connect(self) -> socket.socket:
        host, port = self.config.host, self.config.port
        if self.config.transport == "udp":
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.connect((host, port))
            return sock
        raw = socket.create_connection((host, port), timeout=10)
        assert self._context is not None
        return self._context.wrap_socket(raw, server_hostname=host)

    def _run(self) -> None:
        sock: socket.socket | None = None
        pending: bytes | None = None
        backoff = 0.5
        outage_logged = False
        while True:
            if pending is None:
                pending = self._queue.get()
                if pending is None:
                    break
            try:
                if sock is None:
                    sock = self._connect()
                if self.config.transport == "udp":
                    sock.send(pending[:MAX_UDP_BYTES])
                else:
                    sock.sendall(f"{len(pending)} ".encode() + pending)
                self.sent += 1
                pending = None
                backoff = 0.5
                if outage_logged:
                    log.warning("audit syslog %s:%d reachable again", self.config.host, self.config.port)
                    outage_logged = False
            except (OSError, ssl.SSLError) as e:
                if not outage_logged:
                    log.error("audit syslog %s:%d (%s): %s; retrying (messages stay in the local audit log)",
                              self.config.host, self.config.port, self.config.transport, e)
                    outage_logged = True
                if sock is not None:
                    sock.close()
                    sock = None
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
        if sock is not None:
            sock.close()
