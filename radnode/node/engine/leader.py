"""One scheduler/egress leader among the ingress nodes that share a PostgreSQL store.

Every node receives studies (its Storage SCP records them in the shared store, where a study's row lock
makes one job of a study whose instances reach two nodes); only the node holding the leader lock (a
session advisory lock on a connection of its own) schedules, dispatches, reaps and delivers, so a result
goes out from one place. The lock goes with its connection: a leader that dies (or loses the database)
loses it within a second or two, and another node takes over at its next poll.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import Connection

from radnode.node.store import JobStore

log = logging.getLogger(__name__)


class Leadership:
    """Polled by the node's leader thread; ``is_leader`` gates its scheduler, egress and retention."""

    def __init__(self, store: JobStore, on_gain: Callable[[], None], on_loss: Callable[[], None]) -> None:
        self.store, self.on_gain, self.on_loss = store, on_gain, on_loss
        self.is_leader = threading.Event()
        self._conn: Connection | None = None

    def tick(self) -> None:
        """Check the lock is still held, or try to take it."""
        if self._conn is not None:
            if self.store.leadership_held(self._conn):
                return
            self._conn = None
            self.is_leader.clear()
            log.warning("lost the leader lock (the database connection ended): scheduling and egress stop here")
            self.on_loss()
        conn = self.store.take_leadership()
        if conn is not None:
            self._conn = conn
            self.is_leader.set()
            log.warning("this node is the leader: it schedules, dispatches and delivers")
            self.on_gain()

    def release(self) -> None:
        self.is_leader.clear()
        if self._conn is not None:
            self.store.give_up_leadership(self._conn)
            self._conn = None
