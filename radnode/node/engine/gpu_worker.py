"""``radnode worker``: a Celery worker that runs the jobs of its queues, one at a time, each as its own
process (or container) with its hard timeout, exactly as the node runs them locally.

For each message: claim the job in the store (a new attempt, see ``store/cluster.py``), fetch its input from
the storage, run it, renew its lease while it runs (a lease that cannot be renewed because the job moved on
kills the run), write its outputs back to the storage and only then report them; the message is
acknowledged after that (late acks), so a worker that dies at any point leaves the job to the next one. A
claim the store cannot take (unreachable for ``engine.report_patience_seconds``) sends the message back to the
broker (rejected and requeued), never acknowledged with the job left queued and nothing on its way to it.
With several GPUs, ``radnode worker --gpus 0,1`` runs one such process per GPU, each seeing only its own
(``CUDA_VISIBLE_DEVICES``), and restarts one that dies. With ``processing.warm_start`` (the default) an in-process
job is handed to a pre-imported process of its pipeline (``node/warm.py``), as on a single node: one spare per
pipeline the rules send to this worker's queues, each taking exactly one job and exiting.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from sqlalchemy.exc import OperationalError

from radnode.config import Config
from radnode.node.engine.broker import TASK, celery_app, check_broker, dead_letter_queue
from radnode.node.engine.storage import StorageError, open_storage
from radnode.node.executors import (
    ContainerHandle, ExecutionError, InProcessExecutor, JobRun, configured_rules, executors, resolve_timeout,
)
from radnode.node.store import JobStore, store_target
from radnode.node.warm import WarmPool
from radnode.node.worker import (
    DEFAULT_JOB_COMMAND, describe_status, failure_reason, kill_group, last_line, start_job_process,
    with_model_sandbox,
)
from radnode.pipelines.routing import ExecutionMode
from radnode.pipelines.rules import RuleError
from radnode.security.sandbox import SandboxError

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL_SECONDS = 0.5


def worker_name(gpus: str) -> str:
    """``radnode-<host>-gpu<N>`` (or ``-cpu``), unique per host and device."""
    device = f"gpu{gpus.replace(',', '+')}" if gpus else "cpu"
    return f"radnode-{socket.gethostname()}-{device}"


class GpuWorker:
    """One Celery worker process with concurrency 1 (see the module docstring)."""

    def __init__(self, config: Config, config_file: Path, queues: Sequence[str], gpus: str,
                 name: str | None = None, job_command: Sequence[str] = DEFAULT_JOB_COMMAND) -> None:
        self.config = config.model_copy(update={"data_dir": config.data_dir.resolve()})
        self.queues = list(queues) or [config.engine.default_queue]
        self.gpus = gpus
        self.name = name or worker_name(gpus)
        self.host = socket.gethostname()
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus  # its own GPU only; none for a CPU worker on a GPU host
        self.store = JobStore(store_target(self.config.data_dir, self.config.store.url))
        self.storage = open_storage(self.config)
        self.storage.check()
        check_broker(self.config.engine, self.queues)
        self.config_file = config_file.resolve()
        self.executors = executors(self.config, list(job_command), self.config_file)
        self.warm = self._warm_pool(job_command)
        self.current_job: int | None = None
        self._stopping = threading.Event()

    @property
    def work_dir(self) -> Path:
        return self.config.data_dir / "worker" / self.name

    def _warm_pool(self, job_command: Sequence[str]) -> WarmPool | None:
        """Spares for the in-process pipelines the rules send to this worker's queues (None: warm start off,
        another job command, or rules this worker cannot read, which it says once: its jobs start cold)."""
        in_process = self.executors.get(ExecutionMode.IN_PROCESS)
        if not (self.config.processing.warm_start and tuple(job_command) == DEFAULT_JOB_COMMAND
                and isinstance(in_process, InProcessExecutor)):
            return None
        try:
            pipelines = configured_rules(self.config).in_process_pipelines_on(self.queues,
                                                                             self.config.engine.default_queue)
        except RuleError as e:
            log.warning("worker %s keeps no warm job process: %s", self.name, e)
            return None
        return WarmPool(pipelines, in_process.env, self.work_dir)

    def run(self) -> None:
        """Consume the queues until SIGTERM/SIGINT (Celery's warm shutdown: the running job finishes)."""
        app = celery_app(self.config.engine, self.queues)

        def run_job(task, job_id: int, dispatch_id: int) -> None:
            self._task(task, job_id, dispatch_id)

        app.task(name=TASK, bind=True)(run_job)
        self.store.worker_heartbeat(self.name, self.host, self.queues, self.gpus or "cpu", os.getpid(), None,
                                    started=True)
        beat = threading.Thread(target=self._heartbeats, name="radnode-worker-heartbeat", daemon=True)
        beat.start()
        log.info("worker %s serving %s (GPUs %s), store %s, storage %s", self.name, ", ".join(self.queues),
                 self.gpus or "none", self.store.label, self.storage.label)
        if self.warm is not None:  # from the main thread, which lives as long as the worker: the spares' parent
            self.warm.fill()
        try:
            worker = app.Worker(hostname=f"{self.name}@{self.host}", pool="threads", concurrency=1,
                                queues=self.queues, without_gossip=True, without_mingle=True,
                                without_heartbeat=True, loglevel="WARNING", quiet=True)
            worker.start()
        finally:
            self._stopping.set()
            if self.warm is not None:
                self.warm.close()
            try:
                self.store.worker_stopped(self.name)
            except Exception as e:  # the store may be what went away
                log.warning("could not record worker %s stopped: %s", self.name, e)
            self.store.close()

    def _heartbeats(self) -> None:
        interval = self.config.engine.lease_seconds / 3
        while not self._stopping.wait(interval):
            try:
                self.store.worker_heartbeat(self.name, self.host, self.queues, self.gpus or "cpu", os.getpid(),
                                            self.current_job)
            except Exception as e:  # a database restart: the next beat tries again
                log.warning("worker heartbeat not recorded: %s", e)

    def _task(self, task, job_id: int, dispatch_id: int) -> None:
        """The Celery task body: run one job's attempt (see the module docstring)."""
        from celery.exceptions import Reject

        redelivered = bool((task.request.delivery_info or {}).get("redelivered"))
        engine = self.config.engine
        try:
            claim = self._report(lambda: self.store.claim(job_id, dispatch_id, self.name, redelivered,
                                                          engine.lease_seconds, engine.max_attempts))
        except OperationalError as e:  # acknowledged, the message would be gone with the job still queued
            log.error("job %d: store unreachable for %g s, its claim not made (%s); its message goes back to the "
                      "broker", job_id, engine.report_patience_seconds, e)
            raise Reject(f"store unreachable: {e}", requeue=True) from e
        if claim.exhausted:
            log.error("job %d: %s; its message goes to %s", job_id, claim.why, dead_letter_queue().name)
            raise Reject(claim.why, requeue=False)
        if not claim.attempt:
            log.info("job %d: message %d dropped: %s", job_id, dispatch_id, claim.why)
            return
        self.current_job = job_id
        try:
            self._attempt(job_id, dispatch_id, claim.attempt)
        except Exception as e:  # a defect here must end the attempt with its reason, never leave it running
            log.exception("job %d attempt %d: worker error", job_id, claim.attempt)
            self._fail(job_id, claim.attempt, f"worker {self.name} error: {type(e).__name__}: {e}")
        finally:
            self.current_job = None
            if self.warm is not None:  # the next job's spare once this one is over (its imports would take a
                self.warm.fill()       # core from the job), from the pool's thread, which lives on

    def _attempt(self, job_id: int, dispatch_id: int, attempt: int) -> None:
        job = self._report(lambda: self.store.job(job_id))  # a database blip here must not fail the job
        assert job is not None
        root = self.work_dir / "jobs" / str(job_id) / f"attempt-{attempt}"
        shutil.rmtree(root, ignore_errors=True)
        (root / "out").mkdir(parents=True)
        (root / "in").mkdir()
        mode = job.execution.mode or ExecutionMode.IN_PROCESS
        executor = self.executors.get(mode)
        if executor is None:
            self._fail(job_id, attempt, f"the route asks for {mode} execution, which worker {self.name} cannot do "
                                        "(processing.container_engine is not set)")
            return
        try:
            self.storage.get_inputs(job_id, dispatch_id, root / "in")
            launch = executor.launch(JobRun(job_id, job.pipeline, root))
            timeout = resolve_timeout(mode, job.pipeline, job.execution.timeout_seconds,
                                      self.config.processing.job_timeout_seconds)
            launch, digests = with_model_sandbox(self.config, self.config_file, job.pipeline, mode, launch, root)
        except (ExecutionError, OSError, StorageError, SandboxError) as e:
            self._fail(job_id, attempt, f"cannot start {job.pipeline} ({mode}) on worker {self.name}: {e}")
            return
        where = f"host {self.host}, GPU {self.gpus}" if self.gpus else f"host {self.host}, CPU"
        code = "".join(f"; model {folder} {digest}" for folder, digest in digests.items())
        spare = self.warm.claim(job.pipeline, launch.argv, launch.env) if (
            self.warm is not None and mode is ExecutionMode.IN_PROCESS and not job.shadow) else None
        # (a sandboxed job never runs warm; nor a shadow one, which runs at a lower CPU priority)
        warm = ", warm process" if spare is not None else ""
        command = (f"({where}) {mode}: {shlex.join(launch.argv)} (timeout {timeout.seconds:g} s, {timeout.source}"
                   f"{warm}){code}")
        self._report(lambda: self.store.started_remotely(job_id, attempt, self.name, command))
        try:
            process = start_job_process(launch, root, spare, shadow=job.shadow)
        except OSError as e:
            self._fail(job_id, attempt, f"cannot start the job command on worker {self.name}: {e}")
            return
        status = self._watch(job_id, attempt, process, launch.container, timeout.seconds)
        if status is None:
            return  # fenced off, or timed out (already reported)
        if status != 0:
            self._fail(job_id, attempt, failure_reason(status, last_line(root / "stderr.log")))
            return
        try:
            self.storage.put_outputs(job_id, attempt, root / "out")
        except (OSError, StorageError) as e:
            self._fail(job_id, attempt, f"cannot write the outputs to the storage: {e}")
            return
        if self._report(lambda: self.store.report_outputs(job_id, attempt)):
            shutil.rmtree(root / "in", ignore_errors=True)
            shutil.rmtree(root / "out", ignore_errors=True)
            log.info("job %d attempt %d done on %s", job_id, attempt, self.name)
        else:
            log.warning("job %d attempt %d finished, but the job had moved on: its outputs are not used",
                        job_id, attempt)

    def _watch(self, job_id: int, attempt: int, process: subprocess.Popen, container: ContainerHandle | None,
               timeout_seconds: float) -> int | None:
        """Wait for the job process, renewing the lease; its exit status, or None when it was ended here."""
        engine = self.config.engine
        deadline = time.monotonic() + timeout_seconds
        renew_every = engine.lease_seconds / 3
        next_renewal = time.monotonic() + renew_every
        last_renewed = time.monotonic()
        while (status := process.poll()) is None:
            now = time.monotonic()
            ended = ""
            if now >= deadline:
                ended = f"timed out after {timeout_seconds:g} s"
            elif now >= next_renewal:
                next_renewal = now + renew_every
                try:
                    if self.store.renew_lease(job_id, attempt, engine.lease_seconds):
                        last_renewed = now
                    else:
                        ended = "fenced"
                except Exception as e:  # the store is unreachable: the job runs on while the lease holds
                    log.warning("job %d: lease not renewed: %s", job_id, e)
                    if now - last_renewed > engine.lease_seconds:
                        ended = "fenced"
            if ended:
                kill_group(process)
                if container is not None:  # killing the engine's client does not end the container
                    log.info("job %d attempt %d: %s", job_id, attempt, container.stop())
                if ended == "fenced":
                    log.warning("job %d attempt %d stopped: the job moved on (lease lost)", job_id, attempt)
                else:
                    self._fail(job_id, attempt, ended)
                return None
            time.sleep(POLL_SECONDS)
        if container is not None:
            log.info("job %d attempt %d: %s", job_id, attempt, container.finished(status))
        return status

    def _fail(self, job_id: int, attempt: int, reason: str) -> None:
        self._report(lambda: self.store.report_failure(job_id, attempt, reason))
        log.warning("job %d attempt %d failed: %s", job_id, attempt, reason)

    def _report(self, call: Callable[[], T]) -> T:
        """Call the store, retrying while it is unreachable (a database restart; the message stays
        unacknowledged meanwhile); what the call returns (False: the attempt was fenced off)."""
        give_up = time.monotonic() + self.config.engine.report_patience_seconds
        delay = 0.5
        while True:
            try:
                return call()
            except OperationalError as e:
                if time.monotonic() > give_up:
                    raise
                log.warning("store unreachable (%s); reporting again in %.0f s", e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)


def run_workers(config: Config, config_file: Path, queues: Sequence[str], gpus: list[str],
                name: str | None = None) -> int:
    """``radnode worker``: one worker for the CPU or a single GPU in this process; for several GPUs, one child
    process per GPU (restarted when it dies) until SIGTERM/SIGINT."""
    if len(gpus) <= 1:
        GpuWorker(config, config_file, queues, gpus[0] if gpus else "", name).run()
        return 0
    stopping = threading.Event()
    children: dict[str, subprocess.Popen] = {}

    def start(gpu: str) -> None:
        argv = [sys.executable, "-m", "radnode", "worker", "--config", str(config_file), "--gpus", gpu]
        if name:
            argv += ["--name", f"{name}-gpu{gpu}"]
        for q in queues:
            argv += ["--queue", q]
        children[gpu] = subprocess.Popen(argv, env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu})

    def forward(signum: int, frame: object) -> None:
        stopping.set()
        for child in children.values():
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    for gpu in gpus:
        start(gpu)
    while not stopping.wait(1.0):
        for gpu, child in list(children.items()):
            if child.poll() is None:
                continue
            if child.returncode == 2:  # refused at start (broker, store, storage): no use starting it again
                log.error("worker for GPU %s refused to start; stopping the others", gpu)
                forward(signal.SIGTERM, None)
                break
            log.error("worker for GPU %s ended (%s); starting it again", gpu, describe_status(child.returncode))
            start(gpu)
    for child in children.values():
        child.wait()
    return 2 if any(child.returncode == 2 for child in children.values()) else 0
