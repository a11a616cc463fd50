"""People and API tokens of the console: roles, password hashes, hashed tokens and login sessions.

Three roles, each including the one before: ``viewer`` reads the console (jobs, queue, destinations, rules),
``operator`` acts on jobs (retry, re-send, cancel, force complete, pause the queue, mark reviewed) and sends
studies over STOW-RS, ``admin`` manages users and tokens and reads the audit log. Which roles see patient
data (name, ID, accession) is the site's choice (``api.patient_data_roles``).

Passwords are hashed with Argon2id (argon2-cffi's RFC 9106 low-memory profile) and re-hashed on login when
the parameters change. API tokens and session ids are 256-bit random strings shown once; only their SHA-256
is kept (a slow hash protects guessable passwords, not random keys, and every request checks a token).
A token carries its own role and name (``radnode tokens create ci-bot --role viewer``); a session belongs
to a person and ends at logout or after ``api.session_hours``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

TOKEN_PREFIX = "rnt_"
"""API tokens start with this, so a leaked one is recognisable (secret scanners, logs)."""

MIN_PASSWORD_LENGTH = 12
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class Role(StrEnum):
    """What a person or token may do; each role includes the ones before it."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def includes(self, other: "Role") -> bool:
        """True when this role may do what ``other`` may."""
        return self.rank >= other.rank


@dataclass(frozen=True)
class Identity:
    """Who a request comes from: a person signed in, or an API token (``kind``)."""

    name: str
    role: Role
    kind: str
    """``user`` (a dashboard session) or ``token``."""
    session: str | None = None
    """The session's CSRF secret (cookie sessions only)."""

    @property
    def label(self) -> str:
        """How job events and the audit trail name it: the user, or ``token:NAME``."""
        return self.name if self.kind == "user" else f"token:{self.name}"


class AccountError(ValueError):
    """A user or token command that cannot be done; the message says why."""


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_name(name: str) -> str:
    """A user or token name: letters, digits and ``._@-``, 1–64 characters (it appears in job events)."""
    if not _NAME.fullmatch(name):
        raise AccountError(f"name {name!r}: expected 1-64 letters, digits or . _ @ - (starting with a letter or digit)")
    return name


def parse_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        raise AccountError(f"role {text!r}: expected one of {', '.join(r.value for r in Role)}") from None


class AccountRows(Protocol):
    """Where accounts are kept: the job store's console area (:mod:`radnode.node.store.console`)."""

    def insert_user(self, values: dict) -> bool: ...
    def update_user(self, name: str, values: dict, end_sessions: bool = False) -> bool: ...
    def delete_user(self, name: str) -> bool: ...
    def user_rows(self, name: str | None = None) -> list: ...
    def insert_token(self, values: dict) -> bool: ...
    def delete_token(self, name: str) -> bool: ...
    def token_rows(self, digest: str | None = None) -> list: ...
    def token_used(self, name: str, at: float) -> None: ...
    def insert_session(self, values: dict) -> None: ...
    def session_row(self, digest: str) -> Any: ...
    def delete_session(self, digest: str) -> None: ...


