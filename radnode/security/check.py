"""``radnode config check FILE``: every security setting in force, and a warning for each one left open.

Each finding is one line, ``ok`` or ``warn``, naming the setting; nothing secret is printed (a secret is shown
by where it comes from). With ``--strict`` the command fails when anything is left open, for a deployment
pipeline to gate on.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from radnode.config import Config, TlsConfig
from radnode.destinations import Destination
from radnode.destinations.credentials import BasicAuth, HttpDestination
from radnode.destinations.dicom import DicomDestination
from radnode.security.secrets import Secret


@dataclass(frozen=True)
class Finding:
    """One setting and what it means for security."""

    setting: str
    message: str
    open: bool = False

    def __str__(self) -> str:
        return f"{'warn' if self.open else 'ok  '}  {self.setting}: {self.message}"


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _file_findings(setting: str, path: Path | None, private: bool = False) -> list[Finding]:
    if path is None:
        return []
    try:
        mode = path.stat().st_mode
    except OSError as e:
        return [Finding(setting, f"{path} cannot be read ({e.strerror})", True)]
    if private and mode & 0o077:
        return [Finding(setting, f"{path} is readable by others ({stat.filemode(mode)}; chmod 600)", True)]
    return [Finding(setting, f"{path}")]


def _certificate_findings(setting: str, path: Path | None) -> list[Finding]:
    if path is None or not path.is_file():
        return []
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as e:
        return [Finding(setting, f"{path} is not a PEM certificate ({e})", True)]
    left = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    subject = cert.subject.rfc4514_string()
    if left.total_seconds() < 0:
        return [Finding(setting, f"{subject}: expired on {cert.not_valid_after_utc:%Y-%m-%d}", True)]
    if left.days < 30:
        return [Finding(setting, f"{subject}: expires in {left.days} days ({cert.not_valid_after_utc:%Y-%m-%d})", True)]
    return [Finding(setting, f"{subject}, valid until {cert.not_valid_after_utc:%Y-%m-%d}")]


def _tls_findings(prefix: str, tls: TlsConfig) -> list[Finding]:
    found = [Finding(f"{prefix}.min_version", f"TLS {tls.min_version} or newer")]
    found += _file_findings(f"{prefix}.certificate", tls.certificate)
    found += _certificate_findings(f"{prefix}.certificate", tls.certificate)
    found += _file_findings(f"{prefix}.private_key", tls.private_key, private=True)
    found += _file_findings(f"{prefix}.ca_bundle", tls.ca_bundle)
    if tls.private_key_password is not None:
        found += _secret_findings(f"{prefix}.private_key_password", tls.private_key_password)
    return found


def _secret_findings(setting: str, secret: Secret) -> list[Finding]:
    problems = secret.problems()
    if problems:
        return [Finding(setting, p, True) for p in problems]
    return [Finding(setting, f"from {secret.describe()}")]


def _url_finding(setting: str, url: str | None) -> list[Finding]:
    if not url:
        return []
    if "@" in url.split("//", 1)[-1].split("/", 1)[0]:
        return [Finding(setting, "the URL carries credentials (they would show in logs and errors; use the "
                                 "username/password settings)", True)]
    if url.startswith("http://"):
        host = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
        if not _loopback(host):
            return [Finding(setting, f"{url} is plain HTTP to another host (use https://)", True)]
        return [Finding(setting, f"{url} (plain HTTP on this machine)")]
    return [Finding(setting, url)]


def _destination_findings(setting: str, destination: Destination) -> list[Finding]:
    """Over what a destination sends (DICOM TLS, the URL's scheme), its credentials, and whether what it gets
    is de-identified."""
    found: list[Finding] = []
    what = ("de-identified" + f" ({destination.deidentify})" if destination.deidentify
            else "identified (as received)")
    if isinstance(destination, DicomDestination):
        if destination.tls is None:
            found.append(Finding(setting, f"{destination.describe()} over plain DICOM (no TLS), {what}", True))
        else:
            found.append(Finding(setting, f"{destination.describe()}, {what}"
                                 + ("; the node's client certificate" if destination.tls.certificate else "")))
            found += _tls_findings(f"{setting}.tls", destination.tls)
    elif isinstance(destination, HttpDestination):
        found += _url_finding(f"{setting}.url", destination.url)
        found.append(Finding(setting, f"{destination.describe()}, {what}"))
        if destination.auth is not None:
            secret = destination.auth.password if isinstance(destination.auth, BasicAuth) else destination.auth.token
            found += _secret_findings(f"{setting}.auth", secret)
    else:
        found.append(Finding(setting, f"{destination.describe()}, {what}"))
    return found


def _api_findings(config: Config) -> list[Finding]:
    """The web service: whether it is on the network and over HTTPS (``api.tls``, its certificate and key
    checked), and whether ``/metrics`` answers without a token (``api.public_metrics``) from the network."""
    api = config.api
    if not api.enabled:
        return [Finding("api.enabled", "off: no web service")]
    local = _loopback(api.host)
    where = f"{api.host}:{api.port}"
    if local:
        found = [Finding("api.host", f"{where} (this machine only)" + (", HTTPS" if api.tls else ""))]
    elif api.tls is not None:
        found = [Finding("api.host", f"{where} reachable from the network, over HTTPS")]
    else:
        found = [Finding("api.host", f"{where} reachable from the network over plain HTTP (set api.tls)", True)]
    if api.tls is not None:
        found += _file_findings("api.tls.certificate", api.tls.certificate)
        found += _certificate_findings("api.tls.certificate", api.tls.certificate)
        found += _file_findings("api.tls.private_key", api.tls.private_key, private=True)
    if not api.public_metrics:
        found.append(Finding("api.public_metrics", "off: /metrics needs a token"))
    elif local:
        found.append(Finding("api.public_metrics", "on: /metrics answers without a token, on this machine only"))
    else:
        found.append(Finding("api.public_metrics", f"on: /metrics answers anyone who reaches {where}, without "
                             "a token", True))
    return found


def security_findings(config: Config) -> list[Finding]:
    """Every security-relevant setting of ``config`` with what it means."""
    f: list[Finding] = []
    ingress = config.ingress
    if _loopback(ingress.host):
        f.append(Finding("ingress.host", f"listens on {ingress.host} only"))
    else:
        f.append(Finding("ingress.host", f"listens on {ingress.host}"
                         + (" (every interface)" if ingress.host in ("0.0.0.0", "::") else ""),
                         open=ingress.host in ("0.0.0.0", "::") and not ingress.reject_unknown))
    if ingress.plain_listener:
        f.append(Finding("ingress.plain_listener", f"plain DICOM (no TLS) on port {ingress.port}", True))
    else:
        f.append(Finding("ingress.plain_listener", "off: TLS only"))
    if ingress.tls is None:
        f.append(Finding("ingress.tls", "no TLS listener", True))
    else:
        f.append(Finding("ingress.tls.port", str(ingress.tls.port)))
        f += _tls_findings("ingress.tls", ingress.tls)
        f.append(Finding("ingress.tls.require_client_certificate",
                         "on: senders must present a certificate from the CA (mutual TLS)"
                         if ingress.tls.require_client_certificate else "off: any TLS client may connect",
                         not ingress.tls.require_client_certificate))
    if ingress.reject_unknown:
        f.append(Finding("ingress.reject_unknown", f"on: {len(ingress.allowed_peers)} allowed peer(s), called AE "
                         f"titles {', '.join([ingress.ae_title, *ingress.called_ae_titles])}"))
        for i, peer in enumerate(ingress.allowed_peers):
            f.append(Finding(f"ingress.allowed_peers[{i}]", f"{peer.ae_title} from {peer.host or 'any address'}"
                             + (f", pipelines {', '.join(peer.pipelines)}" if peer.pipelines is not None else ""),
                             peer.host is None))
    else:
        f.append(Finding("ingress.reject_unknown", "off: any calling AE title, to any called AE title, may store", True))

    for name, destination in config.egress.destinations.items():
        f += _destination_findings(f"egress.destinations.{name}", destination)
    for i, peer in enumerate(config.egress.known_peers):
        if peer.tls is not None:
            f.append(Finding(f"egress.known_peers[{i}]", f"{peer} (return-to-sender) over TLS"))
            f += _tls_findings(f"egress.known_peers[{i}].tls", peer.tls)
        elif config.egress.return_to_sender:
            f.append(Finding(f"egress.known_peers[{i}]", f"{peer} (return-to-sender) over plain DICOM (no TLS)", True))

    orthanc = config.orthanc
    f += _url_finding("orthanc.url", orthanc.url)
    if orthanc.url and orthanc.username is None:
        f.append(Finding("orthanc.username", "none: the node calls Orthanc's REST API without credentials", True))
    if orthanc.password is not None:
        f += _secret_findings("orthanc.password", orthanc.password)

    f += _api_findings(config)

    audit = config.audit
    if not audit.enabled:
        f.append(Finding("audit.enabled", "off: nothing is audited", True))
    else:
        f.append(Finding("audit.log_file", str(audit.log_file or config.data_dir / "audit" / "audit.log")))
        if audit.syslog is None:
            f.append(Finding("audit.syslog", "none: messages stay on this machine (no audit record repository)", True))
        elif audit.syslog.transport == "udp":
            f.append(Finding("audit.syslog", f"UDP to {audit.syslog.host}:{audit.syslog.port}: unencrypted, "
                             "may be lost", True))
        else:
            f.append(Finding("audit.syslog", f"TLS to {audit.syslog.host}:{audit.syslog.port}"))
            f += _tls_findings("audit.syslog.tls", audit.syslog.tls)
        f.append(Finding("audit.patient_identity", audit.patient_identity))

    if config.privacy.site_key is None:
        f.append(Finding("privacy.site_key", f"generated in {config.data_dir / 'keys' / 'site.key'} (owner-only)"))
    else:
        f += _secret_findings("privacy.site_key", config.privacy.site_key)
    data = config.data_dir
    if data.exists():
        loose = [p for p in [data, *data.glob("*")] if not p.is_symlink() and p.stat().st_mode & 0o077]
        f.append(Finding("data_dir", f"{data}: {len(loose)} entries readable by others (the node tightens them at "
                         "start)" if loose else f"{data}: owner-only", bool(loose)))
    else:
        f.append(Finding("data_dir", f"{data} (made owner-only at start)"))
    from radnode.security.deid import BUILT_IN_PROFILES

    names = sorted({*BUILT_IN_PROFILES, *config.deidentification.profiles})
    f.append(Finding("deidentification.profiles", ", ".join(names)))
    if config.sandbox.mode == "none":
        f.append(Finding("sandbox.mode", "none: model folders (code) are parsed inside the node's process", True))
    elif shutil.which("bwrap") is None:
        f.append(Finding("sandbox.mode", "bubblewrap, but bwrap is not installed (apt-get install bubblewrap)", True))
    else:
        f.append(Finding("sandbox.mode", "bubblewrap: model folders are checked without network, data or secrets"))
    return f
