"""Log lines that a sender cannot forge: control characters in logged values are escaped.

Anything a peer sends (an Affected SOP Instance UID, an AE title, a patient name) may end up in a log line.
A newline in it would start a line of the sender's choosing ("... INFO radnode: job 7 done"), a carriage
return or an ANSI escape would hide text on a terminal. :class:`EscapeControlCharacters` renders every
record's message once and escapes C0/C1 control characters in it (``\\n`` → ``\\x0a``), so one record is
one line whatever its values hold; tracebacks (``exc_info``) are added by the formatter after it and keep
their lines.
"""

from __future__ import annotations

import logging
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_control(text: str) -> str:
    """``text`` with every C0/C1 control character (newline and tab included) written as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class EscapeControlCharacters(logging.Filter):
    """A handler filter: the record's message, rendered with its arguments, with control characters escaped."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let logging report it as it always does
            return True
        record.msg, record.args = escape_control(message), None
        return True


def install(root: logging.Logger | None = None) -> None:
    """Put the filter on every handler of ``root`` (default: the root logger) that lacks it."""
    for handler in (root or logging.getLogger()).handlers:
        if not any(isinstance(f, EscapeControlCharacters) for f in handler.filters):
            handler.addFilter(EscapeControlCharacters())
