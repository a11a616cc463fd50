"""How radnode's commands log: readable lines (or JSON lines for a log shipper) on stderr.

At the default level radnode's own loggers write INFO (for ``serve``: one line per association, study,
job transition and delivery) and every library WARNING; ``-v`` adds radnode's DEBUG lines (per instance,
per step) and the libraries' INFO (pynetdicom's per-message lines). Control characters in a message are
escaped (``\\n`` → ``\\\\n``), so a value a peer sent (a UID with a newline) can never forge a log line;
tracebacks keep their lines.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Literal

LogFormat = Literal["text", "json"]

_CONTROL = {i: f"\\x{i:02x}" for i in range(32)} | {10: "\\n", 13: "\\r", 9: "\\t", 127: "\\x7f"}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape."""
    return text.translate(_CONTROL)


def _utc(record: logging.LogRecord) -> str:
    return dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


class TextFormatter(logging.Formatter):
    """``2026-12-01T10:15:00.250Z INFO radnode.activity: job 3 (ct_tissue) done: …``"""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc(record)} {record.levelname} {record.name}: {escape_controls(record.getMessage())}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO-8601 UTC), ``level``, ``logger``, ``message``, ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": _utc(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage(), "thread": record.threadName}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(verbose: bool = False, log_format: LogFormat = "text", radnode_level: int = logging.INFO) -> None:
    """Set up the root logger for a radnode command (replacing any earlier setup); ``radnode_level``: the
    default level of radnode's own loggers (INFO for ``serve``, WARNING for one-shot commands)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("radnode").setLevel(logging.DEBUG if verbose else radnode_level)