class Accounts:
    """People, tokens and sessions, kept in the job store (so every node process sharing it agrees)."""

    def __init__(self, rows: AccountRows) -> None:
        self._rows = rows
        self._hasher = PasswordHasher()
        self._dummy_hash = self._hasher.hash(secrets.token_hex(16))
        """Verified against when a name is unknown, so a login takes as long whether or not the user exists."""

    # --- people --------------------------------------------------------------------------------------

    def add_user(self, name: str, role: Role, password: str) -> None:
        """A new person; AccountError when the name is taken or the password too short."""
        check_name(name)
        self._check_password(password)
        if not self._rows.insert_user({"name": name, "role": role.value, "password_hash": self._hasher.hash(password),
                                       "created_at": time.time()}):
            raise AccountError(f"user {name!r} exists already")

    def set_password(self, name: str, password: str) -> None:
        """A new password; the person's sessions end (signed in elsewhere: not any more)."""
        self._check_password(password)
        if not self._rows.update_user(name, {"password_hash": self._hasher.hash(password)}, end_sessions=True):
            raise AccountError(f"no user {name!r}")

    def set_role(self, name: str, role: Role) -> None:
        if not self._rows.update_user(name, {"role": role.value}):
            raise AccountError(f"no user {name!r}")

    def remove_user(self, name: str) -> None:
        if not self._rows.delete_user(name):
            raise AccountError(f"no user {name!r}")

    def users(self) -> list[tuple[str, Role, float, float | None]]:
        """(name, role, created_at, last_login_at) of every person, by name."""
        return [(r.name, Role(r.role), r.created_at, r.last_login_at) for r in self._rows.user_rows()]

    def is_user(self, name: str) -> bool:
        """Whether ``name`` is a person's account (a failed login names only those in the logs)."""
        return bool(self._rows.user_rows(name))

    def verify_password(self, name: str, password: str) -> Identity | None:
        """The person when the password is theirs, else None (as slowly for an unknown name)."""
        rows = self._rows.user_rows(name)
        row = rows[0] if rows else None
        try:
            self._hasher.verify(row.password_hash if row else self._dummy_hash, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        values: dict[str, object] = {"last_login_at": time.time()}
        if self._hasher.check_needs_rehash(row.password_hash):
            values["password_hash"] = self._hasher.hash(password)
        self._rows.update_user(name, values)
        return Identity(row.name, Role(row.role), "user")

    @staticmethod
    def _check_password(password: str) -> None:
        if len(password) < MIN_PASSWORD_LENGTH:
            raise AccountError(f"password too short: at least {MIN_PASSWORD_LENGTH} characters")

    # --- API tokens ----------------------------------------------------------------------------------

    def create_token(self, name: str, role: Role, days: float | None = None) -> str:
        """A new API token (shown this once; only its hash is kept); ``days`` until it expires (None: never; 0 or
        less is refused, never read as "never" nor as a token born expired)."""
        check_name(name)
        if days is not None and not (math.isfinite(days) and days > 0):
            raise AccountError(f"a token's days must be a positive number, not {days:g} (leave it out for a token that "
                               "never expires)")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        if not self._rows.insert_token({"name": name, "role": role.value, "token_sha256": _digest(token),
                                        "created_at": now, "expires_at": now + days * 86400 if days else None}):
            raise AccountError(f"token {name!r} exists already (revoke it first to make a new one)")
        return token

    def revoke_token(self, name: str) -> None:
        if not self._rows.delete_token(name):
            raise AccountError(f"no token {name!r}")

    def tokens(self) -> list[tuple[str, Role, float, float | None, float | None]]:
        """(name, role, created_at, expires_at, last_used_at) of every token, by name."""
        return [(r.name, Role(r.role), r.created_at, r.expires_at, r.last_used_at) for r in self._rows.token_rows()]

    def identity_for_token(self, token: str) -> Identity | None:
        """The token's identity, or None when it is unknown, revoked or expired."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        now = time.time()
        rows = self._rows.token_rows(_digest(token))
        row = rows[0] if rows else None
        if row is None or (row.expires_at is not None and row.expires_at < now):
            return None
        if row.last_used_at is None or now - row.last_used_at > 60:  # one write a minute per token at most
            self._rows.token_used(row.name, now)
        return Identity(row.name, Role(row.role), "token")

    # --- login sessions ------------------------------------------------------------------------------

    def open_session(self, user: Identity, hours: float) -> str:
        """A new session for a signed-in person; returns the session id for the cookie."""
        session_id = secrets.token_urlsafe(32)
        now = time.time()
        self._rows.insert_session({"id_sha256": _digest(session_id), "user_name": user.name,
                                   "csrf": secrets.token_urlsafe(24), "created_at": now,
                                   "expires_at": now + hours * 3600})
        return session_id

    def identity_for_session(self, session_id: str) -> Identity | None:
        """The person of a live session (their current role), with its CSRF secret; None when it ended."""
        row = self._rows.session_row(_digest(session_id))
        if row is None or row.expires_at < time.time():
            return None
        return Identity(row.name, Role(row.role), "user", session=row.csrf)

    def close_session(self, session_id: str) -> None:
        self._rows.delete_session(_digest(session_id))


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison of two secrets."""
    return hmac.compare_digest(given.encode(), expected.encode())
