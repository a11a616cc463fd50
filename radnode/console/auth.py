"""Who is asking and what they may do: the FastAPI dependencies every endpoint declares.

A request is authenticated by ``Authorization: Bearer <API token>`` or by the dashboard's session cookie
(``radnode_session``: HttpOnly, SameSite=Strict, Secure under HTTPS). A cookie request that changes
something (POST, PUT, PATCH, DELETE) must also carry the session's CSRF token in ``X-CSRF-Token`` (the
dashboard's pages hold it), so another site can never make a signed-in browser act: SameSite alone does
not cover every browser or a sibling sub-domain. Bearer requests carry no ambient credential and need none.

No identity: 401 with ``WWW-Authenticate: Bearer``. A role below the one required: 403.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Protocol

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from radnode.console.accounts import Accounts, Identity, Role, same_secret
from radnode.security.privacy import SiteKey

log = logging.getLogger(__name__)

SESSION_COOKIE = "radnode_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

bearer_scheme = HTTPBearer(auto_error=False, description="An API token from `radnode tokens create NAME --role ROLE`")
cookie_scheme = APIKeyCookie(name=SESSION_COOKIE, auto_error=False,
                             description="The dashboard's session (POST /login); unsafe methods also need "
                                         f"the {CSRF_HEADER} header")


class AuditSink(Protocol):
    """What the console tells the audit trail (``radnode.security.audit.AuditTrail`` implements it)."""

    def user_authentication(self, *, user: str, address: str | None, success: bool, login: bool = True,
                            description: str | None = None) -> str: ...

    def user_action(self, *, user: str, address: str | None, action: str, what: str,
                    study_uid: str | None = None, patient_id: str | None = None, success: bool = True,
                    configuration: bool = False, refused: str | None = None) -> str: ...


@dataclass
class Gate:
    """The console's authentication settings and stores, kept on ``app.state.gate``."""

    accounts: Accounts
    patient_data_roles: frozenset[Role]
    secure_cookies: bool
    session_hours: float
    public_metrics: bool = False
    orthanc_token: str | None = None
    """The token the Orthanc plugin must send (None: plugin events are refused)."""
    audit: AuditSink | None = None
    on_refused: Callable[[str], None] = field(default=lambda reason: None)
    """Counts refused requests (``radnode_http_requests_refused_total``)."""
    export_identifier_roles: frozenset[Role] = frozenset({Role.ADMIN})
    """Roles that may export the feedback records with patient identifiers (``api.export_identifier_roles``)."""
    name_key: SiteKey = field(default_factory=lambda: SiteKey(secrets.token_bytes(32)))
    """Keys the digest of an unknown login name (the node gives the site key, so digests agree across restarts)."""

    def login_name(self, typed: str) -> str:
        """How a failed login names who tried: a known account by its name; anything else (often a password
        typed into the name field) as ``unknown user (<8 hex>)``, a keyed digest that correlates repeated
        attempts without keeping the text."""
        if self.accounts.is_user(typed):
            return typed
        return f"unknown user ({self.name_key.pseudonym('login-name', typed, 8)})"

    def sees_patient_data(self, identity: Identity) -> bool:
        return identity.role in self.patient_data_roles

    def exports_identifiers(self, identity: Identity) -> bool:
        return identity.role in self.export_identifier_roles


def gate_of(request: Request) -> Gate:
    return request.app.state.gate


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None


async def identify(request: Request,
                   bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
                   session: Annotated[str | None, Depends(cookie_scheme)]) -> Identity | None:
    """The caller's identity, or None; a cookie request that changes something without the right CSRF
    token is refused (403) here."""
    gate = gate_of(request)
    if bearer is not None:
        return gate.accounts.identity_for_token(bearer.credentials)
    if session:
        identity = gate.accounts.identity_for_session(session)
        if identity is not None and request.method not in SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER, "")
            if not (identity.session and same_secret(sent, identity.session)):
                gate.on_refused("csrf")
                raise HTTPException(status.HTTP_403_FORBIDDEN, f"missing or wrong {CSRF_HEADER} header")
        return identity
    return None


def require(role: Role) -> Callable[..., Identity]:
    """A dependency: the caller's identity when its role includes ``role``; 401 without one, 403 below it."""

    def dependency(request: Request, identity: Annotated[Identity | None, Depends(identify)]) -> Identity:
        if identity is None:
            gate_of(request).on_refused("unauthenticated")
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "authentication required (Bearer token or login)",
                                headers={"WWW-Authenticate": "Bearer"})
        if not identity.role.includes(role):
            gate_of(request).on_refused("forbidden")
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"{identity.label} is {identity.role}; this needs {role}")
        return identity

    dependency.__name__ = f"require_{role.value}"
    return dependency


Viewer = Annotated[Identity, Depends(require(Role.VIEWER))]
Operator = Annotated[Identity, Depends(require(Role.OPERATOR))]
Admin = Annotated[Identity, Depends(require(Role.ADMIN))]


def metrics_reader(request: Request, identity: Annotated[Identity | None, Depends(identify)]) -> Identity | None:
    """``/metrics``: anyone when the site allows it (``api.public_metrics``), else a viewer."""
    if gate_of(request).public_metrics:
        return identity
    return require(Role.VIEWER)(request, identity)
