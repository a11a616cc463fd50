"""The console as one part of a running node: accounts, the authentication gate, metrics and the web server."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from radnode.config import Config
from radnode.feedback.performance import local_performance
from radnode.feedback.shadow import shadow_summaries
from radnode.console.accounts import Accounts, Role
from radnode.console.app import create_app
from radnode.console.auth import AuditSink, Gate
from radnode.console.metrics import NodeCollector, node_registry
from radnode.console.server import WebServer
from radnode.node.store import JobStore, store_target
from radnode.security.privacy import SiteKey

log = logging.getLogger(__name__)

@contextmanager
def accounts_for(config: Config) -> Iterator[Accounts]:
    """The accounts in the job store of the node with this configuration (``radnode users``/``tokens``, beside
    a running node or not)."""
    store = JobStore(store_target(config.data_dir.resolve(), config.store.url))
    try:
        yield Accounts(store)
    finally:
        store.close()


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

    def __init__(self, config: Config, node: object, store: JobStore, audit: AuditSink | None = None,
                 rejected_associations: Callable[[], dict[str, int]] = dict,
                 tls_failures: Callable[[], int] = lambda: 0) -> None:
        api = config.api
        self.accounts = Accounts(store)
        self.collector = NodeCollector(node, config.data_dir / "spool", rejected_associations,  # type: ignore[arg-type]
                                       tls_failures, store.queue_paused, performance=lambda: local_performance(store),
                                       drift=store.drift_document, shadow=lambda: shadow_summaries(store))
        token = read_event_token(config.orthanc.event_token_file) if config.orthanc.url else None
        if config.orthanc.url and token is None:
            log.warning("orthanc.url is set but orthanc.event_token_file is not: the plugin's events are refused "
                        "(radnode orthanc-config writes the token file)")
        self.gate = Gate(accounts=self.accounts, patient_data_roles=frozenset(Role(r) for r in api.patient_data_roles),
                         secure_cookies=api.tls is not None, session_hours=api.session_hours,
                         public_metrics=api.public_metrics, orthanc_token=token, audit=audit,
                         on_refused=self.collector.count_refused,
                         export_identifier_roles=frozenset(Role(r) for r in api.export_identifier_roles),
                         name_key=SiteKey.load(config.privacy.site_key, config.data_dir))
        self.app = create_app(node, store, self.gate, node_registry(self.collector), int(api.max_upload_mb * 2**20),
                              config)
        self.server = WebServer(self.app, api)

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
