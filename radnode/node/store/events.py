"""A job's append-only event log: every area writes to it inside its own transaction."""

from __future__ import annotations

import time

from sqlalchemy import Connection, insert, select

from radnode.node.store.database import Database
from radnode.node.store.records import Event
from radnode.node.store.schema import events


def log_event(conn: Connection, job_id: int, kind: str, message: str, at: float | None = None) -> None:
    """Append one line to a job's log (in the caller's transaction)."""
    conn.execute(insert(events).values(job_id=job_id, at=time.time() if at is None else at, kind=kind,
                                       message=message))


class EventLog:
    """Reading the event log, and the events that change no state."""

    _db: Database

    def note(self, job_id: int, kind: str, message: str) -> None:
        """An event that changes no state (e.g. which container image ran the job and how it exited)."""
        with self._db.write() as conn:
            log_event(conn, job_id, kind, message)

    def events(self, job_id: int, after_id: int = 0) -> list[Event]:
        """A job's event log in order (``after_id`` for polling only what is new)."""
        query = select(events).where(events.c.job_id == job_id, events.c.id > after_id).order_by(events.c.id)
        with self._db.read() as conn:
            return [Event(**row._mapping) for row in conn.execute(query)]
