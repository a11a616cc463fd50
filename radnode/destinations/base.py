"""What every destination type shares: its settings model, the objects it is handed, what it answers.

A destination type is one class in one module of this package (``dicom.py``, ``dicomweb.py``, ...): its pydantic
fields are its configuration (validated with the file and key named on error), ``shorthand`` turns the one-line
form (``TYPE:ARGUMENT``) into those fields, ``describe`` says in one line where it sends (never a secret),
``wants`` picks the outbox files it takes, ``send`` delivers a batch and answers one :class:`Outcome` per
item, and ``check`` asks the peer whether it would take results now, sending none (the console's live check). Egress (``radnode/node/egress.py``) owns queues, retries and the job store; a type never touches them.

What a destination does to what it sends is a field of its own type and a step inside its ``send`` (DICOM TLS
on ``dicom``: ``tls_args`` where it associates), or a field here applied by egress before ``send`` for every
type (a de-identification profile); ``wants`` decides which outputs a destination takes (an Encapsulated-PDF
option). Every delivered DICOM object's SOP Instance UID is kept per delivery (``Outcome.sent_uid``), so a
later rejection note can name exactly what each destination received.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from radnode.outputs.layout import RunOutput, is_dicom

if TYPE_CHECKING:
    from radnode.config import OrthancConfig

FHIR_BUNDLE = RunOutput.FHIR_BUNDLE.file
"""The transaction Bundle a run writes for the EHR (the output layout's)."""

Seconds = Annotated[float, Field(gt=0)]


class Timeouts(BaseModel):
    """How long a destination may take at each step before the attempt fails (and is retried)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connect_seconds: Seconds = 10.0
    """TCP connection (DICOM and HTTP)."""
    acse_seconds: Seconds = 30.0
    """DICOM: the peer's answer to an association request or release."""
    dimse_seconds: Seconds = 60.0
    """DICOM: the peer's answer to one C-STORE (a PACS may compress or index before answering)."""
    network_seconds: Seconds = 60.0
    """Silence on an open connection (DICOM), or the wait for an HTTP answer (read timeout)."""


class TimeoutOverrides(BaseModel):
    """A destination's own timeouts; unset ones are the node's (``egress.timeouts``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connect_seconds: Seconds | None = None
    acse_seconds: Seconds | None = None
    dimse_seconds: Seconds | None = None
    network_seconds: Seconds | None = None

    def over(self, defaults: Timeouts) -> Timeouts:
        """These overrides laid over the node's defaults."""
        return defaults.model_copy(update=self.model_dump(exclude_none=True))


@dataclass(frozen=True)
class Item:
    """One outbox file to deliver, with the id of its delivery row."""

    delivery_id: int
    path: Path
    relative_path: str
    """Its place among the job's delivered files, for a destination that keeps the job's files together (a
    folder): ``seg.dcm``, a decision's ``review-3/report-sr.dcm``; a de-identified copy under the original's."""

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Outcome:
    """What became of one item: delivered (``ok``) with a message for the job's events, or failed with its cause.

    ``sent_uid`` is the SOP Instance UID of a DICOM object that went out, kept per delivery (a later rejection
    note must name exactly what each destination received).
    """

    item: Item
    ok: bool
    message: str
    sent_uid: str | None = None


def sop_instance_uid(path: Path) -> str | None:
    """The SOP Instance UID of a DICOM file, for ``Outcome.sent_uid`` (None for other files, or one unreadable:
    what was sent is what counts; the UID is bookkeeping)."""
    if path.suffix != ".dcm":
        return None
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    except (OSError, InvalidDicomError, AttributeError):
        return None


@dataclass(frozen=True)
class Check:
    """What a live check of a destination found: whether it answers as a destination of its type, in a few words
    (the console's destinations page)."""

    ok: bool
    detail: str


class Cancellation:
    """Lets the node end a send in progress when it stops: a type that can abort registers how
    (:meth:`on_cancel`), egress calls :meth:`cancel` from another thread. Types that cannot run to their timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abort: Callable[[], None] | None = None
        self.cancelled = False

    def on_cancel(self, abort: Callable[[], None] | None) -> None:
        """Set (or clear, with None) what ends the send in progress; called at once if already cancelled."""
        with self._lock:
            self._abort = abort
            cancelled = self.cancelled
        if cancelled and abort is not None:
            abort()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            abort = self._abort
        if abort is not None:
            abort()


@dataclass(frozen=True)
class SendContext:
    """What a send needs from the node: its AE title, the destination's effective timeouts, the Orthanc it
    works with, the job (for messages), the worker's cancellation and where each outcome is recorded."""

    ae_title: str
    timeouts: Timeouts
    orthanc: "OrthancConfig"
    job_id: int
    cancellation: Cancellation = field(default_factory=Cancellation)
    on_outcome: Callable[[Outcome], None] | None = None
    """Egress records each outcome here the moment it is known (a type that sends item by item calls
    :meth:`answered` after each): a kill between two C-STOREs never loses the record of the first, so it is
    never sent twice."""

    def answered(self, outcome: Outcome) -> Outcome:
        """Hand one item's outcome to egress at once (see ``on_outcome``); returns it."""
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        return outcome


class DestinationError(ValueError):
    """A destination that cannot be configured; ``key`` is where in the mapping (``type``, ``port``, ...)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class Destination(BaseModel, ABC):
    """One place results go. Subclasses set ``type`` (a ``Literal``) and register with
    :func:`radnode.destinations.registry.destination_type`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    forward_only: bool = False
    """Only what a routing rule forwards here goes here; otherwise every pipeline's results do."""
    encapsulated_pdf: bool = False
    """Also send the report as an Encapsulated PDF instance (the output layout's ``REPORT_PDF_DICOM``), for a PACS
    or viewer that does not render the report SR; off, a destination gets the SR alone."""
    deidentify: str | None = None
    """A de-identification profile (``basic``, ``research`` or a ``deidentification.profiles`` name): every DICOM
    object sent here is a de-identified copy (PS3.15 Annex E, :mod:`radnode.security.deid`), objects the profile
    refuses (burned-in annotation) and files that are not DICOM (a FHIR Bundle names the patient) are not sent,
    with the reason in the job's events."""
    timeouts: TimeoutOverrides = TimeoutOverrides()

    kind: ClassVar[str]
    """The ``type`` value that selects this class."""

    @classmethod
    def shorthand(cls, argument: str) -> dict[str, Any]:
        """The fields of ``TYPE:ARGUMENT`` (the part after the colon); types without a one-line form refuse."""
        raise DestinationError(f"destination type '{cls.kind}' has no one-line form; write it as a mapping "
                               f"with type: {cls.kind}")

    @abstractmethod
    def describe(self) -> str:
        """Where it sends, in one line for logs, events and the console; never a secret."""

    def wants(self, name: str) -> bool:
        """Whether this destination takes the outbox file ``name``; DICOM objects by default (by the output layout,
        :func:`radnode.outputs.layout.is_dicom`), the Encapsulated PDF only with :attr:`encapsulated_pdf`."""
        if name == RunOutput.REPORT_PDF_DICOM.file:
            return self.encapsulated_pdf
        return is_dicom(name)

    @abstractmethod
    def send(self, items: list[Item], context: SendContext) -> list[Outcome]:
        """Deliver the items of one job, answering one outcome per item; never raises for a peer's failure."""

    @abstractmethod
    def check(self, context: SendContext) -> Check:
        """Whether the peer answers now as this type's peer (C-ECHO, a FHIR CapabilityStatement, ...), with the
        destination's timeouts; sends no result and never raises for a peer's failure."""
