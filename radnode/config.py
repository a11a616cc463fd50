"""The node's configuration: one YAML file, validated on load, every setting with a default.

An unknown key or a wrong type is refused with the file, the key path and what was expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# pydicom's registered example root; a site sets its own (ISO/DICOM registered) root here.
DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.8.498."


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message names file, key and expectation."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DicomPeer(_Strict):
    """A DICOM application entity reachable over the network."""

    ae_title: Annotated[str, Field(min_length=1, max_length=16)]
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]

    @classmethod
    def parse(cls, text: str) -> "DicomPeer":
        """Parse ``AET@HOST:PORT`` as used on the command line."""
        m = re.fullmatch(r"([^@]{1,16})@([^:]+):(\d{1,5})", text.strip())
        if not m:
            raise ConfigError(f"destination {text!r}: expected AET@HOST:PORT, e.g. PACS@10.0.0.5:104")
        return cls(ae_title=m.group(1), host=m.group(2), port=int(m.group(3)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class IngressConfig(_Strict):
    """The node's own Storage SCP."""

    ae_title: Annotated[str, Field(min_length=1, max_length=16)] = "RADNODE"
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 11112
    study_idle_seconds: Annotated[float, Field(gt=0)] = 3.0
    """A study is complete when no new instance has arrived for this long."""
    max_pdu: Annotated[int, Field(ge=0)] = 0
    """Maximum PDU size offered (0 = unlimited, fastest for large studies)."""


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

    @field_validator("fhir_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"https?://", v):
            raise ValueError("expected an http:// or https:// URL")
        return v.rstrip("/") if v else v


class ProcessingConfig(_Strict):
    """How pipelines run."""

    default_pipeline: str = "ct_tissue"
    max_concurrent_jobs: Annotated[int, Field(ge=1)] = 1
    job_timeout_seconds: Annotated[float, Field(gt=0)] = 1800.0
    """A pipeline run still going after this long is killed and the job fails with that reason."""


class Config(_Strict):
    """Top-level configuration of a radnode instance."""

    data_dir: Path = Path("radnode-data")
    """Spool, job store, work folders and outbox live here."""
    uid_root: str = DEFAULT_UID_ROOT
    institution_name: str | None = None
    ingress: IngressConfig = IngressConfig()
    egress: EgressConfig = EgressConfig()
    processing: ProcessingConfig = ProcessingConfig()

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


def config_from_environment() -> Config:
    """The configuration an app process should use: the file in $RADNODE_CONFIG, else defaults."""
    import os

    return load_config(os.environ.get(CONFIG_ENV) or None)
