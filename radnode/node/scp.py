"""Ingress: the node's Storage SCP and the on-disk spool it writes into.

Each instance is stored as the bytes that arrived (file meta + the peer's encoded data set, never
decoded and re-encoded), atomically, under ``spool/<Study UID>/<Series UID>/<SOP UID>.dcm``, then
indexed in the job store. Only the few tags the index needs are parsed. The pynetdicom handlers only
pick the bytes and the sender out of the event and hand them to :class:`Ingest`.

A :class:`DiskGuard` keeps ``retention.min_free_disk_gb`` / ``min_free_disk_percent`` free on the spool's file
system: below it a C-STORE is answered A700 (out of resources) before anything is written, C-ECHO still
answers, and storing resumes by itself once space is back.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import threading
import time
import uuid
import weakref
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from radnode.config import IngressConfig, RetentionConfig
from radnode.node.completeness import COMPLETENESS_TAGS, expected_instances
from radnode.node.store import Arrival, Instance, InstanceBeingPurged, JobStore
from radnode.pipelines.routing import LateInstances, RoutingContext, SeriesDecision
from radnode.pipelines.rules import DEFAULT_RULES, RuleSet, load_rules
from radnode.security.access import REJECTED_PERMANENT, SERVICE_USER, PeerPolicy
from radnode.security.tls import TlsAssociationServer, peer_identity, server_context

if TYPE_CHECKING:
    from radnode.security.audit import AuditTrail

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000

INDEX_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "PatientID", "Modality",
              "AccessionNumber", "StudyDescription"]
"""The only tags parsed on receipt (the last two for the console's job list, once per study)."""
_NOTED_STUDIES = 10_000
"""Studies whose details this process recorded (so the store is written once per study, not per instance)."""

_UID = re.compile(r"[0-9A-Za-z_-]+(\.[0-9A-Za-z_-]+)*")
"""What may become a spool path component: UID-like, no separators, no '..'."""


class Refused(Exception):
    """An instance that cannot be accepted; the message goes into the C-STORE response and the log."""


class OutOfSpace(OSError):
    """The spool's file system is under its free-space minimum; ``strerror`` is short enough for an
    ErrorComment (64 characters), the guard's log line has the details."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


GB = 1e9


class DiskGuard:
    """Refuses writes into the spool while its file system would have less free space than the larger of
    ``min_free_bytes`` and ``min_free_percent`` of its size once the write is done.

    One ``statvfs`` per write (microseconds); the free space counted is what an unprivileged process may use.
    The first refusal is logged with the free space (then at most every ``LOG_EVERY_SECONDS``), and the
    return above the minimum once.
    """

    LOG_EVERY_SECONDS = 60.0

    def __init__(self, path: Path, min_free_bytes: float = 0.0, min_free_percent: float = 0.0) -> None:
        self.path = path
        self.min_free_bytes = min_free_bytes
        self.min_free_percent = min_free_percent
        self._low = False
        self._logged_at = -float("inf")

    @classmethod
    def from_config(cls, path: Path, retention: RetentionConfig) -> "DiskGuard":
        """The guard ``retention.min_free_disk_gb`` / ``min_free_disk_percent`` ask for."""
        return cls(path, retention.min_free_disk_gb * GB, retention.min_free_disk_percent)

    def check(self, incoming: int) -> None:
        """Raise :class:`OutOfSpace` if writing ``incoming`` bytes would leave less than the minimum free."""
        if not (self.min_free_bytes or self.min_free_percent):
            return
        usage = shutil.disk_usage(self.path)
        minimum = max(self.min_free_bytes, usage.total * self.min_free_percent / 100)
        if usage.free - incoming >= minimum:
            if self._low:
                self._low = False
                log.warning("free space on %s is %.2f GB again (minimum %.2f GB): storing resumes", self.path,
                            usage.free / GB, minimum / GB)
            return
        now = time.monotonic()
        if not self._low or now - self._logged_at >= self.LOG_EVERY_SECONDS:
            self._logged_at = now
            log.error("refusing C-STORE (A700 out of resources): %.2f GB free on the file system of %s "
                      "(%.1f %% of %.1f GB), under the minimum of %.2f GB (retention.min_free_disk_gb %g, "
                      "min_free_disk_percent %g)", usage.free / GB, self.path, 100 * usage.free / usage.total,
                      usage.total / GB, minimum / GB, self.min_free_bytes / GB, self.min_free_percent)
        self._low = True
        raise OutOfSpace(f"disk low: {usage.free / GB:.2f} GB free, minimum {minimum / GB:.2f} GB")


@dataclass(frozen=True)
class Origin:
    """Who sent an instance."""

    calling_ae: str
    peer_address: str
    association_id: str
    called_ae: str = ""


class Spool:
    """Received instances on disk, one file per SOP instance, written atomically (temp file + rename).

    With ``fsync`` (the default) each file and its folder are flushed to disk before the C-STORE is
    acknowledged, so an acknowledged instance survives a power loss; that costs about half the ingest
    rate on a VM disk. Without it a write survives a crash of the node process, not of the machine.
    """

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        self.incoming = root / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where an instance lives; refuses UIDs that are not safe as file names."""
        for name, uid in (("Study", study_uid), ("Series", series_uid), ("SOP", sop_uid)):
            if not uid:
                raise Refused(f"no {name} Instance UID")
            if len(uid) > 64 or not _UID.fullmatch(uid):
                raise Refused(f"{name} Instance UID {uid[:70]!r} is not a valid UID")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def write(self, target: Path, *chunks: bytes | memoryview) -> None:
        """Write the chunks to ``target`` via a temporary file renamed into place (fsync'd if so set)."""
        temp = self.incoming / f"{uuid.uuid4().hex}.part"
        try:
            with open(temp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            for attempt in range(3):  # a retention purge may remove the folder, emptied, in between
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(temp, target)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        if self.fsync:
            _fsync_dir(target.parent)

    def discard_partial(self) -> int:
        """Remove temporary files left by an interrupted write; returns how many."""
        parts = list(self.incoming.glob("*.part"))
        for part in parts:
            part.unlink(missing_ok=True)
        return len(parts)

    def files(self) -> Iterator[Path]:
        """Every stored instance file."""
        return self.root.glob("*/*/*.dcm")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Router:
    """Takes the routing decision for a series from its first instance: the rule set's (the shipped rules
    when the node has no rule file; the node's own results never processed), with the node's late-instance
    policy where no rule sets one. The store calls it once per series; later instances read the recorded
    decision."""

    def __init__(self, rules: RuleSet, late_instances: LateInstances = LateInstances.IGNORE,
                 policy: PeerPolicy | None = None) -> None:
        self.rules = rules
        self.late_instances = LateInstances(late_instances)
        self.policy = policy
        """Limits what each sender may trigger (``ingress.allowed_peers[].pipelines``), after the rules."""
        self.tags = sorted({*INDEX_TAGS, *COMPLETENESS_TAGS, *rules.keywords})
        """The tags parsed on receipt: the index's, the expected-count signals and what routing reads."""

    def route(self, ds: Dataset, origin: "Origin") -> SeriesDecision:
        """The series' decision as the node takes it; a pipeline the sender may not trigger is withheld (and
        named in the decision's description)."""
        context = RoutingContext(calling_ae=origin.calling_ae, called_ae=origin.called_ae)
        decision = self.rules.route(ds, context).with_defaults(self.late_instances)
        if self.policy is None:
            return decision
        return self.policy.restrict(decision, origin.calling_ae, origin.peer_address.rsplit(":", 1)[0])


def index_tags(stream: BytesIO | Path, tags: list[str] = INDEX_TAGS) -> Dataset:
    """Parse only the tags the index (and the router) needs (stops before pixel data)."""
    try:
        return pydicom.dcmread(stream, stop_before_pixels=True, specific_tags=tags)
    except (InvalidDicomError, EOFError, ValueError, OSError) as e:
        raise Refused(f"cannot read data set: {e}") from e


def describe(ds: Dataset, path: Path, origin: Origin, received_at: float) -> Instance:
    """The index record for a parsed instance stored at ``path``."""
    return Instance(
        sop_instance_uid=str(ds.SOPInstanceUID), study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID), patient_id=str(ds.get("PatientID", "") or ""),
        modality=str(ds.get("Modality", "") or ""), sop_class_uid=str(ds.get("SOPClassUID", "") or ""),
        path=str(path), calling_ae=origin.calling_ae, peer_address=origin.peer_address,
        association_id=origin.association_id, received_at=received_at)


class Ingest:
    """What the node does with one received instance: refuse, or spool, route and index it.

    Both ingress paths (the node's own SCP and instances pulled from Orthanc) come through here.
    """

    def __init__(self, spool: Spool, store: JobStore, router: Router | None = None,
                 guard: DiskGuard | None = None) -> None:
        self.spool = spool
        self.store = store
        self.router = router or Router(load_rules(DEFAULT_RULES))
        self.guard = guard
        self.on_received: Callable[[Dataset, Origin, Arrival], None] | None = None
        """Told of every instance kept, with its index tags (the SCP tallies studies for the audit trail)."""
        self._noted: OrderedDict[str, None] = OrderedDict()

    def receive(self, meta: bytes | memoryview, dataset: bytes | memoryview, origin: Origin) -> Arrival:
        """Spool the encoded instance as it arrived and index it; raises Refused when it cannot be kept.

        ``meta`` is the preamble and file meta, ``dataset`` the encoded data set (a whole Part 10 file may
        be passed as ``meta`` with an empty ``dataset``). Raises OSError when it cannot be written:
        :class:`OutOfSpace` under the disk guard's minimum (nothing is written), ``InstanceBeingPurged``
        while retention is removing its earlier copy.
        """
        ds = index_tags(BytesIO(bytes(meta) + bytes(dataset)), self.router.tags)
        path = self.spool.path_for(ds.get("StudyInstanceUID", ""), ds.get("SeriesInstanceUID", ""),
                                   ds.get("SOPInstanceUID", ""))
        sop_uid = str(ds.SOPInstanceUID)
        if not self.store.has_instance(sop_uid):
            if self.store.being_purged(sop_uid):
                raise InstanceBeingPurged(f"{sop_uid} is being removed by retention; send it again later")
            if self.guard is not None:
                self.guard.check(len(meta) + len(dataset))
            self.spool.write(path, meta, dataset)
        arrival, job_id = self.store.record_instance(describe(ds, path, origin, time.time()),
                                                     lambda: self.router.route(ds, origin), expected_instances(ds))
        self._note_study(ds)
        if arrival is not Arrival.NEW:
            log.debug("%s instance %s from %s (job %d)", arrival, ds.SOPInstanceUID, origin.calling_ae, job_id)
        if self.on_received is not None:
            self.on_received(ds, origin, arrival)
        return arrival

    def _note_study(self, ds: Dataset) -> None:
        study = str(ds.get("StudyInstanceUID", ""))
        if study in self._noted:
            return
        self.store.note_study(study, str(ds.get("AccessionNumber", "") or ""), str(ds.get("StudyDescription", "") or ""))
        self._noted[study] = None
        if len(self._noted) > _NOTED_STUDIES:
            self._noted.popitem(last=False)

    def reindex(self) -> int:
        """Index spool files the store does not know (written just before a crash); returns how many."""
        known = self.store.indexed_paths()
        origin = Origin("", "", "reindex")
        count = 0
        for path in self.spool.files():
            if str(path) in known:
                continue
            try:
                ds = index_tags(path, self.router.tags)
                self.store.record_instance(describe(ds, path, origin, path.stat().st_mtime),
                                           lambda: self.router.route(ds, origin), expected_instances(ds))
                count += 1
            except Refused as e:
                log.error("spool file %s cannot be indexed: %s", path, e)
        return count


@dataclass
class _StudyTally:
    """One study's instances in one association, for its DICOM Instances Transferred audit message."""

    patient_id: str
    sop_classes: Counter[str] = field(default_factory=Counter)


@dataclass
class _AssociationTally:
    """What one association delivered, for the log line and the audit messages at its end."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    stored: int = 0
    refused: int = 0
    repeated: int = 0
    studies: dict[str, _StudyTally] = field(default_factory=dict)
    identity: str | None = None
    """The subject of the sender's TLS certificate ('' without one), read at its first C-STORE."""


class StorageSCP:
    """pynetdicom Storage SCP (C-ECHO, C-STORE of every storage SOP class) feeding an :class:`Ingest`.

    It listens on ``ingress.host``: plain on ``ingress.port`` (unless ``plain_listener`` is off) and with TLS
    on ``ingress.tls.port`` when ``ingress.tls`` is set (see :mod:`radnode.security.tls`). Every association
    request passes the :class:`PeerPolicy` first (``allowed_peers``, ``reject_unknown``); a refusal is logged
    once with the peer's address, counted and audited as a Security Alert, like a failed TLS handshake.
    """

    def __init__(self, config: IngressConfig, ingest: Ingest, audit: "AuditTrail | None" = None) -> None:
        self.config = config
        self.ingest = ingest
        self.audit = audit
        self.policy = ingest.router.policy or PeerPolicy(config)
        self.tls_failures = 0
        """TLS handshakes refused or failed (no client certificate, untrusted CA, not TLS at all)."""
        self._ae = self._make_ae(config)
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: TlsAssociationServer | None = None
        self._tallies: weakref.WeakKeyDictionary[Association, _AssociationTally] = weakref.WeakKeyDictionary()
        self._tally_lock = threading.Lock()
        self._current: threading.local = threading.local()
        ingest.on_received = self._on_received

    @staticmethod
    def _make_ae(config: IngressConfig) -> AE:
        ae = AE(ae_title=config.ae_title)
        ae.maximum_pdu_size = config.max_pdu
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        return ae

    def start(self) -> None:
        """Listen on the configured address(es) (port 0: any free port, see :attr:`port`, :attr:`tls_port`)."""
        handlers = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_C_STORE, self._on_store), (evt.EVT_RELEASED, self._on_end),
                    (evt.EVT_ABORTED, self._on_end)]
        tls = self.config.tls
        if tls is not None:
            context = server_context(tls, tls.require_client_certificate)
            server = self._ae.make_server((self.config.host, tls.port), ssl_context=context, evt_handlers=handlers,
                                          server_class=TlsAssociationServer)
            server.on_handshake_failed = self._on_handshake_failed
            thread = threading.Thread(target=server.serve_forever, name="radnode-scp-tls", daemon=True)
            thread.start()
            self._ae._servers.append(server)  # so AE.shutdown() ends it, as with start_server
            self._tls_server = server
            log.info("Storage SCP %s listening with TLS %s+%s on %s:%d", self.config.ae_title, tls.min_version,
                     " (client certificates required)" if tls.require_client_certificate else "",
                     self.config.host, self.tls_port)
        if self.config.plain_listener:
            self._server = self._ae.start_server((self.config.host, self.config.port), block=False,
                                                 evt_handlers=handlers)
            log.info("Storage SCP %s listening on %s:%d", self.config.ae_title, self.config.host, self.port)

    @property
    def port(self) -> int:
        """The port the plain listener listens on (the TLS one's when there is no plain listener)."""
        server = self._server or self._tls_server
        if server is None:
            raise RuntimeError("the SCP is not started")
        return server.server_address[1]

    @property
    def tls_port(self) -> int:
        """The port the TLS listener listens on."""
        if self._tls_server is None:
            raise RuntimeError("the SCP has no TLS listener (ingress.tls is not set)")
        return self._tls_server.server_address[1]

    def stop(self) -> None:
        """Stop listening and end open associations."""
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()
        self._server = self._tls_server = None
        self._ae.shutdown()

    def _tally(self, assoc: Association) -> _AssociationTally:
        with self._tally_lock:
            return self._tallies.setdefault(assoc, _AssociationTally())

    def _on_requested(self, event: Event) -> None:
        """Reject the association now when the policy refuses the sender (A-ASSOCIATE-RJ with the reason);
        logged and audited before the answer goes out, so both are on record when the sender sees it."""
        request = event.assoc.requestor.primitive
        calling, called = str(request.calling_ae_title).strip(), str(request.called_ae_title).strip()
        address = event.assoc.requestor.address
        rejection = self.policy.check(calling, called, address)
        if rejection is None:
            return
        log.warning("rejected association from %s (%s:%d) to %s: %s", calling, address,
                    event.assoc.requestor.port, called, rejection.reason)
        if self.audit is not None:
            from radnode.security.audit import NODE_AUTHENTICATION, dicom_node

            self.audit.security_alert(alert=NODE_AUTHENTICATION, description=f"association rejected: {rejection.reason}",
                                      performer=dicom_node(calling, address, True, None))
        event.assoc.acse.send_reject(REJECTED_PERMANENT, SERVICE_USER, rejection.diagnostic)
        evt.trigger(event.assoc, evt.EVT_REJECTED, {})
        event.assoc.kill()  # as pynetdicom's own rejection: waits until the A-ASSOCIATE-RJ is out before closing

    def _on_handshake_failed(self, peer: str, reason: str) -> None:
        self.tls_failures += 1
        log.warning("TLS handshake with %s failed: %s", peer, reason)
        if self.audit is not None:
            from radnode.security.audit import NODE_AUTHENTICATION, Participant

            host = peer.rsplit(":", 1)[0]
            self.audit.security_alert(alert=NODE_AUTHENTICATION, description=f"TLS handshake failed: {reason}",
                                      performer=Participant(host, True, address=host))

    @staticmethod
    def _on_echo(event: Event) -> int:
        return STATUS_SUCCESS

    def _on_received(self, ds: Dataset, origin: Origin, arrival: Arrival) -> None:
        tally = getattr(self._current, "tally", None)
        if tally is None:  # an instance from another ingress path (Orthanc)
            return
        study = tally.studies.setdefault(str(ds.StudyInstanceUID), _StudyTally(str(ds.get("PatientID", "") or "")))
        study.sop_classes[str(ds.get("SOPClassUID", "") or "")] += 1

    def _on_store(self, event: Event) -> int | Dataset:
        requestor = event.assoc.requestor
        tally = self._tally(event.assoc)
        origin = Origin(requestor.ae_title, f"{requestor.address}:{requestor.port}", tally.id,
                        event.assoc.acceptor.ae_title)
        meta = b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta)
        if tally.identity is None:
            tally.identity = _tls_identity(event.assoc)
        self._current.tally = tally
        try:
            arrival = self.ingest.receive(meta, event.request.DataSet.getbuffer(), origin)
        except Refused as e:
            tally.refused += 1
            log.warning("refused C-STORE %s from %s (%s): %s", event.request.AffectedSOPInstanceUID,
                        origin.calling_ae, origin.peer_address, e)
            return _failure(STATUS_CANNOT_UNDERSTAND, str(e))
        except OutOfSpace as e:  # the guard logged it, with the free space
            tally.refused += 1
            return _failure(STATUS_OUT_OF_RESOURCES, str(e.strerror))
        except OSError as e:
            tally.refused += 1
            log.error("cannot spool C-STORE from %s: %s", origin.calling_ae, e)
            return _failure(STATUS_OUT_OF_RESOURCES, f"cannot store: {e.strerror}")
        finally:
            self._current.tally = None
        if arrival is Arrival.DUPLICATE:
            tally.repeated += 1
        else:
            tally.stored += 1
        return STATUS_SUCCESS

    def _on_end(self, event: Event) -> None:
        with self._tally_lock:
            tally = self._tallies.pop(event.assoc, None)
        if tally is None:
            return
        if event.event is evt.EVT_RELEASED:  # an abort may leave the study half sent: no early trigger
            self.ingest.store.association_released(tally.id)
        requestor = event.assoc.requestor
        log.info("association %s from %s (%s:%d) %s: %d stored, %d duplicate, %d refused", tally.id,
                 requestor.ae_title, requestor.address, requestor.port, event.event.name.removeprefix("EVT_").lower(),
                 tally.stored, tally.repeated, tally.refused)
        if self.audit is not None:
            self._audit_received(event.assoc, tally, aborted=event.event is not evt.EVT_RELEASED)

    def _audit_received(self, assoc: Association, tally: _AssociationTally, aborted: bool) -> None:
        """One DICOM Instances Transferred message per study the association carried (action Create)."""
        from radnode.security.audit import DESTINATION, MINOR_FAILURE, SOURCE, SUCCESS, Participant, StudyObject, \
            dicom_node

        requestor = assoc.requestor
        source = dicom_node(requestor.ae_title, requestor.address, True, SOURCE)
        if tally.identity:
            source = Participant(source.user_id, True, SOURCE, source.ae_titles, tally.identity, source.address)
        destination = Participant(f"{self.config.ae_title}@{self.audit.host}", False, DESTINATION,
                                  (assoc.acceptor.ae_title,), "radnode")
        problems = [f"{tally.refused} refused"] if tally.refused else []
        problems += ["association aborted"] if aborted else []
        for study_uid, study in tally.studies.items():
            self.audit.instances_transferred(
                study=StudyObject(study_uid, dict(study.sop_classes)), patient_id=study.patient_id or None,
                source=source, destination=destination, outcome=MINOR_FAILURE if problems else SUCCESS,
                description="; ".join(problems) or None)


def _tls_identity(assoc: Association) -> str:
    """The subject of the peer's verified TLS certificate, '' on a plain association or without one."""
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    try:
        return peer_identity(sock) if sock is not None else ""
    except (OSError, ValueError):
        return ""


def _failure(status: int, comment: str) -> Dataset:
    response = Dataset()
    response.Status = status
    response.ErrorComment = comment[:64]
    return response
