"""DICOM C-STORE to a PACS or any Storage SCP (pynetdicom), one association per job and destination.

The failure message says what happened at the network level — ``connection refused``, ``timed out after N s``
(which step), ``association rejected: ...`` with the peer's reason, the C-STORE status with its comment — so an
operator can tell a wrong port from a wrong AE title from a PACS that is down. A result re-sent is the same
outbox file, hence the same SOP Instance UID; each success reports the UID that went out.

With ``tls:`` the association runs over TLS (PS3.15 B.9, TLS 1.2 or newer): the peer's certificate is checked
against ``tls.ca_bundle`` and its host name, and the node's ``certificate``/``private_key`` are offered for mutual
TLS (:mod:`radnode.security.tls`); a failed handshake is named as such.
"""

from __future__ import annotations

import socket
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from radnode.config import TlsConfig
from radnode.destinations.base import Check, Destination, DestinationError, Item, Outcome, SendContext
from radnode.destinations.registry import destination_type

if TYPE_CHECKING:
    import ssl

    from pynetdicom import AE
    from pynetdicom.association import Association

AETitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[^\\\x00-\x1f]+$")]
"""At most 16 characters, no backslash or control character (PS3.5 AE value representation)."""


@destination_type
class DicomDestination(Destination):
    """``{type: dicom, ae_title: PACS, host: 10.0.0.5, port: 104}``; one line: ``PACS@10.0.0.5:104``."""

    kind = "dicom"
    type: Literal["dicom"] = "dicom"
    ae_title: AETitle
    host: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(ge=1, le=65535)]
    tls: TlsConfig | None = None
    """Associate over TLS: ``ca_bundle`` the CAs the peer's certificate must chain to (unset: the system's),
    ``certificate``/``private_key`` the node's own for mutual TLS."""

    @classmethod
    def shorthand(cls, argument: str) -> dict[str, Any]:
        ae_title, at, address = argument.strip().partition("@")
        host, colon, port = address.rpartition(":")
        if not (at and colon and ae_title and host and port.isdigit()):
            raise DestinationError(f"expected AET@HOST:PORT, e.g. PACS@10.0.0.5:104, got {argument!r}")
        return {"ae_title": ae_title, "host": host, "port": int(port)}

    def describe(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls is not None else "")

    def send(self, items: list[Item], context: SendContext) -> list[Outcome]:
        """C-STORE each item over one association; each answer is an outcome of its own."""
        outcomes: list[Outcome] = []
        contexts, readable, uids = self._presentation_contexts(items, outcomes)
        if not readable:
            return outcomes
        from radnode.security.tls import TlsSetupError

        try:
            tls_args = None if self.tls is None else (self._tls_context(), self.host)
        except TlsSetupError as e:  # a certificate, key or CA bundle that cannot be used
            return outcomes + [Outcome(item, False, str(e)) for item in readable]
        ae = self._application_entity(context, contexts)
        connected: list[Association] = []  # set once TCP is up: the association still being negotiated
        started = time.monotonic()
        context.cancellation.on_cancel(lambda: _abort_now(ae, connected))
        try:
            from pynetdicom import evt

            assoc = ae.associate(self.host, self.port, ae_title=self.ae_title, tls_args=tls_args,
                                 evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.append(event.assoc))])
            if not assoc.is_established:
                why = self._not_established(assoc, bool(connected), time.monotonic() - started, context)
                return outcomes + [Outcome(item, False, why) for item in readable]
            try:
                for item in readable:  # each recorded by egress as it is answered: the window to lose it is one item
                    outcomes.append(context.answered(self._store(assoc, item, uids[item.delivery_id], context)))
            finally:
                if assoc.is_established:
                    assoc.release()
        finally:
            context.cancellation.on_cancel(None)
        return outcomes

    def check(self, context: SendContext) -> Check:
        """C-ECHO (Verification) with the node's AE title: the same association a delivery would open (over
        TLS with this destination's ``tls``: a plain one would neither reach a TLS peer nor test its trust)."""
        from pydicom.uid import ImplicitVRLittleEndian
        from pynetdicom import evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        from radnode.security.tls import TlsSetupError

        try:
            tls_args = None if self.tls is None else (self._tls_context(), self.host)
        except TlsSetupError as e:  # a certificate, key or CA bundle that cannot be used
            return Check(False, str(e))
        ae = self._application_entity(context, {Verification: {ImplicitVRLittleEndian}})
        connected: list[Association] = []
        started = time.monotonic()
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title, tls_args=tls_args,
                             evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.append(event.assoc))])
        if not assoc.is_established:
            return Check(False, self._not_established(assoc, bool(connected), time.monotonic() - started, context))
        try:
            status = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        code = status.get("Status") if status else None
        if code == 0:
            return Check(True, f"C-ECHO to {self.describe()}: status 0x0000")
        if code is None:
            return Check(False, f"no C-ECHO answer from {self.describe()} within {context.timeouts.dimse_seconds:g} s")
        return Check(False, f"{self.describe()} answered the C-ECHO with status 0x{code:04X}")

    def _presentation_contexts(self, items: list[Item], outcomes: list[Outcome]
                               ) -> tuple[dict[str, set[str]], list[Item], dict[int, str]]:
        """SOP class → transfer syntaxes to propose, the items that could be read, their SOP Instance UIDs."""
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        syntaxes: dict[str, set[str]] = defaultdict(set)
        readable, uids = [], {}
        for item in items:
            try:
                meta = pydicom.dcmread(item.path, stop_before_pixels=True,
                                       specific_tags=["SOPClassUID", "SOPInstanceUID"])
                ts = meta.file_meta.TransferSyntaxUID
                sop_class, uid = meta.SOPClassUID, meta.SOPInstanceUID
            except (OSError, InvalidDicomError, AttributeError) as e:
                outcomes.append(Outcome(item, False, f"cannot read {item.name} from the outbox: {e}"))
                continue
            syntaxes[sop_class] |= {ts} if ts.is_compressed else {ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian}
            readable.append(item)
            uids[item.delivery_id] = str(uid)
        return syntaxes, readable, uids

    def _tls_context(self) -> "ssl.SSLContext":
        from radnode.security.tls import client_context

        assert self.tls is not None
        return client_context(self.tls, f"destination {self.describe()}")

    def _application_entity(self, context: SendContext, contexts: dict[str, set[str]]) -> "AE":
        """The node's requesting AE with this destination's timeouts and the contexts to propose."""
        from pynetdicom import AE

        ae = AE(ae_title=context.ae_title)
        t = context.timeouts
        ae.connection_timeout = t.connect_seconds
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = t.acse_seconds, t.dimse_seconds, t.network_seconds
        for sop_class, transfer_syntaxes in contexts.items():
            ae.add_requested_context(sop_class, sorted(transfer_syntaxes))
        return ae

    def _not_established(self, assoc: "Association", connected: bool, elapsed: float, context: SendContext) -> str:
        """Why the association did not come up, from what the peer did (or did not do)."""
        t = context.timeouts
        where = f"{self.describe()}"
        if assoc.is_rejected:
            answer = assoc.acceptor.primitive
            if answer is not None:
                return (f"association rejected by {where}: {answer.reason_str} "
                        f"({answer.result_str}, by the {answer.source_str})")
            return f"association rejected by {where}"
        if not connected:
            if elapsed >= t.connect_seconds * 0.95:
                return f"cannot connect to {where}: timed out after {t.connect_seconds:g} s"
            return f"cannot connect to {where}: {self._connect_error(t.connect_seconds)}"
        if assoc.acceptor.primitive is None and elapsed >= t.acse_seconds * 0.95:
            return (f"{where} accepted the connection but did not answer the association request: "
                    f"timed out after {t.acse_seconds:g} s")
        if assoc.acceptor.primitive is not None and not assoc.accepted_contexts:
            return f"{where} accepted none of the proposed presentation contexts (SOP class / transfer syntax)"
        closed = f"{where} closed the connection during association negotiation"
        if self.tls is not None:  # TLS 1.3 tells a client its certificate was refused only after the handshake
            closed += " (over TLS also how a peer refuses the node's client certificate: none given, or not trusted)"
        return closed

    def _connect_error(self, timeout: float) -> str:
        """The operating system's reason a TCP connection (or its TLS handshake) fails (pynetdicom only logs it):
        one probe."""
        import ssl

        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as connection:
                if self.tls is not None:
                    try:
                        with self._tls_context().wrap_socket(connection, server_hostname=self.host):
                            pass
                    except ssl.SSLError as e:
                        return f"TLS handshake failed: {e.reason or e}"
                return "the connection failed, and a retry now succeeds (the peer is coming up?)"
        except ConnectionRefusedError:
            return "connection refused (nothing listens on that port)"
        except TimeoutError:
            return f"timed out after {timeout:g} s"
        except socket.gaierror as e:
            return f"cannot resolve host {self.host!r}: {e.strerror}"
        except OSError as e:
            return (e.strerror or str(e)).lower()

    def _store(self, assoc: "Association", item: Item, uid: str, context: SendContext) -> Outcome:
        """One C-STORE; success or warning statuses deliver, anything else fails with the status and comment."""
        if not assoc.is_established:
            return Outcome(item, False, f"association with {self.describe()} ended before {item.name} was sent")
        try:
            status = assoc.send_c_store(item.path)
        except (ValueError, RuntimeError, OSError) as e:
            return Outcome(item, False, f"cannot send {item.name}: {e}")
        code = status.get("Status") if status else None
        if code is not None and (code == 0 or code & 0xF000 == 0xB000):
            return Outcome(item, True, f"{item.name} → {self.describe()} (status 0x{code:04X})", sent_uid=uid)
        if code is None:
            if assoc.is_aborted or not assoc.is_established:
                return Outcome(item, False, f"{self.describe()} aborted the association during the C-STORE")
            return Outcome(item, False, f"no C-STORE answer from {self.describe()}: timed out after "
                                        f"{context.timeouts.dimse_seconds:g} s")
        comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
        return Outcome(item, False, f"{self.describe()} answered status 0x{code:04X}{comment}")


def _abort_now(ae: "AE", connected: list["Association"]) -> None:
    """End the AE's association at once, also one still waiting for the peer's answer (it runs in the requesting
    thread, not among ``active_associations``): closing the transport connection wakes pynetdicom's waits, where
    an A-ABORT alone would wait out the ACSE or DIMSE timeout. The DUL reactor can die on the closed socket before
    it tells the waiting thread, so an A-P-ABORT is also put where that thread reads the peer's answer: pynetdicom's
    ACSE takes it as the association aborted and returns at once."""
    from pynetdicom.pdu_primitives import A_P_ABORT

    for assoc in [*connected, *ae.active_associations]:
        transport = assoc.dul.socket
        if transport is not None:
            transport.close()
        assoc.dul.to_user_queue.put(A_P_ABORT())
    ae.shutdown()
