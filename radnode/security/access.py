"""Who may send: the calling AE title and address of an association, and the AE title it calls.

With ``ingress.reject_unknown`` an association is accepted only from a sender in ``ingress.allowed_peers``
(its AE title, and its address when the entry names a host or network) and only when it calls the node's
``ae_title`` or one of ``called_ae_titles``, as MONAI Informatics Gateway's ``rejectUnknownSources`` and
Orthanc's ``DicomCheckCalledAet`` do. A refusal is an A-ASSOCIATE-RJ (rejected-permanent, DICOM UL service
user) with the standard reason: calling AE title not recognised (3) or called AE title not recognised (7),
which DCMTK's storescu prints as such. Per peer, ``pipelines`` limits what its studies may run.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass, replace

from radnode.config import AllowedPeer, IngressConfig
from radnode.pipelines.routing import SeriesDecision

log = logging.getLogger(__name__)

REJECTED_PERMANENT, SERVICE_USER = 0x01, 0x01
CALLING_AE_NOT_RECOGNISED, CALLED_AE_NOT_RECOGNISED = 0x03, 0x07


@dataclass(frozen=True)
class Rejection:
    """Why an association is refused, as A-ASSOCIATE-RJ fields and in words."""

    diagnostic: int
    reason: str

    @property
    def counter_key(self) -> str:
        return "calling_ae" if self.diagnostic == CALLING_AE_NOT_RECOGNISED else "called_ae"


def _networks(host: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """A host entry as networks: an address or CIDR network as written, a host name as its addresses now."""
    try:
        return [ipaddress.ip_network(host, strict=False)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as e:
        log.error("ingress.allowed_peers: host %r cannot be resolved (%s); it matches no sender", host, e)
        return []
    return [ipaddress.ip_network(info[4][0]) for info in infos]


class PeerPolicy:
    """Decides, per association request, whether the sender may associate; counts the refusals."""

    def __init__(self, ingress: IngressConfig) -> None:
        self.enforced = ingress.reject_unknown
        self.called = {ingress.ae_title, *ingress.called_ae_titles}
        self.peers = list(ingress.allowed_peers)
        self._networks = {id(p): _networks(p.host) if p.host else None for p in self.peers}

    def match(self, calling_ae: str, address: str) -> AllowedPeer | None:
        """The allowed-peers entry for this sender (AE title, and address where the entry names one)."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            ip = None
        for peer in self.peers:
            if peer.ae_title != calling_ae:
                continue
            networks = self._networks[id(peer)]
            if networks is None or (ip is not None and any(ip in net for net in networks)):
                return peer
        return None

    def check(self, calling_ae: str, called_ae: str, address: str) -> Rejection | None:
        """None when the association may go ahead, else the rejection."""
        if not self.enforced:
            return None
        rejection = None
        if called_ae not in self.called:
            rejection = Rejection(CALLED_AE_NOT_RECOGNISED,
                                  f"called AE title {called_ae!r} is not this node's ({', '.join(sorted(self.called))})")
        elif self.match(calling_ae, address) is None:
            known = any(p.ae_title == calling_ae for p in self.peers)
            rejection = Rejection(CALLING_AE_NOT_RECOGNISED,
                                  f"calling AE title {calling_ae!r} is not allowed from {address}" if known else
                                  f"calling AE title {calling_ae!r} is not in ingress.allowed_peers")
        return rejection

    def allowed_pipelines(self, calling_ae: str, address: str) -> list[str] | None:
        """The pipelines a sender's studies may run (None: no limit)."""
        peer = self.match(calling_ae, address)
        return peer.pipelines if peer is not None else None

    def restrict(self, decision: SeriesDecision, calling_ae: str, address: str) -> SeriesDecision:
        """The rules' decision for a series this sender sent, with the pipelines its ``allowed_peers`` entry does
        not list moved to ``refused_pipelines`` (without an entry or a ``pipelines`` list, no limit): no job is
        ever made for a pipeline the sender may not trigger, a shadow run's included."""
        allowed = self.allowed_pipelines(calling_ae, address)
        if allowed is None or not (decision.pipelines or decision.shadow):
            return decision
        refused = tuple(dict.fromkeys(p for p in (*decision.pipelines, *decision.shadow) if p not in allowed))
        if not refused:
            return decision
        return replace(decision, pipelines=tuple(p for p in decision.pipelines if p in allowed),
                       shadow=tuple(p for p in decision.shadow if p in allowed),
                       refused_pipelines=(*decision.refused_pipelines, *refused))
