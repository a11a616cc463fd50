"""What the dashboard shows beyond the job list: the overview, a job's series, outputs and stderr, the
destinations with a live check (each type's own, ``Destination.check`` in ``radnode.destinations``: DICOM
C-ECHO, FHIR ``/metadata``, QIDO-RS, Orthanc ``/system``, ...), the rules in force with "test this study", and
the audit log for admins."""

from __future__ import annotations

import io
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path as PathParam, Query, Request, status
from fastapi.responses import FileResponse
from pydantic import Field

from radnode.config import Config
from radnode.console.auth import Admin, Operator, Viewer, gate_of
from radnode.console.schemas import WITHHELD_DESCRIPTION, Document
from radnode.destinations import Destination as DestinationType
from radnode.destinations import SendContext, Timeouts
from radnode.node.egress import Egress
from radnode.node.store import JobStore

router = APIRouter()

STDERR_TAIL_BYTES = 8192
CHECK_TIMEOUT_SECONDS = 5.0
"""A live check waits at most this long at each step (a page waits on it), whatever the delivery timeouts."""


def _store(request: Request) -> JobStore:
    return request.app.state.store


def _config(request: Request) -> Config:
    return request.app.state.config


class Overview(Document):
    ae_title: str
    dicom_port: int
    orthanc: str | None = Field(description="Orthanc in front of the node (its URL), or null")
    workers: int = Field(description="jobs that may run at once")
    running: int
    queued: int
    queue_paused: bool
    spool_free_bytes: int
    spool_total_bytes: int
    done_last_hour: int
    done_last_24h: int
    failed_last_24h: int
    jobs: dict[str, int]


@router.get("/api/overview", response_model=Overview, tags=["node"], summary="The node at a glance")
def overview(request: Request, identity: Viewer) -> Overview:
    store, config = _store(request), _config(request)
    counts, _ = store.job_counts()
    now = time.time()
    recent = store.read_rows("SELECT state, updated_at FROM jobs WHERE state IN ('done', 'failed') AND updated_at >= :t",
                             {"t": now - 86400})
    try:
        usage = shutil.disk_usage(config.data_dir / "spool")
    except OSError:
        usage = shutil.disk_usage(config.data_dir)
    return Overview(
        ae_title=config.ingress.ae_title, dicom_port=request.app.state.node.port, orthanc=config.orthanc.url,
        workers=config.processing.max_concurrent_jobs, running=counts.get("running", 0),
        queued=counts.get("queued", 0), queue_paused=store.queue_paused(), spool_free_bytes=usage.free,
        spool_total_bytes=usage.total,
        done_last_hour=sum(1 for s, t in recent if s == "done" and t >= now - 3600),
        done_last_24h=sum(1 for s, _ in recent if s == "done"), failed_last_24h=sum(1 for s, _ in recent if s == "failed"),
        jobs=counts)


class SeriesDocument(Document):
    series_instance_uid: str
    modality: str
    instances: int
    late: int


class OutputDocument(Document):
    name: str
    bytes: int


class JobFiles(Document):
    series: list[SeriesDocument]
    outputs: list[OutputDocument] = Field(description="files in the job's outbox (download: /api/jobs/{id}/outputs/NAME)")
    stderr_tail: str | None = Field(description="the end of the job process's stderr; null when withheld (it may "
                                                "quote header values, a PatientName)")
    withheld: list[Literal["stderr_tail"]] = Field(default_factory=list, description=WITHHELD_DESCRIPTION)


def _job_or_404(store: JobStore, job_id: int):  # type: ignore[no-untyped-def]
    job = store.job(job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    return job


@router.get("/api/jobs/{job_id}/files", response_model=JobFiles, tags=["jobs"],
            summary="A job's series, outputs and, for roles that see patient data, the tail of its stderr",
            responses={404: {"description": "no such job"}})
def job_files(request: Request, identity: Viewer, job_id: Annotated[int, PathParam(ge=1, le=2**62)]) -> JobFiles:
    from radnode.node.worker import job_dir

    from radnode.feedback.shadow import run_outputs

    store, config = _store(request), _config(request)
    job = _job_or_404(store, job_id)
    tally: Counter[tuple[str, str]] = Counter()
    late: Counter[tuple[str, str]] = Counter()
    for row in store.read_rows("SELECT series_instance_uid, modality, late FROM instances WHERE job_id = :j",
                               {"j": job_id}):
        (late if row[2] else tally)[(row[0], row[1])] += 1
    series = [SeriesDocument(series_instance_uid=uid, modality=modality, instances=tally[(uid, modality)],
                             late=late[(uid, modality)]) for uid, modality in sorted(set(tally) | set(late))]
    folder = run_outputs(config, job)
    outputs = [OutputDocument(name=p.name, bytes=p.stat().st_size) for p in sorted(folder.iterdir()) if p.is_file()] \
        if folder.is_dir() else []
    if not gate_of(request).sees_patient_data(identity):
        return JobFiles(series=series, outputs=outputs, stderr_tail=None, withheld=["stderr_tail"])
    stderr = job_dir(config, job_id) / "stderr.log"
    tail = ""
    if stderr.is_file():
        with stderr.open("rb") as handle:
            handle.seek(max(0, stderr.stat().st_size - STDERR_TAIL_BYTES))
            tail = handle.read().decode("utf-8", "replace")
    return JobFiles(series=series, outputs=outputs, stderr_tail=tail)


@router.get("/api/jobs/{job_id}/outputs/{name}", tags=["jobs"], response_class=FileResponse,
            summary="Download one of a job's outputs (patient data: roles that may see it)",
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "the file"}, 404: {"description": "no such job or output"}})
def job_output(request: Request, identity: Viewer, job_id: Annotated[int, PathParam(ge=1, le=2**62)],
               name: Annotated[str, PathParam(pattern=r"^[\w.-]{1,200}$")]) -> FileResponse:
    if not gate_of(request).sees_patient_data(identity):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"{identity.label} may not see patient data")
    from radnode.feedback.shadow import run_outputs

    job = _job_or_404(_store(request), job_id)
    path = run_outputs(_config(request), job) / name
    if name.startswith(".") or not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} has no output {name}")
    return FileResponse(path, filename=name, media_type="application/octet-stream")


