"""Secrets in the configuration: a password or key given by environment variable or file, never echoed.

A setting of type :class:`Secret` takes one of::

    password: {env: ORTHANC_PASSWORD}        # read from the node's environment when used
    password: {file: /etc/radnode/orthanc.pw}  # read from a file (owner-only, checked) when used
    password: s3cret                          # in clear in the config file: works, `config check` warns

Its ``repr``/``str`` and its JSON dump never show the value: a reference dumps as the reference, a literal
as ``**********``, so a dumped configuration (``node-config.yaml`` for the jobs) never carries the secret and
an error message that formats the setting names where it comes from, not what it is.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

REDACTED = "**********"
"""What a literal secret dumps as (pydantic's SecretStr shows the same)."""


class SecretError(ValueError):
    """A secret that cannot be read; the message names its source, never its value."""


class Secret:
    """A secret value from the environment, a file, or (discouraged) the config file itself."""

    __slots__ = ("_literal", "env", "file")

    def __init__(self, literal: str | None = None, *, env: str | None = None, file: str | Path | None = None) -> None:
        if sum(x is not None for x in (literal, env, file)) != 1:
            raise ValueError("a secret is a string, {env: VARIABLE} or {file: PATH}, exactly one of them")
        self._literal, self.env, self.file = literal, env, Path(file) if file is not None else None

    @property
    def source(self) -> str:
        """Where the value comes from, for messages: ``$NAME``, ``file PATH`` or ``the config file``."""
        if self.env is not None:
            return f"${self.env}"
        if self.file is not None:
            return f"file {self.file}"
        return "the config file (in clear)"

    @property
    def in_clear(self) -> bool:
        """Whether the value is written in the configuration itself."""
        return self._literal is not None

    def reveal(self) -> str:
        """The value, read now (a rotated file or variable is picked up); SecretError names the source."""
        if self._literal is not None:
            return self._literal
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise SecretError(f"secret ${self.env} is not set in the node's environment")
            return value
        assert self.file is not None
        try:
            return self.file.read_text().strip("\r\n")
        except OSError as e:
            raise SecretError(f"secret file {self.file} cannot be read ({e.strerror})") from None

    def problems(self) -> list[str]:
        """What a security review would object to: in clear, or a file others can read."""
        if self._literal is not None:
            return ["written in clear in the config file (use {env: NAME} or {file: PATH})"]
        if self.file is not None:
            try:
                mode = self.file.stat().st_mode
            except OSError as e:
                return [f"file {self.file} cannot be read ({e.strerror})"]
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                return [f"file {self.file} is readable by others (mode {stat.filemode(mode)}; chmod 600)"]
        return []

    def reference(self) -> Any:
        """The JSON form: the reference itself, or :data:`REDACTED` for a literal."""
        if self.env is not None:
            return {"env": self.env}
        if self.file is not None:
            return {"file": str(self.file)}
        return REDACTED

    def __repr__(self) -> str:
        return f"Secret({self.source})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and (self._literal, self.env, self.file) == (
            other._literal, other.env, other.file)

    def __hash__(self) -> int:
        return hash((self.env, self.file))

    @classmethod
    def parse(cls, value: Any) -> "Secret":
        """From the configuration's form (see the module docstring)."""
        if isinstance(value, Secret):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict) and len(value) == 1 and set(value) <= {"env", "file"}:
            key, item = next(iter(value.items()))
            if not isinstance(item, str) or not item:
                raise ValueError(f"secret {{{key}: ...}}: expected a non-empty string")
            return cls(env=item) if key == "env" else cls(file=item)
        raise ValueError("expected a string, {env: VARIABLE} or {file: PATH}")

    @classmethod
    def __get_pydantic_core_schema__(cls, source: type, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.parse, serialization=core_schema.plain_serializer_function_ser_schema(
                lambda s: s.reference(), when_used="json"))
