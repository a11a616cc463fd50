"""The console's FastAPI application: the routers, ``/metrics``, the OpenAPI document at ``/openapi.json``
(authenticated like the rest) and the JSON shape of every error (``{"detail": …}``).

FastAPI over the standard library's handler: typed routes give the OpenAPI document (what schemathesis
tests and clients generate from) and validation with named errors for free; Starlette brings streaming
request bodies (STOW-RS), cookies and a thread pool for the blocking job store; uvicorn runs it on one
event loop, so idle connections cost no thread. Swagger UI and ReDoc are off: both load from a CDN.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request, status
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from radnode import __version__
from radnode.console import actions, api, dashboard, stow, views
from radnode.console.auth import Gate, Viewer, metrics_reader
from radnode.console.schemas import Problem

OPENAPI_PATH = "/openapi.json"

_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "a request body that cannot be parsed"},
    401: {"model": Problem, "description": "no valid token or session"},
    403: {"model": Problem, "description": "the caller's role does not allow this (or the CSRF token is wrong)"},
}


def create_app(node: object, store: object, gate: Gate, registry: CollectorRegistry, max_upload_bytes: int,
               config: object = None) -> FastAPI:
    """The application for one node; ``node`` answers :class:`radnode.console.api.NodeView` and
    :class:`radnode.console.stow.StowIngest`."""
    app = FastAPI(title="radnode", version=__version__, openapi_url=None, docs_url=None, redoc_url=None,
                  description="The radnode imaging-AI node: jobs, actions, metrics, STOW-RS. Authenticate with "
                              "`Authorization: Bearer <token>` (`radnode tokens create`) or the dashboard's login.")
    app.state.node = node
    app.state.store = store
    app.state.config = config
    app.state.gate = gate
    app.state.max_upload_bytes = max_upload_bytes
    app.include_router(api.router, responses=_AUTH_RESPONSES)
    app.include_router(actions.router, responses=_AUTH_RESPONSES)
    app.include_router(views.router, responses=_AUTH_RESPONSES)
    app.include_router(stow.router, responses=_AUTH_RESPONSES)
    app.include_router(dashboard.router)
    app.mount("/static", dashboard.static, name="static")

    def openapi_document() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                             routes=app.routes)
        return app.openapi_schema

    app.openapi = openapi_document  # type: ignore[method-assign]

    @app.get(OPENAPI_PATH, include_in_schema=False)
    def openapi(identity: Viewer) -> JSONResponse:
        return JSONResponse(openapi_document())

    @app.get("/metrics", tags=["node"], summary="Prometheus metrics (text exposition format)",
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                              "description": "the node's metrics"}, **_AUTH_RESPONSES},
             response_class=Response, dependencies=[Depends(metrics_reader)])
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(status.HTTP_404_NOT_FOUND)
    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        detail = getattr(exc, "detail", None)
        return JSONResponse({"detail": detail if detail and detail != "Not Found" else f"no resource {request.url.path}"},
                            status_code=404)

    return app
