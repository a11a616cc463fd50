"""Several Storage SCP processes sharing the node's DICOM port (``ingress.receivers``), so concurrent senders
are received by several interpreters instead of queueing on one.

pynetdicom serves each association with two polling threads in one interpreter; with many senders at once the
receiving process is bound by that interpreter, not by the disk (8 senders cost it 2.5× the CPU per instance of
one). With ``ingress.receivers: N`` the node starts N receiver processes, each a whole :class:`StorageSCP` with
its own job store connection, spool writer, disk guard and audit trail, all accepting on the listening
socket(s) the node's process made and passed down (the pre-fork model of nginx and gunicorn: whichever receiver
is free first takes the next connection, so a busy one is not handed more). What must hold for the node as a
whole is shared between them in :class:`SharedAssociations`: the association limits (``max_associations`` in
all, ``max_associations_per_peer`` / ``peers``) and the refusal counters the metrics report.

The node's process holds the listening sockets for as long as it runs (a receiver that dies is started again on
them; no connection is refused meanwhile, the others take it), recovers the spool before any receiver starts,
and stops them on shutdown; a receiver ends by itself when the node's process is gone (its stdin closes). Orthanc and STOW-RS ingress stay in the node's
process, through the same :class:`Ingest`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from radnode.config import Config
from radnode.node.scp import Refusals

log = logging.getLogger(__name__)

READY = "listening"
"""What a receiver prints on its standard output once it listens."""
START_TIMEOUT_SECONDS = 120.0
"""How long the node waits for a receiver to listen (imports and the store's first connection)."""
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Waits before starting a receiver that died again, growing while it keeps dying within a minute."""


class Admission(NamedTuple):
    """An association request's answer: its slot's ticket (None: refused) and what the node held when asked."""

    ticket: str | None
    held: int
    """Associations the node held, over every receiver."""
    held_by_peer: int
    """Of those, the calling AE's."""


class SharedAssociations:
    """Association slots and refusal counters shared by the receiver processes of one node: a small JSON file
    read and rewritten under an exclusive ``flock`` (once per association request, never per instance).

    A slot names the process holding it; slots of a process that is gone are dropped at the next request, and
    each process drops its own slots for associations it no longer holds, so neither a crashed receiver nor a
    connection that ended without an event keeps a slot.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = folder / "associations.json"
        self._lock_path = folder / "associations.lock"

    def reset(self) -> None:
        """Forget every slot and counter (the node does this before its receivers start)."""
        with self._state() as state:
            state.clear()

    @contextlib.contextmanager
    def _state(self) -> Iterator[dict]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                state = json.loads(self.path.read_text())
            except (FileNotFoundError, ValueError):
                state = {}
            before = json.dumps(state, sort_keys=True)
            yield state
            if json.dumps(state, sort_keys=True) != before:
                temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                temp.write_text(json.dumps(state))
                os.replace(temp, self.path)
        finally:
            os.close(fd)  # releases the lock

    def admit(self, calling_ae: str, total_limit: int, peer_limit: int, live: Iterable[str] = ()) -> Admission:
        """A slot for an association from ``calling_ae``, refused (no ticket) when the node already holds
        ``total_limit`` associations, or the AE ``peer_limit``. ``live``: the tickets this process still holds."""
        me, live = os.getpid(), set(live)
        with self._state() as state:
            held: dict[str, list] = state.setdefault("held", {})
            for ticket, (pid, _) in list(held.items()):
                if (pid == me and ticket not in live) or (pid != me and not _alive(pid)):
                    del held[ticket]
            by_peer = sum(1 for _, ae in held.values() if ae == calling_ae)
            if len(held) >= total_limit or by_peer >= peer_limit:
                return Admission(None, len(held), by_peer)
            ticket = uuid.uuid4().hex
            held[ticket] = [me, calling_ae]
            return Admission(ticket, len(held) - 1, by_peer)

    def release(self, ticket: str) -> None:
        """Give a slot back (again: no effect)."""
        with self._state() as state:
            state.get("held", {}).pop(ticket, None)

    def count(self, counter: str) -> None:
        """Add one to a counter (:class:`~radnode.node.scp.Refusals` keeps its counts here)."""
        with self._state() as state:
            counters = state.setdefault("counters", {})
            counters[counter] = counters.get(counter, 0) + 1

    def counters(self) -> dict[str, int]:
        """Every counter, summed over the receivers."""
        with self._state() as state:
            return dict(state.get("counters", {}))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket the receivers share, made here so the port stays the node's while receivers come
    and go (0: a free port); a port another program or node holds is refused with one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as e:
        raise OSError(e.errno, f"cannot listen on {host}:{port} (ingress.host, port): {e.strerror}") from None


class ReceiverPool:
    """The node's receiver processes (see the module's text): started, watched and restarted, stopped."""

    def __init__(self, config: Config, config_file: Path) -> None:
        self.config = config
        self.config_file = config_file
        self.shared = SharedAssociations(config.data_dir / "receivers")
        self.refusals = Refusals(self.shared)
        """The refusals of every receiver (counted in the shared ledger)."""
        self._listening: dict[str, socket.socket] = {}
        self.port = self.tls_port = 0
        self._processes: list[subprocess.Popen | None] = []
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Fix the ports, start every receiver and return once all of them listen (RuntimeError otherwise)."""
        ingress = self.config.ingress
        self.shared.reset()
        self._stopping.clear()
        try:
            if ingress.plain_listener:
                self._listening["plain"] = _listen(ingress.host, ingress.port)
                self.port = self._listening["plain"].getsockname()[1]
            if ingress.tls is not None:
                self._listening["tls"] = _listen(ingress.host, ingress.tls.port)
                self.tls_port = self._listening["tls"].getsockname()[1]
            self.port = self.port or self.tls_port
            self._processes = [self._spawn(i) for i in range(ingress.receivers)]
            for index, process in enumerate(self._processes):
                self._await_ready(index, process)
        except BaseException:
            self.stop()
            raise
        log.info("Storage SCP %s: %d receiver processes listening on %s:%d%s", ingress.ae_title, ingress.receivers,
                 ingress.host, self.port, f" (TLS on {self.tls_port})" if ingress.tls is not None else "")
        self._watcher = threading.Thread(target=self._watch, name="radnode-receivers", daemon=True)
        self._watcher.start()

    def _spawn(self, index: int) -> subprocess.Popen:
        from radnode.logs import JsonFormatter

        json_logs = any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
        log_format = "json" if json_logs else "text"  # the receivers log as the node does, to the same stream
        fds = {kind: sock.fileno() for kind, sock in self._listening.items()}
        command = [sys.executable, "-m", "radnode.node.receivers", str(self.config_file), "--index", str(index),
                   *(f"--{kind}-fd={fd}" for kind, fd in fds.items()), "--log-format", log_format]
        if logging.getLogger("radnode").getEffectiveLevel() <= logging.DEBUG:
            command.append("--verbose")
        return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                pass_fds=tuple(fds.values()))

    @staticmethod
    def _await_ready(index: int, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(process.stdout.readline().strip()), daemon=True)
        reader.start()
        reader.join(START_TIMEOUT_SECONDS)
        if ready != [READY]:
            raise RuntimeError(f"receiver process {index} (pid {process.pid}) did not start listening "
                               f"(exit status {process.poll()}; its log lines are above)")

    def _watch(self) -> None:
        """Start a receiver that died again on the same port, waiting longer while it keeps dying."""
        deaths: dict[int, list[float]] = {}
        while not self._stopping.wait(0.5):
            for index, process in enumerate(list(self._processes)):
                if process is None or process.poll() is None:
                    continue
                now = time.monotonic()
                recent = [t for t in deaths.get(index, []) if now - t < 60] + [now]
                deaths[index] = recent
                delay = RESTART_DELAYS[min(len(recent), len(RESTART_DELAYS)) - 1]
                log.error("receiver process %d (pid %d) exited with status %s; starting it again in %.1f s", index,
                          process.pid, process.returncode, delay)
                self._close(process)
                with self._lock:
                    self._processes[index] = None
                if self._stopping.wait(delay):
                    return
                try:
                    replacement = self._spawn(index)
                except OSError as e:
                    log.error("receiver process %d cannot be started: %s", index, e)
                    continue
                with self._lock:
                    self._processes[index] = replacement
                try:
                    self._await_ready(index, replacement)
                except RuntimeError as e:
                    log.error("%s", e)
                    replacement.kill()  # the next round sees it dead and tries again
                    continue
                log.info("receiver process %d listening again (pid %d)", index, replacement.pid)

    def pids(self) -> list[int]:
        """The receivers' process ids (a receiver being restarted is left out)."""
        with self._lock:
            return [p.pid for p in self._processes if p is not None and p.poll() is None]

    def stop(self) -> None:
        """End every receiver (SIGTERM: each stops listening and ends its associations) and free the ports."""
        self._stopping.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()
            self._watcher = None
        with self._lock:
            processes, self._processes = [p for p in self._processes if p is not None], []
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                log.error("receiver process pid %d did not stop within 30 s; killed", process.pid)
                process.kill()
                process.wait()
            self._close(process)
        for sock in self._listening.values():
            sock.close()
        self._listening = {}

    @staticmethod
    def _close(process: subprocess.Popen) -> None:
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def serve(config: Config, listening: dict[str, socket.socket]) -> None:
    """One receiver: the node's ingest (store, spool, rules, peer policy, disk guard, audit trail) behind a Storage
    SCP accepting on the node's listening sockets, until SIGTERM or until the node's process is gone."""
    from radnode.node.executors import configured_rules
    from radnode.node.scp import Ingest, StorageSCP
    from radnode.node.store import JobStore, store_target
    from radnode.security.audit import AuditTrail
    from radnode.security.privacy import IdentitySeal, SiteKey

    ingress = config.ingress
    data = config.data_dir
    site_key = SiteKey.load(config.privacy.site_key, data)
    audit = AuditTrail(config.audit, data, ingress.ae_title, site_key)
    store = JobStore(store_target(data, config.store.url), seal=IdentitySeal(site_key))
    ingest = Ingest.for_node(config, store, configured_rules(config))
    scp = StorageSCP(ingress, ingest, audit, shared=SharedAssociations(data / "receivers"), listening=listening)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the node, which stops its receivers
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), name="radnode-orphan-watch", daemon=True).start()
    scp.start()
    gc.freeze()  # what start-up made lives as long as the process: no collection looks at it again
    print(READY, flush=True)
    os.dup2(2, 1)  # nobody reads the pipe from here on: anything printed later goes to the log stream
    try:
        stop.wait()
    finally:
        scp.stop()
        store.close()
        audit.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m radnode.node.receivers CONFIG --index I --plain-fd N --tls-fd M``: run one receiver on the
    listening sockets the node passed down."""
    from radnode.config import load_config
    from radnode.logs import configure_logging

    parser = argparse.ArgumentParser(prog="radnode.node.receivers", description=main.__doc__)
    parser.add_argument("config", type=Path)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--plain-fd", type=int)
    parser.add_argument("--tls-fd", type=int)
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(args.verbose, args.log_format)
    threading.current_thread().name = f"radnode-receiver-{args.index}"
    listening = {kind: socket.socket(fileno=fd) for kind, fd in (("plain", args.plain_fd), ("tls", args.tls_fd))
                 if fd is not None}
    serve(load_config(args.config), listening)


if __name__ == "__main__":
    main()