class Destination(Document):
    name: str = Field(description="as the job's deliveries name it")
    kind: str = Field(description="the destination type (dicom, fhir, dicomweb, orthanc, folder, ...)")
    address: str = Field(description="where it sends, in one line (never a secret)")


def _egress(request: Request) -> Egress:
    egress = request.app.state.node.egress
    if egress is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the node is stopping")
    return egress


def destinations_of(config: Config, egress: Egress) -> dict[str, DestinationType]:
    """Every place results may go, by the name deliveries use: egress's configured destinations (with the
    implicit Orthanc), and with return-to-sender the known peers by their one-line form."""
    found = dict(egress.destinations)
    if config.egress.return_to_sender:
        for peer in config.egress.known_peers:
            found.setdefault(str(peer), egress.destination(str(peer)))
    return found


@router.get("/api/destinations", response_model=list[Destination], tags=["destinations"],
            summary="The configured destinations")
def destinations(request: Request, identity: Viewer) -> list[Destination]:
    found = destinations_of(_config(request), _egress(request))
    return [Destination(name=name, kind=d.kind, address=d.describe()) for name, d in found.items()]


class CheckResult(Document):
    name: str
    ok: bool
    detail: str
    seconds: float


@router.post("/api/destinations/check", response_model=CheckResult, tags=["destinations"],
             summary="Check one destination now, sending nothing (C-ECHO, FHIR capability statement, QIDO-RS, ...)",
             responses={404: {"description": "no such destination"}})
def check(request: Request, identity: Operator,
          name: Annotated[str, Query(max_length=300, description="the destination's name")]) -> CheckResult:
    config = _config(request)
    destination = destinations_of(config, _egress(request)).get(name)
    if destination is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no destination {name!r}")
    timeouts = destination.timeouts.over(config.egress.timeouts)
    capped = Timeouts(**{k: min(v, CHECK_TIMEOUT_SECONDS) for k, v in timeouts.model_dump().items()})
    context = SendContext(ae_title=config.ingress.ae_title, timeouts=capped, orthanc=config.orthanc,
                          job_id=0)  # a check sends nothing and belongs to no job
    started = time.monotonic()
    result = destination.check(context)
    return CheckResult(name=name, ok=result.ok, detail=result.detail, seconds=round(time.monotonic() - started, 3))


class Rules(Document):
    path: str
    text: str


@router.get("/api/rules", response_model=Rules, tags=["rules"], summary="The routing rules in force")
def rules(request: Request, identity: Viewer) -> Rules:
    from radnode.pipelines.rules import DEFAULT_RULES

    path = Path(_config(request).rules or DEFAULT_RULES)
    return Rules(path=str(path), text=path.read_text())


class RulesTest(Document):
    job_id: int
    report: str = Field(description="per series: which rules match and why, and the route (radnode rules test)")


@router.post("/api/rules/test", response_model=RulesTest, tags=["rules"],
             summary="Which rules match each series of a job's study, and why (patient data: roles that may "
                     "see it)",
             responses={403: {"description": "the caller's role may not see patient data"},
                        404: {"description": "no such job, or its instances were purged"}})
def test_rules(request: Request, identity: Viewer, job_id: Annotated[int, Query(ge=1, le=2**62)]) -> RulesTest:
    """The rules' verdicts on a job's study; refused to a role without patient data, since each verdict quotes
    the header values it read (a rule on PatientID shows the patient's ID)."""
    if not gate_of(request).sees_patient_data(identity):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"{identity.label} may not see patient data (the report "
                                                       "quotes the study's header values)")
    from radnode.pipelines.routing import RoutingContext
    from radnode.pipelines.rules import DEFAULT_RULES
    from radnode.pipelines.rules_cli import test_rules_on_path

    store, config = _store(request), _config(request)
    job = _job_or_404(store, job_id)
    folder = config.data_dir / "spool" / job.study_instance_uid
    if not folder.is_dir():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id}'s instances are no longer in the spool")
    out = io.StringIO()
    test_rules_on_path(config.rules or DEFAULT_RULES, folder, out,
                       context=RoutingContext(calling_ae=job.calling_ae, called_ae=config.ingress.ae_title))
    return RulesTest(job_id=job_id, report=out.getvalue().replace(str(folder), f"study {job.study_instance_uid}"))


class AuditLog(Document):
    available: bool = Field(description="false when the node has no audit trail (radnode.security)")
    messages: list[str]


@router.get("/api/audit", response_model=AuditLog, tags=["audit"], summary="The latest audit messages (admins)")
def audit(request: Request, identity: Admin, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> AuditLog:
    config = _config(request)
    try:
        from radnode.security.audit import read_audit_log  # type: ignore[import-not-found]
    except ImportError:
        return AuditLog(available=False, messages=[])
    audit_config = getattr(config, "audit", None)
    path = getattr(audit_config, "log_file", None) or config.data_dir / "audit" / "audit.log"
    if not Path(path).is_file():
        return AuditLog(available=True, messages=[])
    return AuditLog(available=True, messages=list(read_audit_log(Path(path)))[-limit:][::-1])


