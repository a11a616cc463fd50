"""Secrets in the configuration: named by where they live, never written in, never echoed.

A setting of type :class:`Secret` (an Orthanc or destination password, a bearer token, a key's pass phrase, the
site key) takes one of::

    password: {env: ORTHANC_PASSWORD}          # read from the node's environment when used
    password: {file: /etc/radnode/orthanc.pw}  # read from a file (a Kubernetes/compose secret mount) when used

A value written into the configuration is refused without echoing it. The secret is read when it is used, so
a rotated token or password needs no restart. Its ``repr``/``str`` and its JSON dump show only the reference,
so a dumped configuration (``node-config.yaml`` for the jobs) never carries the value, and every error names
the variable or the file, never what it holds.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

INVALID_SECRET = "invalid_secret"
"""The pydantic error type of a secret setting that cannot be used: its message is shown, its input never."""


class SecretError(RuntimeError):
    """A secret that cannot be read; the message names where it was looked for, never a value."""


class Secret:
    """Where a secret is: an environment variable or a file."""

    __slots__ = ("env", "file")

    def __init__(self, *, env: str | None = None, file: str | Path | None = None) -> None:
        if (env is None) == (file is None):
            raise ValueError("give exactly one of env (an environment variable) or file (a path)")
        if env is not None and not _VARIABLE.fullmatch(env):
            raise ValueError(f"{{env: {env}}}: not an environment variable name")
        self.env, self.file = env, Path(file) if file is not None else None

    def describe(self) -> str:
        """Where the value comes from, for messages: ``$NAME`` or ``file PATH``."""
        return f"${self.env}" if self.env is not None else f"file {self.file}"

    def reveal(self) -> str:
        """The value, read now (a file's trailing newline removed); :class:`SecretError` names the source."""
        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise SecretError(f"environment variable {self.env} is not set")
            return value
        assert self.file is not None
        try:
            value = self.file.read_text().rstrip("\r\n")
        except OSError as e:
            raise SecretError(f"cannot read secret file {self.file}: {e.strerror}") from None
        if not value:
            raise SecretError(f"secret file {self.file} is empty")
        return value

    def problems(self) -> list[str]:
        """What a security review would object to: a secret file that cannot be read or that others can read."""
        if self.file is None:
            return []
        try:
            mode = self.file.stat().st_mode
        except OSError as e:
            return [f"file {self.file} cannot be read ({e.strerror})"]
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            return [f"file {self.file} is readable by others (mode {stat.filemode(mode)}; chmod 600)"]
        return []

    def reference(self) -> dict[str, str]:
        """The configuration's form: ``{env: NAME}`` or ``{file: PATH}``."""
        return {"env": self.env} if self.env is not None else {"file": str(self.file)}

    def __repr__(self) -> str:
        return f"Secret({self.describe()})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and (self.env, self.file) == (other.env, other.file)

    def __hash__(self) -> int:
        return hash((self.env, self.file))

    @classmethod
    def parse(cls, value: Any) -> "Secret":
        """From the configuration's form (see the module docstring); anything else is refused with an error of
        type :data:`INVALID_SECRET`, which configuration errors report without the input (it may be the
        secret)."""
        if isinstance(value, Secret):
            return value
        if not isinstance(value, dict):
            raise PydanticCustomError(INVALID_SECRET, "a secret is named, not written here: use {env: VARIABLE} "
                                                      "or {file: PATH}")
        if len(value) != 1 or not set(value) <= {"env", "file"}:
            raise PydanticCustomError(INVALID_SECRET, "expected {env: VARIABLE} or {file: PATH}, exactly one of them")
        key, item = next(iter(value.items()))
        if not isinstance(item, (str, Path)) or not str(item):
            raise PydanticCustomError(INVALID_SECRET, "{env: ...} or {file: ...}: expected a non-empty string")
        try:
            return cls(env=str(item)) if key == "env" else cls(file=item)
        except ValueError as e:
            raise PydanticCustomError(INVALID_SECRET, str(e)) from None

    @classmethod
    def __get_pydantic_core_schema__(cls, source: type, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.parse, serialization=core_schema.plain_serializer_function_ser_schema(
                lambda s: s.reference(), when_used="json"))
