"""Real parts of a distributed radnode on one machine, for the engine benchmark and the tests: a private
RabbitMQ node, a private PostgreSQL server, ``radnode serve`` with ``engine.kind: celery`` and ``radnode
worker`` processes, each in its own process as a site runs them (Debian's rabbitmq-server and postgresql-15;
run as root, as the development machines do)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from radnode.peers import free_port

if TYPE_CHECKING:
    from radnode.node.store import JobStore

ECHOSCU, STORESCU = "/usr/bin/echoscu", "/usr/bin/storescu"

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
RABBITMQCTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
"""Debian's scripts behind the wrappers in /usr/sbin (which switch to the rabbitmq user and its cookie)."""


def open_store(store_url: str, key: Path) -> "JobStore":
    """The shared store as a node sees it: patient IDs opened with the site key."""
    from radnode.node.store import JobStore
    from radnode.security.privacy import IdentitySeal, SiteKey

    return JobStore(store_url, seal=IdentitySeal(SiteKey(key.read_text().strip().encode())))


class RabbitNode:
    """A RabbitMQ 3.10 node of the test session's own (own name, ports, data; Debian's ``rabbitmq-server``),
    so a test can stop its broker without touching anyone else's. ``consumer_timeout`` is set above the
    longest job, as the deployment recipes do."""

    def __init__(self, folder: Path) -> None:
        if not RABBITMQ_SERVER.exists():
            raise RuntimeError("RabbitMQ is not installed: run scripts/bootstrap.sh")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port, dist_port = free_port(), free_port()
        self.node = f"radnode-test-{secrets.token_hex(4)}@localhost"
        self.vhost = f"radnode-{secrets.token_hex(3)}"
        (folder / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.port}\nconsumer_timeout = 3600000\nloopback_users = none\n"
            "log.console = false\nlog.file.level = warning\n")
        (folder / "enabled_plugins").write_text("[].\n")
        self.env = {**os.environ, "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(self.port),
                    "RABBITMQ_DIST_PORT": str(dist_port), "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(folder / "log"), "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
                    "RABBITMQ_PID_FILE": str(folder / "pid")}
        self.log = (folder / "server.log").open("w")
        self.process = subprocess.Popen([str(RABBITMQ_SERVER)], env=self.env, stdout=self.log,
                                        stderr=subprocess.STDOUT, cwd=folder)
        self.wait_running(120)
        self.ctl("add_vhost", self.vhost)
        self.ctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(RABBITMQCTL), "-q", "-n", self.node, *args], env=self.env,
                                capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {result.stderr.strip()}")
        return result

    def wait_running(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.ctl("await_startup", check=False).returncode != 0:
            if self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("rabbitmq-server did not start")
            time.sleep(1)

    def url(self, host: str = "127.0.0.1") -> str:
        return f"amqp://guest:guest@{host}:{self.port}/{self.vhost}"

    def stop_app(self) -> None:
        """Stop the broker (the Erlang node stays up; its AMQP listener and connections go)."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup")

    def queue_depths(self) -> dict[str, int]:
        listing = self.ctl("list_queues", "-p", self.vhost, "name", "messages").stdout
        return {name: int(n) for name, n in (line.split("\t") for line in listing.splitlines() if "\t" in line)}

    def close(self) -> None:
        self.ctl("stop", check=False)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def site_key(path: Path) -> Path:
    """A site key file (made once): every node sharing a store must seal patient IDs under the same key."""
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path


def engine_config(path: Path, data_dir: Path, broker_url: str, store_url: str, storage: dict[str, Any],
                  key: Path, **sections: Any) -> Path:
    """Write a configuration file for the distributed engine (node or worker) and return its path; ``key``:
    the site key file (:func:`site_key`)."""
    config = {"data_dir": str(data_dir), "store": {"url": store_url}, "storage": storage,
              "privacy": {"site_key": {"file": str(key)}},
              "engine": {"kind": "celery", "broker_url": broker_url, "lease_seconds": 9,
                         "broker_heartbeat_seconds": 4},
              "ingress": {"host": "127.0.0.1", "study_idle_seconds": 2.0},
              "api": {"host": "127.0.0.1", "port": 0},  # the web service on a free port (it always starts)
              "processing": {"job_timeout_seconds": 300}}
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(config))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "HOLOSCAN_LOG_LEVEL": "WARN", "PYTHONUNBUFFERED": "1"}


class WorkerProcess:
    """``radnode worker --config FILE --cpu [--queue Q]`` (optionally inside a network namespace)."""

    def __init__(self, config: Path, log: Path, name: str, queues: tuple[str, ...] = (),
                 netns: str | None = None) -> None:
        self.name = name
        argv = [sys.executable, "-m", "radnode", "-v", "worker", "--config", str(config), "--cpu", "--name", name]
        for q in queues:
            argv += ["--queue", q]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.log_path = log
        self.log = log.open("a")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=_env(),
                                        start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL the worker process (as the OOM killer or a power cut would end it)."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


class EngineNode:
    """``radnode serve`` with the distributed engine, a DICOM port of its own and a PACS destination."""

    def __init__(self, config: Path, log: Path, store_url: str, destination: str) -> None:
        self.port, self.store_url = free_port(), store_url
        self.log_path = log
        self.log = log.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "radnode", "-v", "serve", "--config", str(config), "--port", str(self.port),
             "--destination", destination], stdout=self.log, stderr=subprocess.STDOUT, env=_env())
        deadline = time.monotonic() + 90
        while subprocess.run([ECHOSCU, "-aec", "RADNODE", "127.0.0.1", str(self.port)],
                             capture_output=True).returncode != 0:
            if self.process.poll() is not None:
                raise RuntimeError(f"radnode serve exited at start: {self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("radnode serve did not answer C-ECHO")
            time.sleep(0.3)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send(self, folder: Path, calling_ae: str = "CT_SCANNER") -> subprocess.Popen:
        """Start one DCMTK storescu sending a folder (returns at once; ``wait()`` on it)."""
        return subprocess.Popen([STORESCU, "-aet", calling_ae, "-aec", "RADNODE", "+sd", "127.0.0.1",
                                 str(self.port), str(folder)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
        self.log.close()


PG_BIN = Path("/usr/lib/postgresql/15/bin")


class PrivatePostgres:
    """A PostgreSQL 15 server of one test's own (``initdb`` into a temporary folder, its own port), so the
    test can restart it without touching the shared cluster other tests use."""

    def __init__(self, allow_network: str | None = None) -> None:
        """``allow_network``: also listen on every address and admit clients from this network (CIDR)."""
        # its own folder outside pytest's (whose parents only root may enter), owned by postgres
        self.folder, self.port = Path(tempfile.mkdtemp(prefix="radnode-pg-", dir="/var/tmp")), free_port()
        folder = self.folder
        shutil.chown(folder, "postgres", "postgres")
        self.data = folder / "data"
        self.password = secrets.token_hex(12)
        pwfile = folder / "pw"
        pwfile.write_text(self.password)
        shutil.chown(pwfile, "postgres", "postgres")
        self._as_postgres(PG_BIN / "initdb", "-D", str(self.data), "-U", "radnode", "--pwfile", str(pwfile),
                          "-A", "scram-sha-256")
        self.listen = "127.0.0.1"
        if allow_network:
            self.listen = "*"
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {allow_network} scram-sha-256\n")
        self.start()

    def _as_postgres(self, *argv: object) -> None:
        result = subprocess.run(["runuser", "-u", "postgres", "--", *map(str, argv)], capture_output=True,
                                text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]}: {result.stderr.strip() or result.stdout.strip()}")

    def url(self, host: str = "127.0.0.1") -> str:
        return f"postgresql://radnode:{self.password}@{host}:{self.port}/postgres"

    def start(self) -> None:
        self._as_postgres(PG_BIN / "pg_ctl", "-D", self.data, "-l", self.folder / "server.log", "-w", "-o",
                          f"-p {self.port} -k {self.folder} -c listen_addresses={self.listen}", "start")

    def stop(self) -> None:
        self._as_postgres(PG_BIN / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def close(self) -> None:
        try:
            self.stop()
        except RuntimeError:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)
