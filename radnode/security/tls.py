"""TLS for DICOM associations (PS3.15 B.9, the BCP 195 secure transport profile) and for syslog.

:func:`server_context` and :func:`client_context` build :class:`ssl.SSLContext` objects from a
:class:`radnode.config.TlsConfig`: TLS 1.2 at least, the system's default (secure) cipher list, the
peer's certificate checked against the configured CA bundle. :class:`TlsAssociationServer` is pynetdicom's
association server with the handshake moved from its accept loop into the connection's own thread, with a
deadline: pynetdicom's server does the handshake in ``get_request``, so one client that connects and sends
nothing stalls every other sender, and a failed handshake vanishes without a trace. Here a failed or
timed-out handshake is reported (logged once with the peer's address, counted, audited) and only that
connection ends.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

from pynetdicom.transport import ThreadedAssociationServer

from radnode.config import TlsConfig

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_SECONDS = 10.0
"""A TLS client that has not finished its handshake by then is dropped."""

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsSetupError(ValueError):
    """A certificate, key or CA bundle that cannot be used; names the file and what is wrong."""


def _load_chain(context: ssl.SSLContext, tls: TlsConfig, what: str) -> None:
    if tls.certificate is None:
        return
    if tls.private_key is None:
        raise TlsSetupError(f"{what}: certificate {tls.certificate} given without its private_key")
    password = tls.private_key_password.reveal() if tls.private_key_password else None
    try:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key), password)
    except FileNotFoundError as e:
        raise TlsSetupError(f"{what}: {e.filename}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        raise TlsSetupError(f"{what}: certificate {tls.certificate} / key {tls.private_key} cannot be loaded "
                            f"({getattr(e, 'reason', None) or e})") from None


def _load_ca(context: ssl.SSLContext, ca_bundle: Path, what: str) -> None:
    try:
        context.load_verify_locations(cafile=str(ca_bundle))
    except FileNotFoundError:
        raise TlsSetupError(f"{what}: CA bundle {ca_bundle}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        raise TlsSetupError(f"{what}: CA bundle {ca_bundle} cannot be loaded ({e})") from None


def server_context(tls: TlsConfig, require_client_certificate: bool = False, what: str = "ingress.tls") -> ssl.SSLContext:
    """The listener's context: its certificate and key; with ``require_client_certificate`` every client must
    present a certificate that chains to ``ca_bundle`` (mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    _load_chain(context, tls, what)
    if tls.ca_bundle is not None:
        _load_ca(context, tls.ca_bundle, what)
    if require_client_certificate:
        if tls.ca_bundle is None:
            raise TlsSetupError(f"{what}: mutual TLS needs ca_bundle")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(tls: TlsConfig, what: str) -> ssl.SSLContext:
    """A client's context: the server's certificate checked against ``ca_bundle`` (only those CAs; unset: the
    system's) and its host name; this side's certificate offered when one is configured (mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the host name
    context.minimum_version = _VERSIONS[tls.min_version]
    if tls.ca_bundle is not None:
        _load_ca(context, tls.ca_bundle, what)  # only the site's CAs, not every public one
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    _load_chain(context, tls, what)
    return context


def peer_identity(sock: socket.socket) -> str:
    """The subject of a TLS peer's verified certificate (``CN=…``), or '' without one."""
    if not isinstance(sock, ssl.SSLSocket):
        return ""
    cert = sock.getpeercert() or {}
    parts = [f"{_SHORT_NAMES.get(k, k)}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    return ",".join(parts)


_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
                "localityName": "L", "stateOrProvinceName": "ST"}


HandshakeFailed = Callable[[str, str], None]
"""Called with the peer's ``host:port`` and the reason when a TLS handshake fails."""


class TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server, with the TLS handshake done in each connection's thread
    under :data:`HANDSHAKE_TIMEOUT_SECONDS` and failures reported to ``on_handshake_failed``."""

    on_handshake_failed: HandshakeFailed | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if isinstance(request, ssl.SSLSocket):
            previous = request.gettimeout()
            request.settimeout(HANDSHAKE_TIMEOUT_SECONDS)
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as e:
                peer = f"{client_address[0]}:{client_address[1]}"
                reason = getattr(e, "reason", None) or str(e) or type(e).__name__
                if self.on_handshake_failed is not None:
                    self.on_handshake_failed(peer, str(reason))
                self.shutdown_request(request)
                return
            request.settimeout(previous)
        super().process_request_thread(request, client_address)
