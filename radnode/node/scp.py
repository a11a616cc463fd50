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
import functools
import logging
import os
import re
import shutil
import secrets
import socket
import ssl
import struct
import threading
import time
import uuid
import weakref
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from radnode.config import Config, IngressConfig, RetentionConfig
from radnode.imaging.plausibility import PLAUSIBILITY_TAGS, implausible, native_size_problem
from radnode.log_safety import escape_control
from radnode.node.completeness import COMPLETENESS_TAGS, expected_instances, study_expected_instances
from radnode.node.store import Arrival, ForeignInstance, Instance, InstanceBeingPurged, InstanceFileGone, JobStore
from radnode.pipelines.routing import LateInstances, RoutingContext, SeriesDecision
from radnode.pipelines.rules import DEFAULT_RULES, RuleSet, load_rules
from radnode.security.access import REJECTED_PERMANENT, SERVICE_USER, PeerPolicy
from radnode.security.tls import TlsAssociationServer, peer_identity, server_context

if TYPE_CHECKING:
    from radnode.node.receivers import SharedAssociations
    from radnode.security.audit import AuditTrail

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000

PIXEL_DATA = 0x7FE00010

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
            self._into_place(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def adopt(self, source: Path, target: Path) -> None:
        """Move a received file into place as ``target`` (renamed when on the spool's file system, else copied
        in chunks, never read whole), fsync'd if so set."""
        temp = self.incoming / f"{uuid.uuid4().hex}.part"
        try:
            try:
                os.link(source, temp)
            except OSError:  # another file system
                shutil.copyfile(source, temp)
            if self.fsync:
                with open(temp, "rb") as f:
                    os.fsync(f.fileno())
            self._into_place(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def _into_place(self, temp: Path, target: Path) -> None:
        """Rename a finished temporary file to ``target`` (its folder fsync'd if so set); a retention purge may
        remove the emptied folder in between, so the folder is made again, up to three times."""
        for attempt in range(3):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(temp, target)
                break
            except FileNotFoundError:
                if attempt == 2:
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


def _refused_key(ds: Dataset) -> str:
    """The refused instance's SOP Instance UID; for one without any, a key of its own, so each such instance
    counts (a corrected re-send cannot clear it: the operator retries the job without it)."""
    uid = str(ds.get("SOPInstanceUID", "") or "").strip()[:64]
    return uid or f"(no SOP Instance UID) {secrets.token_hex(6)}"


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
        self.tags = sorted({*INDEX_TAGS, *COMPLETENESS_TAGS, *PLAUSIBILITY_TAGS, *rules.keywords})
        """The tags parsed on receipt: the index's, the expected-count signals, the header checks and what
        routing reads."""

    def route(self, ds: Dataset, origin: "Origin") -> SeriesDecision:
        """The series' decision as the node takes it; a pipeline the sender may not trigger is withheld (and
        named in the decision's description)."""
        context = RoutingContext(calling_ae=origin.calling_ae, called_ae=origin.called_ae)
        decision = self.rules.route(ds, context).with_defaults(self.late_instances)
        if self.policy is None:
            return decision
        return self.policy.restrict(decision, origin.calling_ae, origin.peer_address.rsplit(":", 1)[0])


def index_tags(source: BytesIO | Path, tags: list[str] = INDEX_TAGS) -> Dataset:
    """Parse only the tags the index (and the router) needs; Pixel Data's length is read, never its value.

    A data set that cannot be parsed (truncated, a bad deflate stream, sequences nested past any sense) is
    :class:`Refused` with one line; nothing of the parser's traceback reaches the sender or the log.
    """
    try:
        ds = pydicom.dcmread(source, specific_tags=_tag_numbers(tuple(tags)), defer_size=256)
        for tag in list(ds.keys()):  # decode the few values now (Pixel Data's stays unread)
            if tag != PIXEL_DATA:
                ds[tag]
    except RecursionError:
        raise Refused("cannot read data set: sequences nested too deep") from None
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, TypeError, AttributeError, IndexError,
            OverflowError, NotImplementedError, zlib.error, struct.error) as e:
        raise Refused(f"cannot read data set: {type(e).__name__}: {str(e)[:120]}") from None
    return ds


@functools.lru_cache(maxsize=16)
def _tag_numbers(keywords: tuple[str, ...]) -> list[int]:
    """The tags to parse as numbers, Pixel Data's included (pydicom looks keywords up on every read: 10 % of the
    header parse)."""
    return [*(tag for k in keywords if (tag := tag_for_keyword(k)) is not None), PIXEL_DATA]


def _uid(ds: Dataset, keyword: str) -> str:
    """One UID attribute as text; Refused naming it when absent, multi-valued or not a valid UID."""
    value = ds.get(keyword)
    if value is None or value == "":
        raise Refused(f"no {keyword}")
    if not isinstance(value, str):
        count = len(value) if hasattr(value, "__len__") else "several"
        raise Refused(f"{keyword} has {count} values, expected one UID")
    if len(value) > 64 or not _UID.fullmatch(value):
        raise Refused(f"{keyword} {value[:70]!r} is not a valid UID")
    return str(value)


def content_problem(ds: Dataset, size: int) -> str | None:
    """Why the instance (``size`` bytes as received) cannot be a real image: an implausible header, or pixel
    data shorter than declared (a truncated file). The attribute is named; None if fine."""
    problem = implausible(ds)
    if problem is not None:
        return problem
    pixels = ds._dict.get(PIXEL_DATA)
    if pixels is None:  # a header without pixels is parseable: the pipeline refuses it, naming PixelData
        return None
    length, start = getattr(pixels, "length", None), getattr(pixels, "value_tell", None)
    if length is None or start is None or length == 0xFFFFFFFF:  # encapsulated: fragments, not checked here
        return None
    held = max(0, min(length, size - start))
    if held < length:
        return f"PixelData declares {length} bytes, the instance ends after {held}"
    transfer = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if transfer is not None and not transfer.is_compressed:
        return native_size_problem(ds, length)
    return None


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

    Both ingress paths (the node's own SCP and instances pulled from Orthanc) come through here. Before
    anything is kept, the instance is checked: UIDs safe as file names, a plausible image header
    (``imaging.plausibility``), and a SOP Instance UID that is not another study's. A refusal for the
    instance's content is recorded with its study (which is then not processed incomplete).
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

    @classmethod
    def for_node(cls, config: Config, store: JobStore, rules: RuleSet) -> "Ingest":
        """The ingest a node (or each of its receiver processes) runs: the rules with the node's late-instance
        and peer policies, the spool under ``data_dir`` (fsync'd per ``ingress.sync_spool``) and its disk guard."""
        ingress = config.ingress
        spool = Spool(config.data_dir / "spool", fsync=ingress.sync_spool)
        router = Router(rules, LateInstances(ingress.late_instances), PeerPolicy(ingress))
        return cls(spool, store, router, DiskGuard.from_config(spool.root, config.retention))

    def receive(self, meta: bytes | memoryview, dataset: bytes | memoryview, origin: Origin) -> Arrival:
        """Spool the encoded instance as it arrived and index it; raises Refused when it cannot be kept.

        ``meta`` is the preamble and file meta, ``dataset`` the encoded data set (a whole Part 10 file may
        be passed as ``meta`` with an empty ``dataset``). Raises OSError when it cannot be written:
        :class:`OutOfSpace` under the disk guard's minimum (nothing is written), ``InstanceBeingPurged``
        while retention is removing its earlier copy.
        """
        ds = index_tags(BytesIO(bytes(meta) + bytes(dataset)), self.router.tags)
        return self._keep(ds, origin, len(meta) + len(dataset), lambda path: self.spool.write(path, meta, dataset))

    def receive_file(self, source: Path, origin: Origin) -> Arrival:
        """The same for an instance the SCP received into a Part 10 file (never held in memory): the file is
        moved into the spool (copied when on another file system)."""
        ds = index_tags(source, self.router.tags)
        return self._keep(ds, origin, source.stat().st_size, lambda path: self.spool.adopt(source, path))

    def _keep(self, ds: Dataset, origin: Origin, size: int, write: Callable[[Path], None]) -> Arrival:
        study_uid = _uid(ds, "StudyInstanceUID")
        try:
            series_uid, sop_uid = _uid(ds, "SeriesInstanceUID"), _uid(ds, "SOPInstanceUID")
            path = self.spool.path_for(study_uid, series_uid, sop_uid)
            if (problem := content_problem(ds, size)) is not None:
                raise Refused(problem)
            prior = self.store.prior(sop_uid)
            if prior is not None and prior.study_instance_uid != study_uid:
                raise Refused(f"SOPInstanceUID {sop_uid} already belongs to study {prior.study_instance_uid}")
        except Refused as e:
            self.store.record_refusal(study_uid, _refused_key(ds), str(e), origin.calling_ae)
            raise
        written = prior is None or not prior.kept  # else the earlier copy's file stands for this one
        if written:
            if prior is not None and prior.being_purged:
                raise InstanceBeingPurged(f"{sop_uid} is being removed by retention; send it again later")
            self._write(path, size, write)
        try:
            try:
                arrival, job_id = self._record(ds, path, origin, written)
            except InstanceFileGone:  # retention removed that copy since our look: keep this one
                self._write(path, size, write)
                arrival, job_id = self._record(ds, path, origin, True)
        except ForeignInstance as e:  # recorded under another study between our look and our insert
            self.store.record_refusal(study_uid, sop_uid, str(e), origin.calling_ae)
            raise Refused(str(e)) from None
        self._note_study(ds)
        if arrival is not Arrival.NEW:
            log.debug("%s instance %s from %s (job %d)", arrival, sop_uid, origin.calling_ae, job_id)
        if self.on_received is not None:
            self.on_received(ds, origin, arrival)
        return arrival

    def _write(self, path: Path, size: int, write: Callable[[Path], None]) -> None:
        """Spool the received copy at ``path``, under the disk guard's minimum free space."""
        if self.guard is not None:
            self.guard.check(size)
        write(path)

    def _record(self, ds: Dataset, path: Path, origin: Origin, written: bool) -> tuple[Arrival, int]:
        """Index the instance (``written``: this copy's file was spooled, not an earlier copy's kept)."""
        return self.store.record_instance(describe(ds, path, origin, time.time()),
                                          lambda: self.router.route(ds, origin), expected_instances(ds),
                                          study_expected_instances(ds), file_written=written)

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
                if (problem := content_problem(ds, path.stat().st_size)) is not None:
                    raise Refused(problem)
                self.store.record_instance(describe(ds, path, origin, path.stat().st_mtime),
                                           lambda: self.router.route(ds, origin), expected_instances(ds))
                count += 1
            except (Refused, ForeignInstance) as e:
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


class Refusals:
    """Refused senders, for ``/metrics``: associations rejected by reason (``calling_ae``, ``called_ae``) and
    failed TLS handshakes. Counted in memory by the node's own SCP; with a ``ledger`` (the receiver processes'
    :class:`~radnode.node.receivers.SharedAssociations`) in it, so every receiver adds to the node's counts."""

    _TLS = "tls_failures"
    _REJECTED = "rejected:"

    def __init__(self, ledger: "SharedAssociations | None" = None) -> None:
        self.ledger = ledger
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def association_rejected(self, reason: str) -> None:
        self._add(self._REJECTED + reason)

    def tls_failed(self) -> None:
        self._add(self._TLS)

    def rejected(self) -> dict[str, int]:
        """Rejected associations by reason."""
        return {key.removeprefix(self._REJECTED): n for key, n in self._all().items() if key.startswith(self._REJECTED)}

    def tls_failures(self) -> int:
        """TLS handshakes refused or failed (no client certificate, untrusted CA, not TLS at all)."""
        return self._all().get(self._TLS, 0)

    def _add(self, key: str) -> None:
        if self.ledger is not None:
            self.ledger.count(key)
            return
        with self._lock:
            self._counts[key] += 1

    def _all(self) -> dict[str, int]:
        if self.ledger is not None:
            return self.ledger.counters()
        with self._lock:
            return dict(self._counts)


class StorageSCP:
    """pynetdicom Storage SCP (C-ECHO, C-STORE of every storage SOP class) feeding an :class:`Ingest`.

    It listens on ``ingress.host``: plain on ``ingress.port`` (unless ``plain_listener`` is off) and with TLS
    on ``ingress.tls.port`` when ``ingress.tls`` is set (see :mod:`radnode.security.tls`). Every association
    request passes the :class:`PeerPolicy` first (``allowed_peers``, ``reject_unknown``); a refusal is logged
    once with the peer's address, counted and audited as a Security Alert, like a failed TLS handshake.

    Bounded: at most ``ingress.max_associations`` associations at once and ``max_associations_per_peer`` per
    calling AE title (``ingress.peers`` may set one AE's own); one more is rejected as transient (local
    limit exceeded), so a sender retries. A connection that sends no association request within
    ``acse_timeout_seconds`` is dropped, an established one silent for ``network_timeout_seconds`` aborted.
    Each data set is received into a file by pynetdicom (``STORE_RECV_CHUNKED_DATASET``), never whole in
    memory, and moved into the spool. No exception leaves the C-STORE handler: every failure is one log line
    and a failure status with its reason.

    As one of the node's receiver processes (:mod:`radnode.node.receivers`) it accepts on the listening
    sockets it inherited (``listening``: ``plain`` / ``tls``, shared with its siblings), takes its association
    slots from the node-wide count in ``shared`` and counts its refusals there (:class:`Refusals`).
    """

    def __init__(self, config: IngressConfig, ingest: Ingest, audit: "AuditTrail | None" = None,
                 shared: "SharedAssociations | None" = None, listening: dict[str, socket.socket] | None = None) -> None:
        self.config = config
        self.ingest = ingest
        self.audit = audit
        self.shared = shared
        self.listening = listening or {}
        self.policy = ingest.router.policy or PeerPolicy(config)
        self.refusals = Refusals(shared)
        self._ae = self._make_ae(config)
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: TlsAssociationServer | None = None
        self._tallies: weakref.WeakKeyDictionary[Association, _AssociationTally] = weakref.WeakKeyDictionary()
        self._tally_lock = threading.Lock()
        self._current: threading.local = threading.local()
        self._tickets: weakref.WeakKeyDictionary[Association, str] = weakref.WeakKeyDictionary()
        """The shared association slot each association holds (with ``shared``)."""
        ingest.on_received = self._on_received

    @staticmethod
    def _make_ae(config: IngressConfig) -> AE:
        ae = AE(ae_title=config.ae_title)
        ae.maximum_pdu_size = config.max_pdu
        ae.maximum_associations = config.max_associations
        ae.acse_timeout = config.acse_timeout_seconds
        ae.dimse_timeout = config.dimse_timeout_seconds
        ae.network_timeout = config.network_timeout_seconds
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        return ae

    def start(self) -> None:
        """Listen on the configured address(es) (port 0: any free port, see :attr:`port`, :attr:`tls_port`)."""
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True  # every SCP of the process: handlers cope with both
        handlers = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_C_STORE, self._on_store), (evt.EVT_RELEASED, self._on_end),
                    (evt.EVT_ABORTED, self._on_end)]
        if self.shared is not None:
            handlers.append((evt.EVT_CONN_CLOSE, self._on_closed))
        tls = self.config.tls
        if tls is not None:
            context = server_context(tls, tls.require_client_certificate)
            server = self._serve((self.config.host, tls.port), handlers, context, self.listening.get("tls"))
            server.on_handshake_failed = self._on_handshake_failed
            self._tls_server = server
            log.info("Storage SCP %s listening with TLS %s+%s on %s:%d", self.config.ae_title, tls.min_version,
                     " (client certificates required)" if tls.require_client_certificate else "",
                     self.config.host, self.tls_port)
        if self.config.plain_listener:
            self._server = self._serve((self.config.host, self.config.port), handlers, None, self.listening.get("plain"))
            log.info("Storage SCP %s listening on %s:%d", self.config.ae_title, self.config.host, self.port)

    def _serve(self, address: tuple[str, int], handlers: list, ssl_context: ssl.SSLContext | None = None,
               inherited: socket.socket | None = None) -> ThreadedAssociationServer:
        """An association server on ``address`` (TLS with ``ssl_context``; accepting on the ``inherited``
        listening socket when given), serving in its own thread."""
        server_class: type[ThreadedAssociationServer] = TlsAssociationServer if ssl_context else ThreadedAssociationServer
        if inherited is not None:
            server_class = type(f"Inherited{server_class.__name__}", (_InheritedSocket, server_class),
                                {"inherited": inherited})
        server = self._ae.make_server(address, ssl_context=ssl_context, evt_handlers=handlers, server_class=server_class)
        name = "radnode-scp-tls" if ssl_context else "radnode-scp"
        threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
        self._ae._servers.append(server)  # so AE.shutdown() ends it, as with start_server
        return server

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
            self._limit_peer(event, calling)
            return
        log.warning("rejected association from %s (%s:%d) to %s: %s", calling, address,
                    event.assoc.requestor.port, called, rejection.reason)
        self.refusals.association_rejected(rejection.counter_key)
        if self.audit is not None:
            from radnode.security.audit import NODE_AUTHENTICATION, dicom_node

            self.audit.security_alert(alert=NODE_AUTHENTICATION, description=f"association rejected: {rejection.reason}",
                                      performer=dicom_node(calling, address, True, None))
        event.assoc.acse.send_reject(REJECTED_PERMANENT, SERVICE_USER, rejection.diagnostic)
        evt.trigger(event.assoc, evt.EVT_REJECTED, {})
        event.assoc.kill()  # as pynetdicom's own rejection: waits until the A-ASSOCIATE-RJ is out before closing

    def peer_limit(self, calling_ae: str) -> int:
        """How many associations at once the calling AE may hold."""
        peer = self.config.peers.get(calling_ae.strip())
        if peer is not None and peer.max_associations is not None:
            return peer.max_associations
        return self.config.max_associations_per_peer

    def _limit_peer(self, event: Event, calling: str) -> None:
        """Reject (transient, local limit exceeded) an association over its calling AE's limit (with ``shared``:
        over the node's limits counted over every receiver process)."""
        limit = self.peer_limit(calling)
        if self.shared is not None:
            with self._tally_lock:
                live = [t for a, t in self._tickets.items() if a.is_alive()]
            admission = self.shared.admit(calling, self.config.max_associations, limit, live)
            if admission.ticket is not None:
                with self._tally_lock:
                    self._tickets[event.assoc] = admission.ticket
                return
            log.warning("rejecting association from %s (%s): the node holds %d of its %d associations, this AE %d "
                        "of its %d", calling, event.assoc.requestor.address, admission.held,
                        self.config.max_associations, admission.held_by_peer, limit)
        else:
            holding = sum(1 for a in self._ae.active_associations
                          if a is not event.assoc and a.is_acceptor and a.is_established
                          and a.requestor.ae_title.strip() == calling)
            if holding < limit:
                return
            log.warning("rejecting association from %s (%s): it holds %d of its %d associations", calling,
                        event.assoc.requestor.address, holding, limit)
        event.assoc.acse.send_reject(0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit
        evt.trigger(event.assoc, evt.EVT_REJECTED, {})
        event.assoc.kill()  # as pynetdicom's own rejection: waits until the A-ASSOCIATE-RJ is out before closing

    def _on_handshake_failed(self, peer: str, reason: str) -> None:
        self.refusals.tls_failed()
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
        """Keep the instance or answer a failure status with a one-line reason; never raises."""
        try:
            return self._store(event)
        except Exception as e:
            log.error("C-STORE %s failed: %s: %s", _requested_uid(event), type(e).__name__, str(e)[:200])
            return _failure(STATUS_CANNOT_UNDERSTAND, f"cannot store: {type(e).__name__}")

    def _store(self, event: Event) -> int | Dataset:
        requestor = event.assoc.requestor
        tally = self._tally(event.assoc)
        origin = Origin(requestor.ae_title, f"{requestor.address}:{requestor.port}", tally.id,
                        event.assoc.acceptor.ae_title)
        if tally.identity is None:
            tally.identity = _tls_identity(event.assoc)
        self._current.tally = tally
        try:
            try:
                received = event.dataset_path
            except AttributeError:  # pynetdicom handed the data set in memory
                meta = b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta)
                arrival = self.ingest.receive(meta, event.request.DataSet.getbuffer(), origin)
            else:
                arrival = self.ingest.receive_file(Path(received), origin)
        except Refused as e:
            tally.refused += 1
            log.warning("refused C-STORE %s from %s (%s): %s", _requested_uid(event), origin.calling_ae,
                        origin.peer_address, e)
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
        try:
            self._ended(event)
        except Exception as e:  # never let the bookkeeping take the association thread down
            log.error("end of association: %s: %s", type(e).__name__, str(e)[:200])
        self._on_closed(event)

    def _on_closed(self, event: Event) -> None:
        """Give the association's shared slot back (at its release or abort, or when its connection closes)."""
        with self._tally_lock:
            ticket = self._tickets.pop(event.assoc, None)
        if ticket is not None and self.shared is not None:
            try:
                self.shared.release(ticket)
            except OSError as e:  # the slot is dropped at the next request anyway (no live association holds it)
                log.error("cannot release association slot: %s", e)

    def _ended(self, event: Event) -> None:
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


class _InheritedSocket:
    """Mixed into an association server: accept on a listening socket made by the node's process (shared by
    its receiver processes) instead of binding one. Non-blocking, so a receiver that lost the race for a
    connection to a sibling goes back to waiting instead of blocking in accept()."""

    inherited: socket.socket

    def server_bind(self) -> None:
        self.socket.close()  # type: ignore[attr-defined]
        self.socket = self.inherited
        self.socket.settimeout(0)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Already listening."""

    def server_close(self) -> None:
        """Close this process's descriptor only: a shutdown() would stop the siblings' listening too."""
        self.socket.close()


def _requested_uid(event: Event) -> str:
    """The Affected SOP Instance UID of a C-STORE request as logged (escaped, cut at 80 characters)."""
    try:
        return escape_control(str(event.request.AffectedSOPInstanceUID))[:80]
    except Exception:
        return "?"


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
