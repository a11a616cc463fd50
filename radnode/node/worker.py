"""The scheduler: turns complete studies into jobs and runs each job in its own process.

A job's input is a folder of hard links to the instances it covers (so instances arriving late do not
change a running job's input); the job's command writes into the job's ``out`` folder. The command is
built by the executor its route chose (``executors.py``: in-process, subprocess or container). A job
that fails, crashes or overruns its timeout (the route's, the MAP's or ``processing.job_timeout_seconds``;
its process group is killed, and a container removed) ends ``failed`` with the reason — ``timed out
after N s``, with the mode in brackets unless it is the default in-process — and the node and the other
jobs carry on. A process ended by a signal says which (``killed by signal 9 (SIGKILL) — out of memory?``)
and, being transient, runs again up to ``processing.retries`` times; a pipeline's own refusal does not. A run that ends well has its review decision (``review`` in ``out/manifest.json``, written by
pipelines that score their uncertainty) copied into the job store before its results are staged.

With ``processing.warm_start`` (the default) an in-process job is handed to a pre-imported process of its
pipeline (``warm.py``) instead of a fresh interpreter: the same command, timeout and isolation, one process per
job, ready to read its input in a fraction of a second.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from radnode.config import Config
from radnode.execution import ManifestError, RunManifest
from radnode.node.completeness import CompletenessSettings, PeerCompleteness, study_verdict
from radnode.node.egress import Egress
from radnode.node.executors import ContainerExecutor, ExecutionError, InProcessExecutor, JobRun, Launch, executors, \
    resolve_timeout
from radnode.node.store import Job, JobStore
from radnode.outputs.layout import RunOutput
from radnode.node.warm import WarmPool, die_with_parent
from radnode.pipelines.routing import ExecutionMode
from radnode.security.sandbox import SandboxError, content_hash, sandbox_job

if TYPE_CHECKING:
    from radnode.node.engine.dispatch import Dispatcher
    from radnode.node.engine.storage import Storage

log = logging.getLogger(__name__)

DEFAULT_JOB_COMMAND: tuple[str, ...] = (sys.executable, "-m", "radnode", "run")
"""The in-process executor's command, called as ``COMMAND INPUT_DIR --output OUT_DIR --pipeline NAME``."""

STOP_GRACE_SECONDS = 5.0


@dataclass
class JobProcess:
    """A job's running process, how it runs and its hard deadline."""

    job_id: int
    process: subprocess.Popen
    launch: Launch
    mode: ExecutionMode
    timeout_seconds: float
    deadline: float
    """``time.monotonic()`` after which the process group is killed."""
    stderr_path: Path
    attempt: int = 1
    """Which run of the job this is (1 the first)."""
    oom_kills_before: int | None = None
    """The node's cgroup OOM-kill count when it started (None: not readable here)."""

    def end(self, grace: float = 0.0) -> str | None:
        """Kill the process group (see :func:`kill_group`), then stop and remove its container, if any;
        returns what happened to the container (for the job's events)."""
        kill_group(self.process, grace)
        return self.launch.container.stop(grace) if self.launch.container else None

    def finished(self, status: int) -> str | None:
        """After the command ended by itself: the container's exit, and its removal; None outside a container."""
        return self.launch.container.finished(status) if self.launch.container else None


def job_dir(config: Config, job_id: int) -> Path:
    """``data_dir/jobs/<job_id>``: ``in/`` (links to the input), ``out/``, ``stdout.log``, ``stderr.log``, and
    ``work/`` (``HOLOSCAN_WORKDIR``) for subprocess execution."""
    return config.data_dir / "jobs" / str(job_id)


