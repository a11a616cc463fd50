"""The leader's side of the distributed engine: dispatch queued jobs, publish the outbox, collect finished
attempts for egress, reap lapsed leases (one round per scheduler tick)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from radnode.config import Config
from radnode.node.engine.broker import BROKER_PRIORITY, TASK, celery_app, job_queue
from radnode.node.engine.storage import Storage, StorageError
from radnode.node.store import JobStore

log = logging.getLogger(__name__)


class Dispatcher:
    """Queued jobs → storage + outbox → broker; reported outputs → egress; lapsed leases → requeued."""

    def __init__(self, config: Config, store: JobStore, storage: Storage, prepare: Callable[[int], tuple[Path, Path]],
                 finish: Callable[[int, Path], None]) -> None:
        """``prepare(job)`` makes the job's local ``in/`` and ``out/``; ``finish(job, outputs)`` records its
        review and stages its results for egress (the scheduler's own, as for a local run)."""
        self.config, self.store, self.storage = config, store, storage
        self.prepare, self.finish = prepare, finish
        self.app = celery_app(config.engine, [])
        self._broker_down = False

    def tick(self) -> None:
        self.dispatch()
        self.publish()
        self.collect()
        for job_id, what in self.store.reap_expired(self.config.engine.max_attempts):
            log.warning("job %d: %s", job_id, what)

    def dispatch(self) -> None:
        """Upload each undispatched queued job's input (once) and write its publication."""
        for job_id in self.store.undispatched():
            job = self.store.job(job_id)
            if job is None:
                continue
            try:
                if not self.storage.has_inputs(job_id):
                    inputs, _ = self.prepare(job_id)
                    self.storage.put_inputs(job_id, inputs)
                    shutil.rmtree(inputs, ignore_errors=True)
            except (OSError, StorageError) as e:
                log.error("job %d: cannot put its input in the storage (%s); trying again", job_id, e)
                return
            queue = job.queue or self.config.engine.default_queue
            self.store.dispatch(job_id, queue, BROKER_PRIORITY[job.priority.rank])

    def publish(self) -> None:
        """Send the outbox's messages; a broker that is down leaves them there for the next round."""
        for pub in self.store.unpublished():
            try:
                self.app.send_task(TASK, args=[pub.job_id, pub.id], queue=job_queue(pub.queue),
                                   priority=pub.priority, retry=False)
            except Exception as e:  # the transport's own connection errors
                self.store.publish_failed(pub.id, str(e))
                if not self._broker_down:
                    log.error("broker unreachable (%s): jobs wait in the store's outbox", e)
                self._broker_down = True
                return
            if self._broker_down:
                log.warning("broker reachable again: publishing the outbox")
                self._broker_down = False
            self.store.published(pub.id)

    def collect(self) -> None:
        """Fetch the outputs of attempts their worker reported and hand them to egress."""
        for job_id, attempt in self.store.completed_remotely():
            outputs = self.config.data_dir / "jobs" / str(job_id) / "out"
            shutil.rmtree(outputs, ignore_errors=True)
            outputs.mkdir(parents=True)
            try:
                self.storage.get_outputs(job_id, attempt, outputs)
            except (OSError, StorageError) as e:
                log.error("job %d: %s; trying again", job_id, e)
                continue
            self.finish(job_id, outputs)

    def close(self) -> None:
        self.app.close()
