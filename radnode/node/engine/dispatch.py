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
    """Queued jobs → outbox → storage + broker; reported outputs → egress; lapsed leases → requeued."""

    def __init__(self, config: Config, store: JobStore, storage: Storage, prepare: Callable[[int], tuple[Path, Path]],
                 finish: Callable[[int, Path], None]) -> None:
        """``prepare(job)`` makes the job's local ``in/`` and ``out/``; ``finish(job, outputs)`` records its
        review and stages its results for egress (the scheduler's own, as for a local run)."""
        self.config, self.store, self.storage = config, store, storage
        self.prepare, self.finish = prepare, finish
        self.app = celery_app(config.engine, [])
        self._broker_down = False

    def tick(self, dispatching: bool = True) -> None:
        """One round; ``dispatching`` False (the queue paused): nothing newly dispatched, the rest goes on."""
        if dispatching:
            self.dispatch()
        self.publish()
        self.collect()
        for job_id, what in self.store.reap_expired(self.config.engine.max_attempts):
            log.warning("job %d: %s", job_id, what)

    def dispatch(self) -> None:
        """Write a publication for each undispatched queued job (its input goes up when it is published)."""
        for job_id in self.store.undispatched():
            job = self.store.job(job_id)
            if job is None:
                continue
            queue = job.queue or self.config.engine.default_queue
            self.store.dispatch(job_id, queue, BROKER_PRIORITY[job.priority.rank])

    def publish(self) -> None:
        """Send the outbox's messages, each once its job's input for that dispatch is in the storage (uploaded
        here, as the job's instances are now). An input that cannot be put there waits for the next round and
        holds up no other job; a job whose instances cannot be read fails, naming why. A broker that is down
        leaves the messages there for the next round."""
        for pub in self.store.unpublished():
            if not self._input_ready(pub.job_id, pub.id):
                continue
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

    def _input_ready(self, job_id: int, dispatch: int) -> bool:
        """Put the job's input for ``dispatch`` in the storage unless it is there; False when it is not (yet)."""
        try:
            if self.storage.has_inputs(job_id, dispatch):
                return True
        except (OSError, StorageError) as e:
            log.error("job %d: storage unusable (%s); its message waits", job_id, e)
            return False
        try:
            inputs, _ = self.prepare(job_id)
        except OSError as e:
            self.store.fail_job(job_id, f"cannot prepare the job's input: {e}")
            return False
        try:
            self.storage.put_inputs(job_id, dispatch, inputs)
        except (OSError, StorageError) as e:
            log.error("job %d: cannot put its input in the storage (%s); its message waits", job_id, e)
            return False
        finally:
            shutil.rmtree(inputs, ignore_errors=True)
        return True

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
