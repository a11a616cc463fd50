"""The operators' dashboard: server-rendered pages (Jinja2) with a small script that polls the API, all
served by the node (no CDN, nothing fetched from elsewhere).

``GET /login`` / ``POST /login`` sign a person in: the password is checked (Argon2id), a session opened and
its id set as the ``radnode_session`` cookie (HttpOnly, SameSite=Strict, Secure under HTTPS). A login form
posted from another site (``Origin`` not this node) is refused. Five wrong passwords for one name within
15 minutes lock that name for 15 minutes. A failed login is audited and logged under the name only when it is
an account (anything else may be a password typed into the name field: :meth:`Gate.login_name`). Pages need a
session; without one they redirect to the login.
Every page carries the session's CSRF token for the script's POSTs (``X-CSRF-Token``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, Form, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from radnode.console.accounts import Identity, same_secret
from radnode.console.auth import CSRF_HEADER, SESSION_COOKIE, client_address, cookie_scheme, gate_of
from radnode.resources import package_file

log = logging.getLogger(__name__)

LOCKOUT_FAILURES = 5
LOCKOUT_SECONDS = 900.0

TEMPLATES = package_file("radnode.console", "templates")
"""The pages' Jinja2 templates, package data of ``radnode.console`` (found as an installed wheel has them)."""
STATIC = package_file("radnode.console", "static")
"""The script and style sheet the pages load from the node itself."""
_templates = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape())

router = APIRouter(include_in_schema=False)
static = StaticFiles(directory=str(STATIC))


class _Lockout:
    """Recent failed logins per name (in memory: a restart forgives, as a short lock should)."""

    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def locked(self, name: str) -> bool:
        with self._lock:
            recent = self._failures[name]
            while recent and recent[0] < time.time() - LOCKOUT_SECONDS:
                recent.popleft()
            return len(recent) >= LOCKOUT_FAILURES

    def failed(self, name: str) -> None:
        with self._lock:
            self._failures[name].append(time.time())

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name, None)


_lockout = _Lockout()


def render(name: str, **context: object) -> HTMLResponse:
    return HTMLResponse(_templates.get_template(name).render(**context),
                        headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                 "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'"})


def page_identity(request: Request, session: Annotated[str | None, Depends(cookie_scheme)]) -> Identity:
    """The signed-in person of a page request; redirects to the login page without a session."""
    identity = gate_of(request).accounts.identity_for_session(session) if session else None
    if identity is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise HTTPException(status.HTTP_303_SEE_OTHER, headers={"Location": f"/login?next={quote(target)}"})
    return identity


Person = Annotated[Identity, Depends(page_identity)]


def _safe_next(target: str | None) -> str:
    """Only a path on this node (never ``//elsewhere`` or a full URL) may follow a login."""
    if not target or not target.startswith("/") or target.startswith("//") or urlsplit(target).netloc:
        return "/"
    return target


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return request.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
    return urlsplit(origin).netloc == request.headers.get("host", "")


@router.get("/login")
def login_page(request: Request, next: str | None = None) -> HTMLResponse:  # noqa: A002 - the form's name
    return render("login.html", next=_safe_next(next), error=None)


@router.post("/login")
def login(request: Request, username: Annotated[str, Form(max_length=64)],
          password: Annotated[str, Form(max_length=1024)], next: Annotated[str, Form()] = "/") -> Response:  # noqa: A002
    gate = gate_of(request)
    address = client_address(request)
    if not _same_origin(request):
        gate.on_refused("cross-site-login")
        return render("login.html", next="/", error="login refused: the form came from another site")
    if _lockout.locked(username):
        gate.on_refused("locked")
        return _login_failed(request, username, address, "too many wrong passwords: try again in 15 minutes", 429)
    identity = gate.accounts.verify_password(username, password)
    if identity is None:
        _lockout.failed(username)
        gate.on_refused("wrong-password")
        return _login_failed(request, username, address, "wrong name or password", 401)
    _lockout.succeeded(username)
    session = gate.accounts.open_session(identity, gate.session_hours)
    if gate.audit is not None:
        gate.audit.user_authentication(user=identity.name, address=address, success=True)
    log.info("%s (%s) signed in from %s", identity.name, identity.role, address)
    response = RedirectResponse(_safe_next(next), status_code=status.HTTP_303_SEE_OTHER)
    response.set_cookie(SESSION_COOKIE, session, max_age=int(gate.session_hours * 3600), httponly=True,
                        samesite="strict", secure=gate.secure_cookies, path="/")
    return response


def _login_failed(request: Request, username: str, address: str | None, message: str, code: int) -> HTMLResponse:
    gate = gate_of(request)
    who = gate.login_name(username)  # never the typed text of a name that is no account: often a password
    if gate.audit is not None:
        gate.audit.user_authentication(user=who, address=address, success=False, description=message)
    log.warning("failed login for %s from %s: %s", who, address, message)
    response = render("login.html", next="/", error=message)
    response.status_code = code
    return response


@router.post("/logout")
def logout(request: Request, person: Person, csrf: Annotated[str, Form()] = "",
           session: Annotated[str | None, Depends(cookie_scheme)] = None) -> Response:
    sent = request.headers.get(CSRF_HEADER) or csrf
    if not (person.session and same_secret(sent, person.session)):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "missing or wrong CSRF token")
    gate = gate_of(request)
    if session:
        gate.accounts.close_session(session)
    if gate.audit is not None:
        gate.audit.user_authentication(user=person.name, address=client_address(request), success=True, login=False)
    response = RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def _page(template: str, request: Request, person: Identity, **context: object) -> HTMLResponse:
    gate = gate_of(request)
    return render(template, person=person, csrf=person.session, patient_data=gate.sees_patient_data(person),
                  path=request.url.path, **context)


PAGES = {"/": "overview.html", "/jobs": "jobs.html", "/review": "review.html", "/destinations": "destinations.html",
         "/rules": "rules.html", "/audit": "audit.html", "/performance": "performance.html"}
"""The dashboard's pages: each a template whose script fills it from the API."""


def _page_route(template: str):  # type: ignore[no-untyped-def]
    def page(request: Request, person: Person) -> HTMLResponse:
        return _page(template, request, person)

    return page


for _path, _template in PAGES.items():
    router.add_api_route(_path, _page_route(_template), methods=["GET"], name=_template.removesuffix(".html"))


@router.get("/jobs/{job_id}")
def job_page(request: Request, person: Person, job_id: int) -> HTMLResponse:
    return _page("job.html", request, person, job_id=job_id)
