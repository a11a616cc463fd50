"""The REST endpoints: ``/health`` (anonymous), the job list and one job under ``/api``, who am I, and the
Orthanc plugin's ``/orthanc/events`` (authenticated by the plugin's own token, nothing else)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Annotated, Any, Literal, Protocol

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field

from radnode.console.accounts import same_secret
from radnode.console.auth import Viewer, bearer_scheme, gate_of
from radnode.console.schemas import (
    Health, JobDetail, JobIdPath, JobList, Me, Queued, delivery_document, event_document, job_summary,
)
from radnode.node.store import Delivery, Event, Job, JobState

log = logging.getLogger(__name__)

MAX_PAGE = 1000


class NodeView(Protocol):
    """What the endpoints read from and hand to the node (:class:`radnode.node.service.Node`)."""

    def jobs(self, state: JobState | None = None, needs_review: bool | None = None) -> list[Job]: ...

    def job(self, job_id: int) -> Job | None: ...

    def events(self, job_id: int, after_id: int = 0) -> list[Event]: ...

    def deliveries(self, job_id: int) -> list[Delivery]: ...

    def health(self) -> dict[str, Any]: ...

    def orthanc_event(self, event: dict[str, str]) -> None:
        """Queue one plugin event (ValueError: this node takes none)."""


def node_of(request: Request) -> NodeView:
    return request.app.state.node


router = APIRouter()


@router.get("/health", response_model=Health, tags=["node"], summary="Liveness and job counts (no authentication)")
def health(request: Request) -> Health:
    return Health.model_validate(node_of(request).health())


@router.get("/api/me", response_model=Me, tags=["accounts"], summary="Who the caller is")
def me(request: Request, identity: Viewer) -> Me:
    return Me(name=identity.name, role=identity.role.value, kind=identity.kind,
              patient_data=gate_of(request).sees_patient_data(identity))


def _matches(job: Job, pipeline: str | None, search: str | None) -> bool:
    if pipeline is not None and job.pipeline != pipeline:
        return False
    if search:
        needle = search.lower()
        return any(needle in str(value).lower()
                   for value in (job.study_instance_uid, job.patient_id, job.calling_ae, job.pipeline, job.id))
    return True


@router.get("/api/jobs", response_model=JobList, tags=["jobs"],
            summary="Jobs, newest first, filtered by state, review flag, pipeline or a search term")
def list_jobs(request: Request, identity: Viewer,
              state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
              needs_review: Annotated[bool | None, Query(description="true: flagged for review; false: assessed "
                                                                      "and not flagged")] = None,
              pipeline: Annotated[str | None, Query(max_length=128)] = None,
              q: Annotated[str | None, Query(max_length=128, description="search in study UID, patient ID (for "
                                                                          "roles that see it), calling AE, pipeline")] = None,
              limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
              offset: Annotated[int, Query(ge=0, le=2**31)] = 0) -> JobList:
    patient_data = gate_of(request).sees_patient_data(identity)
    # a role that may not see patient data cannot find a job by its patient ID either
    jobs = [job for job in reversed(node_of(request).jobs(state, needs_review))
            if _matches(job if patient_data else _without_patient(job), pipeline, q)]
    return JobList(jobs=[job_summary(job, patient_data) for job in jobs[offset:offset + limit]], total=len(jobs))


def _without_patient(job: Job) -> Job:
    return replace(job, patient_id="")


@router.get("/api/jobs/{job_id}", response_model=JobDetail, tags=["jobs"], summary="One job with its events and "
            "deliveries", responses={404: {"description": "no such job"}})
def get_job(request: Request, identity: Viewer, job_id: JobIdPath) -> JobDetail:
    node = node_of(request)
    job = node.job(job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    summary = job_summary(job, gate_of(request).sees_patient_data(identity))
    return JobDetail(**summary.model_dump(), events=[event_document(e) for e in node.events(job_id)],
                     deliveries=[delivery_document(d) for d in node.deliveries(job_id)])


class OrthancEvent(BaseModel):
    """What the radnode Orthanc plugin posts: an instance stored, or a study stable."""

    model_config = ConfigDict(extra="forbid")

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
