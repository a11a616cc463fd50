"""The node's activity log: one line per study received, job transition and delivery, read from the job
store's event log (the one record every part writes), so the log says what the store says, once.

Per-instance events (``late``, ``duplicate``, ``re-received``) are not logged at the default level: the
association's own line counts them. Values are written through the logging setup's escaping
(:mod:`radnode.logs`), so a control character in a UID cannot forge a line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("radnode.activity")

LOGGED_KINDS = frozenset({
    "received", "route", "queued", "running", "requeued", "restarted", "finished", "review", "done", "failed",
    "delivered", "delivery-error", "delivery-failed", "purged", "retry", "resend", "cancelled", "completed",
    "reviewed", "paused", "resumed",
})
"""Event kinds written as log lines at INFO (failures at WARNING)."""
WARNING_KINDS = frozenset({"failed", "delivery-error", "delivery-failed"})

LATEST_EVENT = "SELECT COALESCE(MAX(id), 0) FROM events"
NEW_EVENTS = ("SELECT e.id, e.job_id, e.kind, e.message, j.pipeline FROM events e JOIN jobs j ON j.id = e.job_id "
              "WHERE e.id > :after ORDER BY e.id LIMIT 500")


class ActivityLog:
    """Follows the event log (``read_rows`` runs a read-only query on the job store) and logs each new line."""

    def __init__(self, read_rows: Callable[[str, dict[str, object]], list[tuple]]) -> None:
        self._read = read_rows
        ((self._after,),) = read_rows(LATEST_EVENT, {})  # history is in the store, not re-logged at start

    def tick(self) -> None:
        while True:
            rows = self._read(NEW_EVENTS, {"after": self._after})
            for event_id, job_id, kind, message, pipeline in rows:
                self._after = event_id
                if kind in LOGGED_KINDS:
                    level = logging.WARNING if kind in WARNING_KINDS else logging.INFO
                    log.log(level, "job %d (%s) %s: %s", job_id, pipeline or "-", kind, message)
                else:
                    log.debug("job %d (%s) %s: %s", job_id, pipeline or "-", kind, message)
            if len(rows) < 500:
                return
