"""The REST endpoints: ``/health`` (anonymous), the job list and one job under ``/api``, who am I, and the
Orthanc plugin's ``/orthanc/events`` (authenticated by the plugin's own token, nothing else)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from typing import Annotated, Any, Literal, Protocol

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi import Path as FastApiPath
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import Field

from radnode.console.accounts import Identity, same_secret
from radnode.console.auth import Viewer, bearer_scheme, client_address, gate_of
from radnode.console.schemas import (
    CorrectionList, Document, DriftDocument, PerformanceDocument, Health, JobDetail, JobIdPath, JobList, Me, Queued,
    ShadowSummaryDocument, WorkerList, correction_document, delivery_document, event_document, job_summary,
    shadow_document,
)
from radnode.node.egress import Egress
from radnode.node.store import CorrectionState, Job, JobState, JobStore, StudyDetails

log = logging.getLogger(__name__)

MAX_PAGE = 1000


class NodeView(Protocol):
    """What the endpoints hand to the node (:class:`radnode.node.service.Node`); they read the job store."""

    egress: Egress | None
    """The node's egress while it runs: re-sends go through :meth:`Egress.resend`, which wakes the workers."""

    def health(self) -> dict[str, Any]: ...

    def workers(self) -> list[dict[str, object]]:
        """The distributed engine's workers (none with the local engine)."""

    def orthanc_event(self, event: dict[str, str]) -> None:
        """Queue one plugin event (ValueError: this node takes none)."""


def node_of(request: Request) -> NodeView:
    return request.app.state.node


router = APIRouter()


@router.get("/health", response_model=Health, tags=["node"], summary="Liveness and job counts (no authentication)")
def health(request: Request) -> Health:
    return Health.model_validate(node_of(request).health())


@router.get("/api/workers", response_model=WorkerList, tags=["node"],
            summary="The distributed engine's workers: queues, GPUs, state, current job, last heartbeat")
def list_workers(request: Request, identity: Viewer) -> WorkerList:
    return WorkerList.model_validate({"workers": node_of(request).workers()})


@router.get("/api/me", response_model=Me, tags=["accounts"], summary="Who the caller is")
def me(request: Request, identity: Viewer) -> Me:
    return Me(name=identity.name, role=identity.role.value, kind=identity.kind,
              patient_data=gate_of(request).sees_patient_data(identity))


def _store(request: Request) -> JobStore:
    return request.app.state.store


def _matches(job: Job, details: StudyDetails, pipeline: str | None, search: str | None, patient_data: bool) -> bool:
    if pipeline is not None and job.pipeline != pipeline:
        return False
    if not search:
        return True
    needle = search.lower()
    # a role that may not see patient data cannot find a job by its patient ID or accession either
    values = [job.study_instance_uid, job.calling_ae, job.pipeline, str(job.id), details.study_description,
              *details.modalities, *((job.patient_id, details.accession_number) if patient_data else ())]
    return any(needle in value.lower() for value in values)


@router.get("/api/jobs", response_model=JobList, tags=["jobs"],
            summary="Jobs, newest first, filtered by state, review flag, pipeline or a search term")
def list_jobs(request: Request, identity: Viewer,
              state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
              needs_review: Annotated[bool | None, Query(description="true: flagged for review; false: assessed "
                                                                      "and not flagged")] = None,
              reviewed: Annotated[bool | None, Query(description="with needs_review=true: false is the review "
                                                                  "worklist (flagged, not yet reviewed)")] = None,
              pipeline: Annotated[str | None, Query(max_length=128)] = None,
              q: Annotated[str | None, Query(max_length=128, description="search in study UID, description, "
                                                                          "modality, calling AE, pipeline; patient "
                                                                          "ID and accession for roles that see them")] = None,
              limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
              offset: Annotated[int, Query(ge=0, le=2**31)] = 0) -> JobList:
    store = _store(request)
    patient_data = gate_of(request).sees_patient_data(identity)
    jobs = list(reversed(store.jobs(state, needs_review)))
    details = store.study_details(job.study_instance_uid for job in jobs)
    reviews = store.reviewed_jobs(job.id for job in jobs) if jobs else {}
    chosen = [job for job in jobs if _matches(job, details[job.study_instance_uid], pipeline, q, patient_data)
              and (reviewed is None or (job.id in reviews) == reviewed)]
    page = chosen[offset:offset + limit]
    return JobList(jobs=[job_summary(job, patient_data, details[job.study_instance_uid],
                                     reviews.get(job.id, (None,))[0]) for job in page], total=len(chosen))


