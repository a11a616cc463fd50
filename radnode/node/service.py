"""The node: Storage SCP, job scheduler and egress over one data folder, safe to kill and restart.

On disk under ``config.data_dir``::

    radnode.db                      job store (SQLite, WAL; or PostgreSQL at ``store.url``), patient IDs sealed
    node-config.yaml                the configuration job processes get via $RADNODE_CONFIG (0600, secrets as references)
    audit/audit.log                 the IHE ATNA audit trail (append-only, one PS3.15 A.5 message per line)
    keys/site.key                   the site key for hashed identifiers and de-identification (unless privacy.site_key)
    spool/<study>/<series>/<sop>.dcm  received instances, as they arrived
    spool/.incoming/                temporary files of writes in progress
    jobs/<job_id>/in/               hard links to the instances the job covers
    jobs/<job_id>/out/              what the job command wrote
    jobs/<job_id>/work/             HOLOSCAN_WORKDIR of a job run as its MAP command (subprocess execution)
    jobs/<job_id>/models/           links to the folders of an ensemble in processing.models (in-process)
    jobs/<job_id>/stdout.log, stderr.log
    outbox/<job_id>/                copy of every output, kept whatever the deliveries do

The web service (``radnode.console``, on ``api.host``/``api.port`` unless ``api.enabled`` is false) serves the
API, the operators' dashboard, ``/metrics``, STOW-RS and the Orthanc plugin's events; with ``orthanc.url`` set
the node pulls instances from Orthanc into the same spool and results go back into Orthanc. Every series is routed by the rule file (``rules``; unset: the
shipped ``pipelines/default_rules.yaml``): pipelines, forwards, discard, priority, completeness, execution
(in-process, subprocess or container, see ``executors.py``). The node's own results coming back (from a PACS,
from Orthanc) are recorded and never processed, whatever the rules say; so are clinicians' corrections of its
segmentations (a foreign SEG referencing a source series), which the feedback thread matches to their job and
measures against the node's SEG (``radnode/feedback``). A rule's ``shadow`` pipelines run as shadow jobs after
the production run, their results kept under the job and never delivered; the shadow thread compares them
with the production run's (``radnode/feedback/shadow.py``).

On start, spool files the store does not know are indexed, jobs left ``running`` run again from
scratch, and jobs left ``delivering`` carry on with only the deliveries not recorded as done. Egress runs one
worker per destination (``egress.py``), so a hung peer delays only its own deliveries.

Retention (``retention.py``) removes the files of jobs final for longer than ``retention.done_days`` /
``failed_days`` in its own thread, at start (finishing a purge a crash interrupted) and every
``retention.interval_minutes``; the disk guard refuses C-STOREs while the spool's file system is under
``retention.min_free_disk_gb`` / ``min_free_disk_percent`` free.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from radnode.console.accounts import Accounts
from radnode.console.service import Console

from radnode.config import Config
from radnode.feedback.corrections import CorrectionMatcher
from radnode.feedback.drift import DriftMonitor
from radnode.feedback.shadow import ShadowComparer
from radnode.node.activity import ActivityLog
from radnode.node.egress import Egress
from radnode.node.executors import check_models, configured_rules
from radnode.node.orthanc_ingress import OrthancIngress
from radnode.node.receivers import ReceiverPool
from radnode.node.retention import Retention
from radnode.node.scp import DiskGuard, Ingest, Origin, Refused, StorageSCP, index_tags
from radnode.node.store import Delivery, Event, Job, JobState, JobStore, store_target
from radnode.node.worker import DEFAULT_JOB_COMMAND, Scheduler
from radnode.pipelines.rules import RuleSet
from radnode.security.audit import AuditTrail
from radnode.security.privacy import IdentitySeal, SiteKey, make_private, private_umask, write_owner_only

if TYPE_CHECKING:
    from radnode.node.engine.leader import Leadership
    from radnode.node.engine.storage import Storage

log = logging.getLogger(__name__)


class Node:
    """One radnode instance; ``start()`` returns once it listens, ``stop()`` ends it cleanly."""

    def __init__(self, config: Config, job_command: Sequence[str] = DEFAULT_JOB_COMMAND,
                 poll_seconds: float = 0.2) -> None:
        """``job_command`` is run as ``COMMAND INPUT_DIR --output OUT_DIR --pipeline NAME`` per job;
        ``ingress.sync_spool`` fsyncs each received instance before acknowledging it (see :class:`~radnode.node.scp.Spool`)."""
        self.config = config.model_copy(update={"data_dir": config.data_dir.resolve()})
        self.job_command = list(job_command)
        self.poll_seconds = poll_seconds
        self.store: JobStore | None = None
        self.egress: Egress | None = None
        """Started with the node: one delivery worker per destination (``Egress.resend`` re-sends a job)."""
        self._scp: StorageSCP | None = None
        self._receivers: ReceiverPool | None = None
        """With ``ingress.receivers`` above 1: the receiver processes, in place of the in-process SCP."""
        self._web: Console | None = None
        self._orthanc: OrthancIngress | None = None
        self.disk_guard: DiskGuard | None = None
        """Checked before every spool write (set on start, from ``retention.min_free_disk_*``)."""
        self.audit: AuditTrail | None = None
        """The ATNA audit trail (set on start); the console audits what its users do through it."""
        self.site_key: SiteKey | None = None
        self._umask = os.umask(0o077)
        os.umask(self._umask)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._leadership: Leadership | None = None
        """With the distributed engine: whether this node schedules and delivers (one leader per store)."""

    def start(self) -> None:
        """Recover what a previous run left, then listen and schedule."""
        check_models(self.config)
        self._umask = private_umask()  # everything the node and its job processes create is owner-only
        data = self.config.data_dir
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        if tightened := make_private(data):
            log.warning("made %d entries under %s owner-only (group/other permissions removed)", tightened, data)
        config_file = data / "node-config.yaml"  # secrets are written as their references, never their values
        write_owner_only(config_file, yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False))
        self.site_key = SiteKey.load(self.config.privacy.site_key, data)
        self.audit = AuditTrail(self.config.audit, data, self.config.ingress.ae_title, self.site_key)
        self.audit.application_activity(started=True)
        rules = self.load_rules()
        storage = self._check_engine()
        self.store = store = JobStore(store_target(data, self.config.store.url), seal=IdentitySeal(self.site_key))
        log.info("%s", store.opened)
        if sealed := store.seal_stored():
            log.info("sealed %d patient identifiers the job store held in clear", sealed)
        ingest = Ingest.for_node(self.config, store, rules)
        self.disk_guard = ingest.guard
        self._recover(ingest, requeue_running=storage is None)
        self.egress = egress = Egress(self.config, store, self.poll_seconds, self.audit)
        scheduler = Scheduler(self.config, store, egress, self.job_command, config_file,
                              rules.in_process_pipelines, storage)
        if self.config.ingress.receivers > 1:
            self._receivers = ReceiverPool(self.config, config_file)
            self._receivers.start()
        else:
            self._scp = StorageSCP(self.config.ingress, ingest, self.audit)
            self._scp.start()
        if self.config.orthanc.url:
            self._orthanc = OrthancIngress(self.config.orthanc, ingest, self.config.egress.timeouts.network_seconds,
                                           checkpoint=data / "orthanc-changes")
            self._orthanc.start()
        if self.config.api.enabled:
            self._ingest = ingest
            self._web = Console(self.config, self, store, self.audit, self.rejected_associations,
                                self.tls_failures)
            self._web.start()
        self._stopping.clear()
        retention = Retention(self.config, store, should_stop=self._stopping.is_set)
        drift = DriftMonitor(self.config.feedback.drift, store, self.audit)
        activity = ActivityLog(store.read_rows)
        if storage is None:
            egress.start()
            self._threads = [self._loop("activity", activity.tick),
                             self._loop("scheduler", scheduler.tick, on_exit=scheduler.stop),
                             self._loop("egress", egress.dispatch), self._loop("retention", retention.tick),
                             self._loop("feedback", CorrectionMatcher(self.config, store).tick),
                             self._loop("drift", drift.tick, poll_seconds=1.0),
                             self._loop("shadow", ShadowComparer(self.config, store).tick)]
            return
        from radnode.node.engine.leader import Leadership

        def lead() -> None:
            for job_id in store.requeue_forwarding("forwarded again: the leader forwarding it stopped before its "
                                                   "deliveries were recorded"):
                log.warning("job %d (forward only) was left running by an earlier leader; forwarded again", job_id)
            egress.start()

        self._leadership = leader = Leadership(store, on_gain=lead, on_loss=egress.stop)

        def leading(step: Callable[[], None]) -> Callable[[], None]:
            return lambda: step() if leader.is_leader.is_set() else None

        self._threads = [self._loop("activity", activity.tick),
                         self._loop("leader", leader.tick, on_exit=leader.release, poll_seconds=1.0),
                         self._loop("scheduler", leading(scheduler.tick), on_exit=scheduler.stop),
                         self._loop("egress", leading(egress.dispatch)),
                         self._loop("retention", leading(retention.tick)),
                         self._loop("feedback", leading(CorrectionMatcher(self.config, store).tick)),
                         self._loop("drift", leading(drift.tick), poll_seconds=1.0),
                         self._loop("shadow", leading(ShadowComparer(self.config, store).tick))]

    def load_rules(self) -> RuleSet:
        """The configured rules, checked (``executors.configured_rules``)."""
        return configured_rules(self.config)

    def health(self) -> dict[str, object]:
        """What ``GET /health`` answers: job counts by state, and how many jobs are flagged for review."""
        counts, flagged = self._store().job_counts()
        return {"status": "ok", "jobs": counts, "needs_review": flagged}

    def _check_engine(self) -> Storage | None:
        """With ``engine.kind: celery``: the storage (writable) and the broker (reachable, queues declared),
        checked before the store is opened and the node listens, each refused with one line; None with the local
        engine."""
        if self.config.engine.kind != "celery":
            return None
        from radnode.node.engine.broker import check_broker
        from radnode.node.engine.storage import open_storage

        storage = open_storage(self.config)
        storage.check()
        check_broker(self.config.engine, [self.config.engine.default_queue])
        return storage

    @staticmethod
    def _recover(ingest: Ingest, requeue_running: bool = True) -> None:
        """Drop half-written spool files, index unknown ones, queue interrupted jobs to run again (not with
        the distributed engine: those run on workers, and the reaper looks after them)."""
        store = ingest.store
        if partial := ingest.spool.discard_partial():
            log.warning("discarded %d partial spool writes", partial)
        if found := ingest.reindex():
            log.warning("indexed %d spool files the job store did not know", found)
        if not requeue_running:
            return
        for job_id in store.running_jobs():
            store.requeue(job_id, "node restarted while the job was running; partial output discarded")
            log.warning("job %d was running when the node stopped; it runs again", job_id)

    def _loop(self, name: str, step: Callable[[], None], on_exit: Callable[[], None] | None = None,
              poll_seconds: float | None = None) -> threading.Thread:
        """A thread calling ``step`` every ``poll_seconds`` until stop; an error is logged, never fatal.

        ``on_exit`` runs in the same thread at the end: job processes are tied to the thread that started
        them (they get SIGKILL when it ends), so the scheduler ends them gracefully from there.
        """
        def run() -> None:
            while not self._stopping.is_set():
                try:
                    step()
                except Exception:
                    log.exception("%s step failed; carrying on", name)
                self._stopping.wait(poll_seconds or self.poll_seconds)
            if on_exit is not None:
                on_exit()

        thread = threading.Thread(target=run, name=f"radnode-{name}", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Stop listening, end running jobs (they run again at the next start) and close the store."""
        if self.store is None:
            return
        if self._scp is not None:
            self._scp.stop()
            self._scp = None
        if self._receivers is not None:
            self._receivers.stop()
            self._receivers = None
        if self._web is not None:
            self._web.stop()
            self._web = None
        if self._orthanc is not None:
            self._orthanc.stop()
            self._orthanc = None
        self._stopping.set()
        for thread in self._threads:
            thread.join()
        if self.egress is not None:
            self.egress.stop()
            self.egress = None
        self.store.close()
        self.store = None
        if self.audit is not None:
            self.audit.application_activity(started=False)
            self.audit.close()
            self.audit = None
        os.umask(self._umask)

    def __enter__(self) -> "Node":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The DICOM port the node listens on (useful with ``ingress.port: 0``)."""
        if self._receivers is not None:
            return self._receivers.port
        return self.scp.port

    @property
    def tls_port(self) -> int:
        """The DICOM TLS port the node listens on (``ingress.tls``)."""
        if self._receivers is not None:
            if not self._receivers.tls_port:
                raise RuntimeError("the SCP has no TLS listener (ingress.tls is not set)")
            return self._receivers.tls_port
        return self.scp.tls_port

    @property
    def scp(self) -> StorageSCP:
        """The in-process Storage SCP."""
        if self._scp is None:
            raise RuntimeError("the node is not started" if self._receivers is None else
                               "the node receives in its receiver processes (ingress.receivers), see receivers")
        return self._scp

    @property
    def receivers(self) -> ReceiverPool:
        """The receiver processes (``ingress.receivers`` above 1)."""
        if self._receivers is None:
            raise RuntimeError("the node has no receiver processes (ingress.receivers is 1 or it is not started)")
        return self._receivers

    def rejected_associations(self) -> dict[str, int]:
        """Associations refused at A-ASSOCIATE by reason (``calling_ae``, ``called_ae``), over every receiver."""
        receiving = self._receivers or self._scp
        return receiving.refusals.rejected() if receiving is not None else {}

    def tls_failures(self) -> int:
        """TLS handshakes refused or failed, over every receiver."""
        receiving = self._receivers or self._scp
        return receiving.refusals.tls_failures() if receiving is not None else 0

    @property
    def api_port(self) -> int:
        """The web service's port (``api.port``; useful with 0)."""
        if self._web is None:
            raise RuntimeError("the web service is not started (api.enabled is false)")
        return self._web.port

    @property
    def accounts(self) -> Accounts:
        """The console's users and tokens (while the web service runs)."""
        if self._web is None:
            raise RuntimeError("the web service is not started (api.enabled is false)")
        return self._web.accounts

    def _store(self) -> JobStore:
        if self.store is None:
            raise RuntimeError("the node is not started")
        return self.store

    def job(self, job_id: int) -> Job | None:
        """One job's state and counts."""
        return self._store().job(job_id)

    def jobs(self, state: JobState | None = None, needs_review: bool | None = None) -> list[Job]:
        """Every job, oldest first, or those in a state and/or flagged (or not) for review."""
        return self._store().jobs(state, needs_review)

    def events(self, job_id: int, after_id: int = 0) -> list[Event]:
        """A job's event log (``after_id`` to poll only new lines)."""
        return self._store().events(job_id, after_id)

    def workers(self) -> list[dict[str, object]]:
        """The distributed engine's workers as ``GET /api/workers`` answers them (none with the local engine)."""
        from radnode.node.engine.devices import worker_record

        return [worker_record(w, self.config.engine.lease_seconds) for w in self._store().workers()]

    def deliveries(self, job_id: int) -> list[Delivery]:
        """A job's deliveries with their attempts and last errors."""
        return self._store().deliveries(job_id)

    # --- what the web console hands the node (radnode.console) -----------------------------------

    def orthanc_event(self, event: dict[str, str]) -> None:
        """Queue one Orthanc plugin event; ValueError when this node takes none."""
        if self._orthanc is None:
            raise ValueError("this node takes no Orthanc events (orthanc.url is not set)")
        self._orthanc.submit(event)

    def stow_incoming(self) -> Path:
        """Where STOW-RS parts are written while a request is received (the spool's temporary folder)."""
        return self._ingest.spool.incoming

    def stow_receive(self, path: Path, calling_ae: str, peer_address: str, association_id: str,
                     study: str | None) -> str:
        """One instance received over STOW-RS, through the same ingest as a C-STORE."""
        data = path.read_bytes()
        try:
            ds = index_tags(BytesIO(data), ["StudyInstanceUID", "SOPInstanceUID"])
        except Refused as e:
            raise ValueError(str(e)) from None
        if study is not None and ds.get("StudyInstanceUID") != study:
            raise StudyMismatch(str(ds.get("SOPInstanceUID", "")),
                                f"instance of study {ds.get('StudyInstanceUID')!r}, not of {study!r} (the URL's)")
        try:
            self._ingest.receive(data, b"", Origin(calling_ae, peer_address, association_id))
        except Refused as e:
            raise StudyMismatch(str(ds.get("SOPInstanceUID", "")), str(e)) from None
        return str(ds.SOPInstanceUID)

    def stow_released(self, association_id: str) -> None:
        """A STOW-RS request ended: its series may be complete, as after an A-RELEASE."""
        self._store().association_released(association_id)

    def metric_rows(self, query: str, params: dict[str, object] | None = None) -> list[tuple]:
        """Rows of one of the metrics' read-only queries (:mod:`radnode.console.metrics`)."""
        return self._store().read_rows(query, params or {})


class StudyMismatch(ValueError):
    """A STOW-RS instance refused, with its SOP Instance UID for the Failed SOP Sequence."""

    def __init__(self, sop_instance_uid: str, reason: str) -> None:
        super().__init__(reason)
        self.sop_instance_uid = sop_instance_uid


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """An exception that ends a thread (pynetdicom's reactor on a request it cannot decode, for one) is one
    log line naming the thread; the traceback only with -v (debug), never a page of stderr per peer."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    log.error("thread %s ended: %s: %s", name, args.exc_type.__name__, str(args.exc_value)[:200])
    log.debug("thread %s ended", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def run_node(config: Config, job_command: Sequence[str] = DEFAULT_JOB_COMMAND) -> None:
    """Run a node until SIGTERM or SIGINT, then stop it cleanly (the ``radnode serve`` command)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    threading.excepthook = _log_thread_exception
    node = Node(config, job_command)
    node.start()
    log.info("radnode %s listening on %s:%d, data in %s", config.ingress.ae_title, config.ingress.host,
             node.port, config.data_dir)
    try:
        stop.wait()
    finally:
        node.stop()