def last_line(path: Path) -> str:
    """The last non-empty line of a text file ('' if none)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def run_manifest(job_id: int, outputs: Path) -> RunManifest | None:
    """A finished run's manifest (its review decision and warnings); None when the run wrote no radnode manifest
    (a site command may write none, or its own: logged, the job goes on unassessed)."""
    try:
        return RunManifest.read(outputs)
    except FileNotFoundError:
        return None
    except (OSError, ManifestError) as e:
        log.warning("job %d: %s; its review is not assessed", job_id, e)
        return None


def completeness_settings(config: Config) -> CompletenessSettings:
    """The node's completeness defaults from ``ingress.*``, with each sending AE's own (``ingress.peers``)."""
    ingress = config.ingress
    peers = {ae: PeerCompleteness(peer.study_idle_seconds, peer.study_quiet_seconds)
             for ae, peer in ingress.peers.items()}
    return CompletenessSettings(ingress.study_idle_seconds, ingress.association_grace_seconds,
                                ingress.study_grace_seconds, ingress.study_quiet_seconds, peers=peers)


class Scheduler:
    """Queues complete studies, starts queued jobs (most urgent first) up to the concurrency limit, reaps
    them and kills those over their time limit, restarted for late instances or cancelled; while the queue is
    paused (``radnode queue pause``) nothing new starts."""

    def __init__(self, config: Config, store: JobStore, egress: Egress, command: Sequence[str],
                 config_file: Path, warm_pipelines: Iterable[str] = (), storage: Storage | None = None) -> None:
        """``warm_pipelines``: those the rules run in-process, each kept warm (``processing.warm_start``) when
        the job command is the default one. ``storage``: with ``engine.kind: celery``, where jobs' inputs and
        outputs go for the workers; the scheduler then dispatches pipeline jobs to the broker instead of running
        them (``engine/``)."""
        self.config = config
        self.store = store
        self.egress = egress
        self.config_file = config_file
        self.executors = executors(config, command, config_file)
        container = self.executors.get(ExecutionMode.CONTAINER)
        if isinstance(container, ContainerExecutor):  # a crash leaves containers of jobs that now run again
            for name in container.remove_leftovers():
                log.warning("removed container %s left by an earlier run of this node", name)
        self.running: dict[int, JobProcess] = {}
        self.completeness = completeness_settings(config)
        in_process = self.executors[ExecutionMode.IN_PROCESS]
        self.warm = WarmPool(warm_pipelines, in_process.env, config.data_dir) if (
            config.processing.warm_start and tuple(command) == DEFAULT_JOB_COMMAND and storage is None
            and isinstance(in_process, InProcessExecutor)) else None  # with an engine, the workers keep spares
        self.remote: Dispatcher | None = None
        if storage is not None:
            from radnode.node.engine.dispatch import Dispatcher

            self.remote = Dispatcher(config, store, storage, self._prepare, self._finish)

    def tick(self) -> None:
        """One scheduling round; called repeatedly by the node's scheduler thread (the warm processes are
        started here: they die with the thread that started them). A spare taken by a job is replaced once no job
        runs: its imports take a core for seconds, which a running job (segmentation on every core) would lose."""
        if self.warm is not None and not self.running:
            self.warm.fill()
        self.queue_complete_studies()
        for job_id in self.store.restart_requested():
            if job_id in self.running:
                self._note_container(job_id, self.running.pop(job_id).end())
            self.store.restart(job_id)
        for job_id in self.store.cancelled(self.running):  # an operator cancelled it: end its process (container)
            self._note_container(job_id, self.running.pop(job_id).end())
        paused = self.store.queue_paused()  # an operator paused the queue: nothing new starts (or is dispatched)
        if self.remote is not None:
            self.remote.tick(dispatching=not paused)
            while not paused and (job := self.store.next_queued(forward_only=True)) is not None:
                self._forward(job.id)
            return
        for job_id in list(self.running):
            self._reap(self.running[job_id])
        while not paused and len(self.running) < self.config.processing.max_concurrent_jobs:
            job = self.store.next_queued()
            if job is None:
                break
            if job.pipeline:
                self._start(job)
            else:
                self._forward(job.id)

    def queue_complete_studies(self) -> None:
        """Queue every receiving study the completeness policy judges complete now."""
        now = time.time()
        for job_id, series in self.store.receiving().items():
            verdict = study_verdict(series, now, self.completeness)
            if verdict.complete:
                state = self.store.queue_job(job_id, verdict.reason, now)
                log.debug("job %d %s: %s", job_id, state, verdict.reason)

    def _forward(self, job_id: int) -> None:
        """A forward-only route: no pipeline; the study's own instances are delivered to the route's forwards."""
        try:
            inputs, _ = self._prepare(job_id)
        except OSError as e:
            self.store.fail_job(job_id, f"cannot prepare the job's input: {e}")
            return
        if self.store.start_job(job_id, "forward-only route: no pipeline"):
            self.egress.stage(job_id, inputs)

    def _prepare(self, job_id: int) -> tuple[Path, Path]:
        """A fresh ``in/`` of hard links to the job's instances and an empty ``out/``."""
        root = job_dir(self.config, job_id)
        inputs, outputs = root / "in", root / "out"
        for folder in (inputs, outputs):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        for inst in self.store.job_inputs(job_id):
            link = inputs / f"{inst.sop_instance_uid}.dcm"
            try:
                os.link(inst.path, link)
            except OSError:  # another file system: copy instead
                shutil.copy2(inst.path, link)
        return inputs, outputs

    def _start(self, job: Job) -> None:
        """Start the job's pipeline the way its route asks, under its timeout; the command, mode and timeout
        go into the job's ``running`` event."""
        mode = job.execution.mode or ExecutionMode.IN_PROCESS
        executor = self.executors.get(mode)
        if executor is None:
            self.store.fail_job(job.id, f"the route asks for {mode} execution, which this node cannot do "
                                        "(containers.engine is not set)")
            return
        try:
            self._prepare(job.id)
        except OSError as e:
            self.store.fail_job(job.id, f"cannot prepare the job's input: {e}")
            return
        root = job_dir(self.config, job.id)
        try:
            reissue = self.store.report_already_sent(job.id, RunOutput.FHIR_BUNDLE.file)
            launch = executor.launch(JobRun(job.id, job.pipeline, root, reissue=reissue))
            timeout = resolve_timeout(mode, job.pipeline, job.execution.timeout_seconds,
                                      self.config.processing.job_timeout_seconds)
        except (ExecutionError, OSError) as e:
            self.store.fail_job(job.id, f"cannot start {job.pipeline} ({mode}): {e}")
            return
        try:
            launch, digests = with_model_sandbox(self.config, self.config_file, job.pipeline, mode, launch, root)
        except SandboxError as e:
            self.store.fail_job(job.id, str(e))
            return
        command = shlex.join(launch.argv)
        spare = self.warm.claim(job.pipeline, launch.argv, launch.env) if (
            self.warm is not None and mode is ExecutionMode.IN_PROCESS and not job.shadow) else None
        # (a sandboxed job never is warm; nor a shadow one, which runs at a lower CPU priority)
        warm = ", warm process" if spare is not None else ""
        warm += f", shadow run at nice {SHADOW_NICENESS}" if job.shadow else ""
        code = "".join(f"; model {folder} {digest}" for folder, digest in digests.items())
        if not self.store.start_job(job.id, f"{mode}: {command} (timeout {timeout.seconds:g} s, "
                                            f"{timeout.source}{warm}){code}"):
            if spare is not None and self.warm is not None:
                self.warm.give_back(job.pipeline, spare)
            return
        if digests and self.egress.audit is not None:
            self.egress.audit.instances_processed(study_uid=job.study_instance_uid, patient_id=job.patient_id or None,
                                                  job=f"job {job.id}", pipeline=job.pipeline, models=digests)
        try:
            process = start_job_process(launch, root, spare, shadow=job.shadow)
        except OSError as e:
            self.store.fail_job(job.id, f"cannot start the job command: {e}")
            return
        self.running[job.id] = JobProcess(job.id, process, launch, mode, timeout.seconds,
                                          time.monotonic() + timeout.seconds, root / "stderr.log",
                                          attempt=job.runs + 1, oom_kills_before=oom_kills())
        if launch.container:
            self.store.note(job.id, "container", launch.container.started())
        log.debug("job %d running %s%s (pid %d): %s", job.id, mode, warm, process.pid, command)

    def _reap(self, job: JobProcess) -> None:
        status = job.process.poll()
        if status is None:
            if time.monotonic() < job.deadline:
                return
            self._note_container(job.job_id, job.end())
            del self.running[job.job_id]
            mode = "" if job.mode is ExecutionMode.IN_PROCESS else f" ({job.mode})"
            self.store.fail_job(job.job_id, f"timed out after {job.timeout_seconds:g} s{mode}")
            log.warning("job %d timed out", job.job_id)
            return
        del self.running[job.job_id]
        self._note_container(job.job_id, job.finished(status))
        if status != 0:
            reason = failure_reason(status, last_line(job.stderr_path), job.oom_kills_before)
            retries = self.config.processing.retries
            if status < 0 and job.attempt <= retries:  # a signal from outside: transient, run it again
                why = (f"attempt {job.attempt} ended: {reason}; a signal from outside the pipeline is transient: "
                       f"runs again (retry {job.attempt} of {retries})")
                self.store.requeue(job.job_id, why, kind="retry")
                log.warning("job %d %s", job.job_id, why)
                return
            if job.attempt > 1:
                reason += f" (attempt {job.attempt}; every attempt's reason is in the job's events)"
            self.store.fail_job(job.job_id, reason)
            log.debug("job %d failed: %s", job.job_id, reason)
            return
        self._finish(job.job_id, job_dir(self.config, job.job_id) / "out")

    def _finish(self, job_id: int, outputs: Path) -> None:
        """A run that ended well (here or on a worker): its warnings and review decision into the store, its
        results staged for egress; a shadow run's are kept where they are and never staged."""
        manifest = run_manifest(job_id, outputs)
        job = self.store.job(job_id)
        if job is not None and job.shadow:
            files = sorted(p.name for p in outputs.iterdir() if p.is_file()) if outputs.is_dir() else []
            self.store.finish_shadow(job_id, f"{len(files)} outputs in {outputs}")
            return
        if manifest is not None and manifest.warnings:  # what the outputs did without: the job still ends done
            self.store.record_warnings(job_id, manifest.warnings)
            log.warning("job %d: %s", job_id, "; ".join(manifest.warnings))
        review = manifest.review if manifest is not None else None
        if review is not None:
            self.store.record_review(job_id, review.needs_review, review.reasons)
            if review.needs_review:
                log.debug("job %d flagged for human review: %s", job_id, "; ".join(review.reasons))
        self.egress.stage(job_id, outputs)
        if self.config.feedback.drift.enabled:  # after staging: reading the series' headers never delays delivery
            self._observe_drift(job_id, manifest)

    def _observe_drift(self, job_id: int, manifest: RunManifest | None) -> None:
        """Record the study's input attributes (from the job's input instances in the spool, which the run just
        read; a worker's copy is gone by now) and its outputs for drift monitoring; a study that cannot be measured
        is logged, never failed for it."""
        from radnode.feedback.drift import input_attributes, output_attributes

        job = self.store.job(job_id)
        if job is None or not job.pipeline:
            return
        try:
            inputs = input_attributes(Path(inst.path) for inst in self.store.job_inputs(job_id))
        except Exception as e:  # noqa: BLE001 - a pixel decoder's or header's surprise must not stop delivery
            log.warning("job %d: drift attributes of the input not measured: %s", job_id, e)
            inputs = {}
        self.store.record_observation(job_id, job.pipeline, inputs,
                                      output_attributes(manifest) if manifest is not None else {})

    def _note_container(self, job_id: int, message: str | None) -> None:
        if message:
            self.store.note(job_id, "container", message)
            log.debug("job %d: %s", job_id, message)

    def stop(self) -> None:
        """End running jobs (SIGTERM, then SIGKILL) and queue them to run again at the next start (jobs on
        workers run on)."""
        if self.remote is not None:
            self.remote.close()
        for job in self.running.values():
            self._note_container(job.job_id, job.end(grace=STOP_GRACE_SECONDS))
            self.store.requeue(job.job_id, "node stopped while the job was running; it will run again")
        self.running.clear()
        if self.warm is not None:
            self.warm.close()


