"""The console as one part of a running node: accounts, the authentication gate, metrics and the web server."""

from __future__ import annotations

import logging
from pathlib import Path

from radnode.config import Config
from radnode.console.accounts import Accounts, Role
from radnode.console.app import create_app
from radnode.console.auth import AuditSink, Gate
from radnode.console.metrics import NodeCollector, node_registry
from radnode.console.server import WebServer

log = logging.getLogger(__name__)

ACCOUNTS_FILE = "radnode.db"
"""Users, tokens and sessions live in the node's own database file."""


def accounts_for(config: Config) -> Accounts:
    """The accounts of the node with this configuration (also for ``radnode users``/``tokens`` beside it)."""
    return Accounts(config.data_dir / ACCOUNTS_FILE)


def read_event_token(path: Path | None) -> str | None:
    """The Orthanc plugin's token from its file (first line), or None without one."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise ValueError(f"orthanc.event_token_file {path}: cannot read ({e.strerror})") from None
    if len(token) < 32:
        raise ValueError(f"orthanc.event_token_file {path}: expected a token of at least 32 characters")
    return token


class Console:
    """The web service of one node (``node`` answers the console's NodeView and StowIngest protocols)."""

    def __init__(self, config: Config, node: object, audit: AuditSink | None = None,
                 rejected_associations=dict, paused=lambda: False) -> None:  # type: ignore[no-untyped-def]
        api = config.api
        self.accounts = accounts_for(config)
        self.collector = NodeCollector(node, config.data_dir / "spool", rejected_associations, paused)  # type: ignore[arg-type]
        token = read_event_token(config.orthanc.event_token_file) if config.orthanc.url else None
        if config.orthanc.url and token is None:
            log.warning("orthanc.url is set but orthanc.event_token_file is not: the plugin's events are refused "
                        "(radnode orthanc-config writes the token file)")
        self.gate = Gate(accounts=self.accounts, patient_data_roles=frozenset(Role(r) for r in api.patient_data_roles),
                         secure_cookies=api.tls is not None, session_hours=api.session_hours,
                         public_metrics=api.public_metrics, orthanc_token=token, audit=audit,
                         on_refused=self.collector.count_refused)
        self.app = create_app(node, self.gate, node_registry(self.collector), int(api.max_upload_mb * 2**20))
        self.server = WebServer(self.app, api)

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.accounts.close()
