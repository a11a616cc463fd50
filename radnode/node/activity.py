"""The node's activity log: one line per study received, job transition and delivery, read from the job
store's event log (the one record every part writes), so the log says what the store says, once.

Per-instance events (``late``, ``duplicate``, ``re-received``, and ``delivered`` per object) are not logged
at the default level: the association's own line counts instances, and a delivery is logged once per job and
destination when its last object is settled (``job 3 (ct_tissue) delivered to PACS: 3 objects``). Values are written through the logging setup's escaping
(:mod:`radnode.logs`), so a control character in a UID cannot forge a line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("radnode.activity")

LOGGED_KINDS = frozenset({
    "received", "route", "queued", "running", "requeued", "restarted", "finished", "review", "done", "failed",
    "delivery-error", "delivery-failed", "purged", "retry", "resend", "cancelled", "completed",
    "reviewed", "reissue", "paused", "resumed", "held",
})
"""Event kinds written as log lines at INFO (failures at WARNING)."""
WARNING_KINDS = frozenset({"failed", "delivery-error", "delivery-failed"})

LATEST_EVENT = "SELECT COALESCE(MAX(id), 0) FROM events"
JOB_DELIVERIES = "SELECT destination, state, COUNT(*) FROM deliveries WHERE job_id = :job GROUP BY destination, state"
NEW_EVENTS = ("SELECT e.id, e.job_id, e.kind, e.message, j.pipeline FROM events e JOIN jobs j ON j.id = e.job_id "
              "WHERE e.id > :after ORDER BY e.id LIMIT 500")


class ActivityLog:
    """Follows the event log (``read_rows`` runs a read-only query on the job store) and logs each new line."""

    def __init__(self, read_rows: Callable[[str, dict[str, object]], list[tuple]]) -> None:
        self._read = read_rows
        ((self._after,),) = read_rows(LATEST_EVENT, {})  # history is in the store, not re-logged at start
        self._reported: set[tuple[int, str]] = set()
        """(job, destination) whose delivery was logged (a re-send logs again: it is cleared then)."""

    def tick(self) -> None:
        while True:
            rows = self._read(NEW_EVENTS, {"after": self._after})
            delivered: dict[int, str] = {}
            for event_id, job_id, kind, message, pipeline in rows:
                self._after = event_id
                if kind == "delivered":
                    delivered[job_id] = pipeline
                elif kind in ("done", "failed") and job_id in delivered:
                    self._log_settled(job_id, delivered.pop(job_id))  # the deliveries' line before the job's end
                if kind in ("resend", "retry", "reissue"):
                    self._reported = {key for key in self._reported if key[0] != job_id}
                if kind in LOGGED_KINDS:
                    level = logging.WARNING if kind in WARNING_KINDS else logging.INFO
                    log.log(level, "job %d (%s) %s: %s", job_id, pipeline or "-", kind, message)
                else:
                    log.debug("job %d (%s) %s: %s", job_id, pipeline or "-", kind, message)
            for job_id, pipeline in delivered.items():
                self._log_settled(job_id, pipeline)
            if len(rows) < 500:
                return

    def _log_settled(self, job_id: int, pipeline: str) -> None:
        """One line per destination of the job whose objects are all delivered."""
        states: dict[str, dict[str, int]] = {}
        for destination, state, count in self._read(JOB_DELIVERIES, {"job": job_id}):
            states.setdefault(destination, {})[state] = count
        for destination, counts in states.items():
            if set(counts) == {"done"} and (job_id, destination) not in self._reported:
                self._reported.add((job_id, destination))
                log.info("job %d (%s) delivered to %s: %d object(s)", job_id, pipeline or "-", destination,
                         counts["done"])