@router.get("/api/jobs/{job_id}", response_model=JobDetail, tags=["jobs"], summary="One job with its events, "
            "deliveries, corrections and shadow comparisons", responses={404: {"description": "no such job"}})
def get_job(request: Request, identity: Viewer, job_id: JobIdPath) -> JobDetail:
    store = _store(request)
    job = store.job(job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    details = store.study_details([job.study_instance_uid])[job.study_instance_uid]
    reviewer = store.reviewed_jobs([job.id]).get(job.id, (None,))[0]
    patient_data = gate_of(request).sees_patient_data(identity)
    summary = job_summary(job, patient_data, details, reviewer)
    withheld_reason = job.reason if "reason" in summary.withheld else None
    return JobDetail(**summary.model_dump(), events=[event_document(e, patient_data) for e in store.events(job_id)],
                     deliveries=[delivery_document(d, withheld_reason) for d in store.deliveries(job_id)],
                     corrections=[correction_document(c) for c in store.corrections(job_id=job_id)],
                     shadow_comparisons=[shadow_document(c) for c in store.shadow_comparisons(job_id=job_id)])


@router.get("/api/corrections", response_model=CorrectionList, tags=["feedback"],
            summary="Clinicians' corrected SEGs, oldest first: matched ones with their agreement, and those "
                    "that matched no job (kept and listed)")
def list_corrections(request: Request, identity: Viewer,
                     state: Annotated[CorrectionState | None, Query(description="only corrections in this "
                                                                                 "state")] = None) -> CorrectionList:
    return CorrectionList(corrections=[correction_document(c) for c in _store(request).corrections(state=state)])


class OrthancEvent(Document):
    """What the radnode Orthanc plugin posts: an instance stored, or a study stable."""

    type: Literal["stored", "stable-study"]
    id: Annotated[str, Field(pattern=r"^[0-9a-fA-F-]{1,64}$", description="Orthanc's resource id")]
    remote_aet: Annotated[str, Field(max_length=64)] = ""


def orthanc_plugin(request: Request,
                   bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]) -> None:
    """The radnode Orthanc plugin's own token (nothing else is accepted here, nor is it accepted elsewhere)."""
    gate = gate_of(request)
    if gate.orthanc_token is None or bearer is None or not same_secret(bearer.credentials, gate.orthanc_token):
        gate.on_refused("orthanc-token")
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "the Orthanc plugin's token is missing or wrong",
                            headers={"WWW-Authenticate": "Bearer"})


@router.post("/orthanc/events", response_model=Queued, status_code=status.HTTP_202_ACCEPTED, tags=["orthanc"],
             summary="An event from the radnode Orthanc plugin (its own token, from `radnode orthanc-config`)",
             dependencies=[Depends(orthanc_plugin)],
             responses={409: {"description": "this node takes no Orthanc events (orthanc.url unset)"}})
def orthanc_event(request: Request, event: OrthancEvent) -> Queued:
    try:
        node_of(request).orthanc_event(event.model_dump())
    except ValueError as e:
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from None
    return Queued(queued=True)


@router.get("/api/performance", response_model=PerformanceDocument, tags=["feedback"],
            summary="Local performance per pipeline: reviews, agreement with corrections per segment, and whether "
                    "the uncertainty ranks the corrections")
def performance(request: Request, identity: Viewer,
                pipeline: Annotated[str | None, Query(max_length=128)] = None,
                since: Annotated[dt.datetime | None, Query(description="jobs created at or after (ISO 8601)")] = None
                ) -> PerformanceDocument:
    from radnode.feedback.performance import local_performance

    after = None if since is None else (since if since.tzinfo else since.replace(tzinfo=dt.timezone.utc)).timestamp()
    figures = local_performance(_store(request), pipeline, after)
    return PerformanceDocument.model_validate({"pipelines": [dataclasses.asdict(p) for p in figures],
                                               "since": since})


@router.get("/api/drift", response_model=DriftDocument, tags=["feedback"],
            summary="Drift of each pipeline's inputs and outputs: every attribute's latest PSI against the baseline "
                    "and its alerts (no patient identifiers)")
def drift(request: Request, identity: Viewer,
          pipeline: Annotated[str | None, Query(max_length=128)] = None) -> DriftDocument:
    from radnode.feedback.drift import METHOD, baseline_description

    settings = request.app.state.config.feedback.drift
    return DriftDocument.model_validate({
        "method": METHOD, "window": settings.window, "baseline": baseline_description(settings),
        "bins": settings.bins, "psi_alert": settings.psi_alert, "p_value": settings.p_value,
        "pipelines": _store(request).drift_document(pipeline)})


