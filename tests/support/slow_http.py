"""A slow EHR for kill tests: a TCP proxy in a thread that holds every POST for some seconds, then relays it.

Each client connection gets its own connection to the real server. Requests from the client are read whole
(headers and ``Content-Length`` body); a POST is recorded (``posts``) the moment it has arrived, held for
``delay`` seconds and then forwarded even if the client has died meanwhile, as a real server that is slow to
answer still files what it was sent. Answers are relayed back as they come.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType


class DelayingProxy:
    """``with DelayingProxy(upstream_port, delay=5.0) as proxy:`` then point a client at ``proxy.port``."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.upstream_port, self.delay = upstream_port, delay
        self.posts: list[bytes] = []
        """Bodies of the POSTs received so far, in order of arrival (before they are relayed)."""
        self._lock = threading.Lock()
        self._unanswered = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="delaying-proxy").start()

    def __enter__(self) -> DelayingProxy:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def posted(self) -> list[bytes]:
        with self._lock:
            return list(self.posts)

    def settled(self) -> bool:
        """Whether the server has begun to answer every POST received (so it has filed them all)."""
        with self._lock:
            return self._unanswered == 0

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        waiting = [0]  # POSTs of this connection relayed to the server and not yet answered
        threading.Thread(target=self._relay_answers, args=(upstream, client, waiting), daemon=True).start()
        buffered = b""
        try:
            while True:
                request, buffered = self._read_request(client, buffered)
                if request is None:
                    break
                head, _, body = request.partition(b"\r\n\r\n")
                if head.startswith(b"POST "):
                    with self._lock:
                        self.posts.append(body)
                        self._unanswered += 1
                    time.sleep(self.delay)
                    with self._lock:
                        waiting[0] += 1
                upstream.sendall(request)  # relayed even when the client is gone by now
        except OSError:
            pass
        finally:
            client.close()
            time.sleep(self.delay + 5)  # let the server answer what was relayed before hanging up
            upstream.close()

    @staticmethod
    def _read_request(client: socket.socket, buffered: bytes) -> tuple[bytes | None, bytes]:
        """One whole HTTP request (head and ``Content-Length`` body) and the bytes read past it."""
        while b"\r\n\r\n" not in buffered:
            chunk = client.recv(65536)
            if not chunk:
                return None, b""
            buffered += chunk
        head, _, rest = buffered.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            chunk = client.recv(65536)
            if not chunk:
                return None, b""
            rest += chunk
        return head + b"\r\n\r\n" + rest[:length], rest[length:]

    def _relay_answers(self, upstream: socket.socket, client: socket.socket, waiting: list[int]) -> None:
        try:
            while chunk := upstream.recv(65536):
                with self._lock:
                    if waiting[0] and chunk.startswith(b"HTTP/"):
                        waiting[0] -= 1
                        self._unanswered -= 1
                try:
                    client.sendall(chunk)
                except OSError:
                    pass  # the client died: the server's answer is dropped, as on a real network
        except OSError:
            pass