SHADOW_NICENESS = 10
"""How much lower a shadow run's process is in CPU priority than the node's jobs: a candidate pipeline takes the
cores the production runs leave idle."""


def failure_reason(status: int, last_stderr_line: str, oom_kills_before: int | None = None) -> str:
    """Why a job process ended badly, in one line: for a signal, which one (and "out of memory?" for SIGKILL when
    the node's cgroup counted an OOM kill meanwhile), then its last stderr line; for an exit status, the last
    stderr line (what the pipeline said), else the status."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = "an unknown signal"
        reason = f"killed by signal {-status} ({name})"
        if -status == signal.SIGKILL:
            now = oom_kills()
            if oom_kills_before is not None and now is not None and now > oom_kills_before:
                reason += " — out of memory? (the kernel's OOM killer ended a process of the node's cgroup)"
            elif oom_kills_before is None:
                reason += " — out of memory? (or killed by hand; the cgroup's OOM count is not readable here)"
        return reason + (f"; last stderr line: {last_stderr_line}" if last_stderr_line else "")
    return last_stderr_line or f"job process exited with status {status}"


def oom_kills(proc_self_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """How many processes the kernel's OOM killer ended in this process's cgroup (v2 ``memory.events``
    ``oom_kill``), None where that is not readable."""
    try:
        lines = proc_self_cgroup.read_text().splitlines()
        path = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
        events = (root / path.lstrip("/") / "memory.events").read_text()
    except (OSError, StopIteration, IndexError):
        return None
    for line in events.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return None


def with_model_sandbox(config: Config, config_file: Path, pipeline: str, mode: ExecutionMode, launch: Launch,
                       root: Path) -> tuple[Launch, dict[str, str]]:
    """The launch with the pipeline's ``processing.models`` folders run sandboxed (a model folder is code; a
    container is its own sandbox), and each folder's content digest for the job's event; SandboxError when the
    sandbox cannot be made."""
    models = [Path(m) for m in config.processing.models.get(pipeline, ())]
    digests = {str(m): content_hash(m) for m in models}
    if models and mode is not ExecutionMode.CONTAINER:
        argv, env = sandbox_job(config, launch.argv, launch.env, root, config_file, models)
        launch = Launch(argv, env, launch.cwd)
    return launch, digests


def start_job_process(launch: Launch, root: Path, spare: subprocess.Popen | None, shadow: bool) -> subprocess.Popen:
    """The job's process, its output in ``root``: the claimed warm ``spare`` handed the job, else a fresh one (a
    shadow run's at :data:`SHADOW_NICENESS`); OSError when it cannot start."""
    if spare is not None:
        WarmPool.hand(spare, launch.argv, launch.env, launch.cwd, root / "stdout.log", root / "stderr.log")
        return spare
    return spawn(launch, root, niceness=SHADOW_NICENESS if shadow else 0)


def spawn(launch: Launch, root: Path, niceness: int = 0) -> subprocess.Popen:
    """Start a launch as its own process group (killed with the thread that starts it), its output in
    ``root/stdout.log`` and ``root/stderr.log``, ``niceness`` lower in CPU priority; OSError when it cannot
    start."""
    def prepare() -> None:
        die_with_parent()
        if niceness:
            os.nice(niceness)

    with open(root / "stdout.log", "wb") as out, open(root / "stderr.log", "wb") as err:
        return subprocess.Popen(launch.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=launch.cwd,
                                env=launch.env, start_new_session=True, preexec_fn=prepare)


def describe_status(status: int) -> str:
    """A job process's exit status in words."""
    if status < 0:
        return f"job process killed by {signal.Signals(-status).name}"
    return f"job process exited with status {status}"


def kill_group(process: subprocess.Popen, grace: float = 0.0) -> None:
    """Terminate the job's whole process group: SIGTERM and a grace period when given, then SIGKILL."""
    try:
        if grace:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(grace)
                return
            except subprocess.TimeoutExpired:
                pass
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