@router.get("/api/performance/compare", response_model=ShadowSummaryDocument, tags=["feedback"],
            summary="A candidate pipeline's shadow runs against the production pipeline: studies compared, median "
                    "and worst-decile Dice per segment, mean measurement differences, time ratios")
def compare_pipelines(request: Request, identity: Viewer,
                      production: Annotated[str, Query(min_length=1, max_length=128)],
                      candidate: Annotated[str, Query(min_length=1, max_length=128)],
                      since: Annotated[dt.datetime | None, Query(description="compared at or after (ISO 8601)")] = None
                      ) -> ShadowSummaryDocument:
    from radnode.feedback.shadow import summarise

    after = None if since is None else (since if since.tzinfo else since.replace(tzinfo=dt.timezone.utc)).timestamp()
    comparisons = _store(request).shadow_comparisons(production=production, candidate=candidate, since=after)
    return ShadowSummaryDocument.model_validate({**summarise(production, candidate, comparisons).to_record(),
                                                 "since": since})


def _refused_export(request: Request, identity: Identity, action: str, kind: str, code: int,
                    reason: str) -> HTTPException:
    """The HTTP error for a refused export, audited first (outcome minor failure, with why) as every refused
    console attempt is (``actions._refuse``), so the trail holds what was tried, not only what was exported."""
    gate = gate_of(request)
    if gate.audit is not None:
        gate.audit.user_action(user=identity.label, address=client_address(request), action=action,
                               what=f"export/{kind}", refused=reason)
    return HTTPException(code, reason)


@router.get("/api/export/{kind}", tags=["feedback"],
            summary="The feedback records as CSV or JSON (agreement, reviews, performance), without patient "
                    "identifiers unless asked for by a role allowed them (api.export_identifier_roles); audited",
            responses={200: {"content": {"text/csv": {}, "application/json": {}}},
                       403: {"description": "identifiers asked for by a role not allowed them"},
                       404: {"description": "no such export kind"}})
def export(request: Request, identity: Viewer,
           kind: Annotated[str, FastApiPath(max_length=64, pattern=r"^[a-z][a-z0-9-]*$")],
           format: Annotated[Literal["csv", "json"], Query(description="csv (a header line) or json")] = "json",
           pipeline: Annotated[str | None, Query(max_length=128)] = None,
           since: Annotated[dt.datetime | None, Query(description="records from then on (ISO 8601)")] = None,
           identifiers: Annotated[bool, Query(description="add Patient ID, name, birth date, accession number and "
                                                          "the study's UID (a role of api.export_identifier_roles)")]
           = False) -> Response:
    from radnode.feedback.export import ExportQuery, UnknownExport, as_csv, export_rows
    from radnode.node.egress import outbox_dir

    gate = gate_of(request)
    if identifiers and not gate.exports_identifiers(identity):
        raise _refused_export(request, identity, f"export {kind} ({format}, identifiers asked for)", kind,
                              status.HTTP_403_FORBIDDEN, f"role {identity.role} may not export patient identifiers "
                                                         "(api.export_identifier_roles)")
    after = None if since is None else (since if since.tzinfo else since.replace(tzinfo=dt.timezone.utc)).timestamp()
    config = request.app.state.config
    try:
        rows = export_rows(kind, _store(request), lambda job_id: outbox_dir(config, job_id),
                           ExportQuery(after, pipeline, identifiers))
    except UnknownExport as e:
        raise _refused_export(request, identity, f"export {kind} ({format})", kind, status.HTTP_404_NOT_FOUND,
                              str(e)) from None
    if gate.audit is not None:
        gate.audit.user_action(user=identity.label, address=client_address(request),
                               action=f"export {kind} ({format}, {len(rows)} rows, identifiers "
                                      f"{'included' if identifiers else 'removed'})",
                               what=f"export/{kind}")
    log.info("export %s by %s: %d rows, identifiers %s", kind, identity.label, len(rows),
             "included" if identifiers else "removed")
    if format == "csv":
        return Response(as_csv(kind, rows, identifiers), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="radnode-{kind}.csv"'})
    return JSONResponse({"kind": kind, "identifiers": identifiers, "pipeline": pipeline,
                         "since": None if since is None else since.isoformat(), "rows": rows})
