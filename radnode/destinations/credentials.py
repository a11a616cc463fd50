"""What HTTP destinations share: credentials (basic or bearer) whose secrets are named by where they live
(:class:`radnode.security.secrets.Secret`, the node's one grammar for secrets: ``{env:}`` or ``{file:}``), read
when a request is made (a rotated token needs no restart); the URL check; the base with ``url`` and ``auth``;
failures in a few words; the GET of a live check.

Nothing here puts a secret into a message: errors name the variable or the file, ``describe`` says which kind
of authentication is used and where its secret comes from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from radnode.destinations.base import Check, Destination, SendContext
from radnode.security.secrets import Secret, SecretError

if TYPE_CHECKING:
    import requests


class BasicAuth(BaseModel):
    """HTTP basic authentication."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["basic"]
    username: Annotated[str, Field(min_length=1)]
    password: Secret

    def describe(self) -> str:
        return f"basic auth as {self.username}, password from {self.password.describe()}"

    def apply(self, session: "requests.Session") -> None:
        session.auth = (self.username, self.password.reveal())


class BearerAuth(BaseModel):
    """An OAuth 2 / OpenID bearer token (``Authorization: Bearer …``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["bearer"]
    token: Secret

    def describe(self) -> str:
        return f"bearer token from {self.token.describe()}"

    def apply(self, session: "requests.Session") -> None:
        session.headers["Authorization"] = f"Bearer {self.token.reveal()}"


HttpAuth = Annotated[BasicAuth | BearerAuth, Field(discriminator="type")]


def http_session(auth: BasicAuth | BearerAuth | None) -> "requests.Session":
    """A requests session carrying the authentication (the secret read now)."""
    import requests

    session = requests.Session()
    if auth is not None:
        auth.apply(session)
    return session


def check_url(url: str) -> str:
    """An http(s) URL without credentials in it (they would end up in logs); trailing slash removed."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("expected an http:// or https:// URL")
    if parts.username or parts.password:
        raise ValueError("credentials do not belong in the URL (they would be logged): use auth: instead")
    return url.rstrip("/")


class HttpDestination(Destination):
    """A destination reached over HTTP(S) at ``url`` (one line: ``TYPE:URL``), optionally authenticated."""

    url: str
    auth: HttpAuth | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_url(v)

    @classmethod
    def shorthand(cls, argument: str) -> dict[str, Any]:
        return {"url": argument}

    def authentication(self) -> str:
        """`` (how it authenticates)`` for ``describe``, or nothing."""
        return f" ({self.auth.describe()})" if self.auth else ""


def http_failure(error: BaseException) -> str:
    """A requests failure in a few words: ``connection refused``, ``cannot resolve host``, or its own text."""
    import requests

    text = str(error)
    if isinstance(error, requests.ConnectionError):
        if "Connection refused" in text:
            return "connection refused"
        if "Name or service not known" in text or "Temporary failure in name resolution" in text:
            return "cannot resolve host"
    return f"{type(error).__name__}: {text[:300]}"


def http_check(destination: HttpDestination, path: str, accept: str, context: SendContext
               ) -> "requests.Response | Check":
    """``GET <url>/<path>`` with the destination's credentials and timeouts for a live check: the 2xx answer, or
    the failed :class:`Check` saying why (connection refused, credentials refused, HTTP status)."""
    import requests

    url = f"{destination.url.rstrip('/')}/{path}"
    try:
        session = http_session(destination.auth)
    except SecretError as e:
        return Check(False, f"credentials for {destination.url}: {e}")
    timeout = (context.timeouts.connect_seconds, context.timeouts.network_seconds)
    with session:
        try:
            answer = session.get(url, timeout=timeout, headers={"Accept": accept})
        except requests.Timeout:
            return Check(False, f"GET {url}: timed out after {context.timeouts.network_seconds:g} s")
        except requests.RequestException as e:
            return Check(False, f"GET {url}: {http_failure(e)}")
    if answer.status_code in (401, 403):
        return Check(False, f"GET {url}: HTTP {answer.status_code} (credentials refused)")
    if not 200 <= answer.status_code < 300:
        return Check(False, f"GET {url}: HTTP {answer.status_code}")
    return answer
