"""How a job's pipeline application runs: one contract, three executors, chosen per route.

Whatever the executor, the scheduler (``worker.py``) starts the command it builds as the job's own
process group, with the same input (``jobs/<id>/in``: the study's instances), the same outputs
(``jobs/<id>/out``: result files and ``manifest.json``), the same hard timeout (the group is killed) and
the same failure reporting (the last stderr line). Only the command differs:

``in-process``
    The node's job command, ``python -m radnode run IN --output OUT --pipeline NAME``: radnode's own
    runner (``radnode.execution.run_app``) imports the app's Application class and runs it inside that
    job process. "In-process" means in radnode's runner, not as the app's MAP command; the node itself
    never runs an app in its own process. The node's default.
``subprocess``
    The app's MAP command (``app.json#command``, ``python -m radnode.apps.<app>``; for a site pipeline
    ``python -m <its package>``) with the variables a MAP host sets: ``HOLOSCAN_INPUT_PATH``,
    ``HOLOSCAN_OUTPUT_PATH``, ``HOLOSCAN_WORKDIR`` (``jobs/<id>/work``, also the working directory) and
    ``HOLOSCAN_MODEL_PATH`` (``work/models``: a link per model of the app, or per folder the node's
    ``processing.models`` gives the pipeline). It runs on the node's Python.
``container``
    ``podman run`` / ``docker run`` of the app's MAP image (``radnode map build APP --image``), as the MAP
    contract has it: input mounted read-only at ``HOLOSCAN_INPUT_PATH``, output writable at
    ``HOLOSCAN_OUTPUT_PATH``, the job's ``work/`` writable at ``HOLOSCAN_WORKDIR``, model folders read-only
    (``processing.models`` of the pipeline at ``/var/holoscan/models/<name>``, then ``HOLOSCAN_MODEL_PATH``,
    over the image's own ``/opt/holoscan/models``). Locked down, whatever the site adds to
    ``containers.run_options``: no network (``--network none``), a read-only root file system with a small
    tmpfs at ``/tmp``, every capability dropped, ``no-new-privileges``, a non-root user, a process limit, the
    MAP's CPU, memory (no swap beyond it) and shared-memory requests as limits, and GPUs only as the CDI
    devices (``--device nvidia.com/gpu=N``) an app that requests them gets. The container is named
    ``radnode-job-<id>-…`` and labelled with the node and job; the job's events name the image (by ID: what
    ran is what was checked) and its exit status; it is stopped and removed when the job times out, is
    restarted or the node stops, and leftovers of a crash are removed when the node starts. How the engine
    is called (command, global flags, environment) is the ``containers:`` configuration; only when
    ``containers.engine`` names one.

A pipeline with ``processing.models`` gets its model folder(s) in every mode: in-process as
``HOLOSCAN_MODEL_PATH`` in the job command's environment (the folder; for an ensemble a folder of links).

Resource requests outside a container: ``resources.cpu`` sets the thread pools (``OMP_NUM_THREADS``,
which torch's intra-op pool follows, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``) so the app uses about
that many cores. Memory and GPU requests are not enforced: an address-space limit (``RLIMIT_AS``) kills
torch, which reserves far more virtual memory than it uses, and hiding GPUs would make the outputs
differ from in-process runs. Use container execution to enforce them.
"""

from __future__ import annotations

import hashlib
import logging
import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from radnode.config import CONFIG_ENV, Config, ConfigError, ContainerLimits, ContainersConfig
from radnode.container_engine import Engine, EngineError, cdi_gpu_devices, quantity_bytes
from radnode.execution import PIPELINE_ENV, REISSUE_ENV
from radnode.map import APP_METADATA_FILE, INPUT_DIR, MODELS_DIR, OUTPUT_DIR, WORK_DIR, AppMetadata, MapError, \
    app_folder, app_manifest, model_names
from radnode.pipelines.registry import UnknownPipelineError, get_pipeline, registered_pipelines
from radnode.pipelines.routing import ExecutionMode

if TYPE_CHECKING:
    from radnode.pipelines.rules import RuleSet

log = logging.getLogger(__name__)

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
"""Thread-pool sizes set from ``resources.cpu`` (torch's intra-op pool follows ``OMP_NUM_THREADS``)."""
CONTAINER_CONFIG_PATH = f"{WORK_DIR}/radnode-config.yaml"
"""Where the node's configuration is mounted in a MAP container (the apps read it via $RADNODE_CONFIG)."""
SITE_MODELS_DIR = f"{WORK_DIR}/models"
"""Where ``processing.models`` folders are mounted in a MAP container (its ``HOLOSCAN_MODEL_PATH`` then)."""
CONTAINER_WORK_DIR = f"{WORK_DIR}/work"
"""The job's ``work/`` folder in a MAP container: its ``HOLOSCAN_WORKDIR`` and working directory (the image's
``/var/holoscan`` is read-only like the rest of its root)."""
SCRATCH_DIR = "/tmp"
"""The container's only writable path of its own (a tmpfs of ``containers.scratch_size``); also ``$HOME``."""
MAP_UID = 1000
"""The UID (and GID) of the MAP image's user ``holoscan`` (the Containerfile's default)."""
NODE_LABEL, JOB_LABEL = "org.radnode.node", "org.radnode.job"
JOB_CONFIG_FILE = "container-config.yaml"
"""The job's own copy of the node's configuration (in the job folder), mounted read-only for its container."""


class ExecutionError(ValueError):
    """A job that cannot be started the way its route asks; the message is the job's failure reason."""


@dataclass(frozen=True)
class JobRun:
    """One run of a job, as an executor sees it: the pipeline and the job's folders."""

    job_id: int
    pipeline: str
    root: Path
    """``data_dir/jobs/<job_id>``; ``in/`` and ``out/`` are ready, the rest belongs to the run."""
    reissue: bool = False
    """A report of this study and pipeline already went out: this run's replaces it (FHIR status ``corrected``)."""

    @property
    def variables(self) -> dict[str, str]:
        """What the run's app reads about the run from its environment besides the MAP's paths."""
        return {REISSUE_ENV: "1"} if self.reissue else {}

    @property
    def inputs(self) -> Path:
        return self.root / "in"

    @property
    def outputs(self) -> Path:
        return self.root / "out"


@dataclass(frozen=True)
class Launch:
    """What to start for a run: argv, full environment and working directory."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    container: "ContainerHandle | None" = None
    """The container the command runs, which killing the command alone does not end; None outside one."""


@dataclass(frozen=True)
class Timeout:
    """A run's hard time limit and where it came from, for the job's event log."""

    seconds: float
    source: str


class Executor(Protocol):
    """Builds the command that runs one pipeline application on one job's folders."""

    def launch(self, run: JobRun) -> Launch: ...


def map_metadata(pipeline: str) -> AppMetadata | None:
    """The MAP metadata (``apps/<app>/app.yaml``) of the built-in app a pipeline runs (a site name registered
    on a built-in app's class, e.g. one per model on model_seg, shares that app's MAP); None for a site's own
    application or an unknown name."""
    try:
        app = get_pipeline(pipeline).built_in_app
    except UnknownPipelineError:
        return None
    if app is None or not (app_folder(app) / APP_METADATA_FILE).is_file():
        return None
    try:
        return AppMetadata.load(app)
    except MapError as e:
        raise ExecutionError(str(e)) from None


def resolve_timeout(mode: ExecutionMode, pipeline: str, route_seconds: float | None, node_seconds: float) -> Timeout:
    """The route's timeout; else, when the app runs as its MAP (subprocess, container), the MAP's own
    ``timeout``; else the node's ``processing.job_timeout_seconds``."""
    if route_seconds is not None:
        return Timeout(route_seconds, "route")
    if mode is not ExecutionMode.IN_PROCESS:
        meta = map_metadata(pipeline)
        if meta is not None and meta.timeout:
            return Timeout(float(meta.timeout), "MAP app.json")
    return Timeout(node_seconds, "processing.job_timeout_seconds")


def map_command(pipeline: str) -> list[str]:
    """The app's MAP command as argv (``app.json#command``; ``python3 -m PACKAGE`` for a site pipeline), its
    ``python3`` replaced by this interpreter, which has radnode and the apps installed."""
    meta = map_metadata(pipeline)
    if meta is not None:
        argv = json.loads(app_manifest(meta)["command"])
    else:
        try:
            argv = ["python3", "-m", get_pipeline(pipeline).map_module]
        except UnknownPipelineError as e:
            raise ExecutionError(str(e)) from None
    return [sys.executable, *argv[1:]]


def thread_environment(resources: Mapping[str, object]) -> dict[str, str]:
    """``OMP_NUM_THREADS`` and friends from ``resources.cpu`` (rounded up, at least 1); none without it."""
    cpu = resources.get("cpu")
    if not isinstance(cpu, (int, float)) or cpu <= 0:
        return {}
    return dict.fromkeys(THREAD_VARIABLES, str(max(1, math.ceil(cpu))))


def link_models(folder: Path, models: Sequence[Path]) -> Path:
    """``folder``, made afresh, with a link per model folder (a MAP's models layout, which the app reads as an
    ensemble when it holds several)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, model in model_names(models):
        (folder / name).symlink_to(model)
    return folder


class InProcessExecutor:
    """The node's job command: radnode's runner runs the app in the job process (see the module docstring)."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str],
                 models: Mapping[str, Sequence[Path]] | None = None) -> None:
        """``command`` is called as ``COMMAND INPUT_DIR --output OUT_DIR --pipeline NAME``; ``models``
        (``processing.models``): the model folder(s) of a pipeline, given to its run as ``HOLOSCAN_MODEL_PATH``
        (the folder, or ``jobs/<id>/models`` with a link to each of an ensemble's)."""
        self.command, self.env, self.models = list(command), dict(env), dict(models or {})

    def launch(self, run: JobRun) -> Launch:
        argv = [*self.command, str(run.inputs), "--output", str(run.outputs), "--pipeline", run.pipeline]
        env = {**self.env, **run.variables}
        models = self.models.get(run.pipeline)
        if models:
            path = Path(models[0]).resolve() if len(models) == 1 else link_models(run.root / "models", models)
            env = {**env, "HOLOSCAN_MODEL_PATH": str(path)}
        return Launch(argv, env, run.root)


class SubprocessExecutor:
    """The app's MAP command on the node's Python, with the MAP environment (see the module docstring)."""

    def __init__(self, env: Mapping[str, str], models: Mapping[str, Sequence[Path]] | None = None) -> None:
        """``models`` (``processing.models``): a pipeline's model folder(s), linked in ``HOLOSCAN_MODEL_PATH``
        instead of the app's own."""
        self.env, self.models = dict(env), dict(models or {})

    def launch(self, run: JobRun) -> Launch:
        meta = map_metadata(run.pipeline)
        work = run.root / "work"
        shutil.rmtree(work, ignore_errors=True)  # fresh for every run, as a MAP container's is
        models = work / "models"
        models.mkdir(parents=True)
        if self.models.get(run.pipeline):
            link_models(models, self.models[run.pipeline])
        else:
            for name, rel in (meta.models if meta else {}).items():
                (models / name).symlink_to((app_folder(meta.name) / rel).resolve())  # type: ignore[union-attr]
        env = {**self.env, **thread_environment(meta.resources if meta else {}),
               "HOLOSCAN_INPUT_PATH": str(run.inputs), "HOLOSCAN_OUTPUT_PATH": str(run.outputs),
               "HOLOSCAN_WORKDIR": str(work), "HOLOSCAN_MODEL_PATH": str(models), PIPELINE_ENV: run.pipeline,
               **run.variables}
        return Launch(map_command(run.pipeline), env, work)


def hand_over(run: JobRun, work: Path, config_copy: Path, uid: int, gid: int) -> None:
    """Give a root node's job to the non-root user its container runs as: the node's files are owner-only
    (umask 077), so ``out/`` and ``work/`` become that user's, and so do the job's copy of the configuration and
    its inputs, each replaced by a read-only copy of its own: ``in/`` holds hard links to the spool's files,
    which stay the node's."""
    for folder in (run.outputs, work):
        os.chown(folder, uid, gid)
    os.chown(config_copy, uid, gid)
    os.chmod(config_copy, 0o400)
    if not run.inputs.is_dir():
        return
    for entry in run.inputs.iterdir():
        if entry.is_file() and entry.stat().st_uid != uid:
            copy = entry.with_name(f".{entry.name}.copy")
            shutil.copyfile(entry, copy)
            os.chown(copy, uid, gid)
            os.chmod(copy, 0o400)
            os.replace(copy, entry)
    os.chown(run.inputs, uid, gid)
    os.chmod(run.inputs, 0o500)


class ContainerHandle:
    """A job's container: named at launch, reported in the job's events, stopped and removed at the end."""

    def __init__(self, engine: Engine, name: str, image: str, image_id: str) -> None:
        self.engine, self.name, self.image, self.image_id = engine, name, image, image_id

    def started(self) -> str:
        """The ``container`` event at start: which image (by ID, what ran is auditable) in which container."""
        return f"image {self.image} ({self.image_id}) in container {self.name}"

    def finished(self, status: int) -> str:
        """After the engine client returned: the container's exit status (and an OOM kill), then it is removed."""
        try:
            state = self.engine.run("inspect", "--format", "{{.State.ExitCode}} {{.State.OOMKilled}}", self.name,
                                    check=False)
            words = state.stdout.split() if state.returncode == 0 else []
        except EngineError:  # the engine's own trouble never stops the scheduler; the client's status stands
            words = []
        exit_code = int(words[0]) if words and words[0].lstrip("-").isdigit() else status
        oom = len(words) > 1 and words[1] == "true"
        removed = self._remove()
        return (f"container {self.name} exited with status {exit_code}"
                f"{' (killed at its memory limit)' if oom else ''}; {removed}")

    def stop(self, grace: float = 0.0) -> str:
        """Stop it (SIGTERM, SIGKILL after ``grace`` seconds) and remove it: on timeout, restart or node stop."""
        try:
            self.engine.run("stop", "--time", str(math.ceil(grace)), self.name, timeout=grace + 60, check=False)
        except EngineError as e:
            log.warning("container %s: %s", self.name, e)  # rm --force below stops it as well
        return f"container {self.name} stopped; {self._remove()}"

    def _remove(self) -> str:
        try:
            gone = self.engine.remove(self.name)
        except EngineError as e:
            return f"removing it failed: {e}"
        return "removed" if gone else "still present after rm --force"


class ContainerExecutor:
    """The app's MAP image run by the engine, locked down (see the module docstring)."""

    def __init__(self, engine: Engine, containers: ContainersConfig, config_file: Path,
                 models: Mapping[str, Sequence[Path]] | None = None, node_label: str = "radnode") -> None:
        """``containers``: images, limits, user, GPUs and site flags; ``config_file`` is mounted for the app;
        ``models`` (``processing.models``): a pipeline's model folder(s), mounted read-only under
        ``SITE_MODELS_DIR`` (then its ``HOLOSCAN_MODEL_PATH`` instead of the image's ``/opt/holoscan/models``);
        ``node_label`` marks this node's containers (``org.radnode.node``) so a restart removes its leftovers."""
        self.engine, self.containers, self.config_file = engine, containers, config_file
        self.models, self.node_label = dict(models or {}), node_label
        self._gpus: list[str] | None = None

    def image(self, pipeline: str) -> str:
        """The pipeline's image: ``containers.images``, else ``radnode-<app>:<version>`` as map build tags it."""
        if pipeline in self.containers.images:
            return self.containers.images[pipeline]
        meta = map_metadata(pipeline)
        return f"radnode-{meta.name}:{meta.version}" if meta else f"radnode-{pipeline}"

    def limits(self, pipeline: str) -> ContainerLimits:
        """The MAP's resource requests (``pkg.json#resources``), or ``containers.default_limits`` for an image
        without MAP metadata here, with ``containers.limits[pipeline]`` over them."""
        meta = map_metadata(pipeline)
        if meta is not None:
            r = meta.resources
            base = ContainerLimits(cpu=r.get("cpu") or None, memory=r.get("memory"),
                                   shared_memory=r.get("sharedMemory"), gpu=int(r.get("gpu") or 0))
            defaults = self.containers.default_limits
            base = base.model_copy(update={k: getattr(defaults, k) for k in ("cpu", "memory", "shared_memory")
                                           if getattr(base, k) is None})
        else:
            base = self.containers.default_limits
        override = self.containers.limits.get(pipeline)
        return base.model_copy(update=override.model_dump(exclude_none=True)) if override else base

    def gpu_devices(self, count: int) -> list[str]:
        """``count`` CDI devices for an app that asks for GPUs: from ``containers.gpus`` or the host's CDI specs;
        fewer (none) when the worker has fewer, and the app then runs on what it has, as it does in-process."""
        if count <= 0 or self.containers.gpus == "none":
            return []
        if isinstance(self.containers.gpus, list):
            return self.containers.gpus[:count]
        if self._gpus is None:
            self._gpus = cdi_gpu_devices()
        return self._gpus[:count]

    def user(self) -> tuple[int, int]:
        """The UID:GID the app runs as: ``containers.user``, the node's own, or the MAP user's when the node is root."""
        if self.containers.user:
            uid, _, gid = self.containers.user.partition(":")
            return int(uid), int(gid or uid)
        if os.getuid() != 0:
            return os.getuid(), os.getgid()
        return MAP_UID, MAP_UID

    def launch(self, run: JobRun) -> Launch:
        """The run of the pipeline's image, by the ID the engine has for it now (ExecutionError without one)."""
        image = self.image(run.pipeline)
        try:
            image_id = self.engine.image_id(image)
        except EngineError as e:
            raise ExecutionError(str(e)) from None
        if image_id is None:
            meta = map_metadata(run.pipeline)
            hint = f"; build it with: radnode map build {meta.name} --output DIR --image" if meta else ""
            raise ExecutionError(f"no image {image} in {self.engine.argv[0]}'s store{hint}")
        return self.command(run, image, image_id)

    def command(self, run: JobRun, image: str, image_id: str) -> Launch:
        """The locked-down ``run`` of ``image_id`` (``image`` is its name, for the events) on the job's folders;
        prepares the job's fresh ``work/`` and its copy of the configuration, and hands them to the app's user
        (:meth:`hand_over`)."""
        limits = self.limits(run.pipeline)
        uid, gid = self.user()
        work = run.root / "work"
        shutil.rmtree(work, ignore_errors=True)  # fresh for every run
        work.mkdir(parents=True)
        config_copy = run.root / JOB_CONFIG_FILE
        config_copy.unlink(missing_ok=True)
        shutil.copyfile(self.config_file, config_copy)
        if os.getuid() == 0 and uid != 0:
            hand_over(run, work, config_copy, uid, gid)
        name = f"radnode-job-{run.job_id}-{uuid.uuid4().hex[:8]}"
        input_path, output_path = f"{WORK_DIR}/{INPUT_DIR}".rstrip("/"), f"{WORK_DIR}/{OUTPUT_DIR}".rstrip("/")
        site_models = self.models.get(run.pipeline) or []
        model_path = SITE_MODELS_DIR if site_models else MODELS_DIR
        variables = {"HOLOSCAN_INPUT_PATH": input_path, "HOLOSCAN_OUTPUT_PATH": output_path,
                     "HOLOSCAN_WORKDIR": CONTAINER_WORK_DIR, "HOLOSCAN_MODEL_PATH": model_path,
                     "HOLOSCAN_LOGS_PATH": f"{CONTAINER_WORK_DIR}/logs", "HOME": SCRATCH_DIR,
                     CONFIG_ENV: CONTAINER_CONFIG_PATH, PIPELINE_ENV: run.pipeline,
                     **thread_environment({"cpu": limits.cpu} if limits.cpu else {}), **run.variables}
        c = self.containers
        argv = self.engine.command("run", "--name", name, "--label", f"{NODE_LABEL}={self.node_label}",
                                   "--label", f"{JOB_LABEL}={run.job_id}", *c.run_options)
        # The lock-down: after the site's options, so none of them can undo it.
        argv += ["--network", "none", "--read-only", *(["--read-only-tmpfs=false"] if self.engine.kind == "podman"
                                                         else []),
                 "--tmpfs", f"{SCRATCH_DIR}:rw,nosuid,nodev,noexec,size={quantity_bytes(c.scratch_size)},mode=1777",
                 "--cap-drop", "all", "--security-opt", "no-new-privileges", "--user", f"{uid}:{gid}",
                 "--pids-limit", str(c.pids_limit), "--stop-timeout", str(c.stop_timeout_seconds)]
        if limits.cpu:
            argv += ["--cpus", f"{limits.cpu:g}"]
        if limits.memory:
            memory = str(quantity_bytes(limits.memory))
            argv += ["--memory", memory, "--memory-swap", memory]
        if limits.shared_memory:
            argv += ["--shm-size", str(quantity_bytes(limits.shared_memory))]
        for device in self.gpu_devices(limits.gpu or 0):
            argv += ["--device", device]
        argv += ["-v", f"{run.inputs}:{input_path}:ro", "-v", f"{run.outputs}:{output_path}:rw",
                 "-v", f"{work}:{CONTAINER_WORK_DIR}:rw", "-v", f"{config_copy}:{CONTAINER_CONFIG_PATH}:ro",
                 "--workdir", CONTAINER_WORK_DIR]
        for model_name, model in model_names(site_models):
            argv += ["-v", f"{model}:{SITE_MODELS_DIR}/{model_name}:ro"]
        for key, value in variables.items():
            argv += ["-e", f"{key}={value}"]
        argv.append(image_id)  # the ID checked above: a re-tag while the job starts cannot swap what runs
        return Launch(argv, self.engine.env, run.root, container=ContainerHandle(self.engine, name, image, image_id))

    def remove_leftovers(self) -> list[str]:
        """Remove this node's containers left by a crash (their jobs are re-run); returns their names."""
        try:
            names = self.engine.containers_labelled(f"{NODE_LABEL}={self.node_label}")
            for name in names:
                self.engine.remove(name)
        except EngineError as e:
            log.warning("could not look for containers left by an earlier run: %s", e)
            return []
        return names


def execution_modes(config: Config) -> tuple[ExecutionMode, ...]:
    """The modes this node can run: in-process and subprocess always, container with an engine configured."""
    optional = (ExecutionMode.CONTAINER,) if config.containers.engine else ()
    return ExecutionMode.IN_PROCESS, ExecutionMode.SUBPROCESS, *optional


def configured_rules(config: Config) -> "RuleSet":
    """The configured rule file (unset: the shipped ``pipelines/default_rules.yaml``), checked against the
    known pipelines (built-in and site), the configured destinations and the execution modes this node has
    (container only with an engine configured); RuleError on the first mistake."""
    from radnode.pipelines.rules import DEFAULT_RULES, load_rules

    return load_rules(config.rules or DEFAULT_RULES, known_pipelines=registered_pipelines().keys(),
                      known_destinations=config.egress.destinations.keys(), execution_modes=execution_modes(config))


def node_label(config: Config) -> str:
    """What marks this node's containers: a digest of its data folder (two nodes may share one engine)."""
    return hashlib.sha256(str(config.data_dir.resolve()).encode()).hexdigest()[:16]


def executors(config: Config, job_command: Sequence[str], config_file: Path) -> dict[ExecutionMode, Executor]:
    """The executors this node has: in-process and subprocess always, container with an engine configured
    (ConfigError when that engine is not installed)."""
    env = {**os.environ, CONFIG_ENV: str(config_file)}
    models = config.processing.models
    available: dict[ExecutionMode, Executor] = {
        ExecutionMode.IN_PROCESS: InProcessExecutor(job_command, env, models),
        ExecutionMode.SUBPROCESS: SubprocessExecutor(env, models),
    }
    if config.containers.engine:
        try:
            engine = Engine.from_config(config.containers)
        except EngineError as e:
            raise ConfigError(f"containers.engine: {e}") from None
        available[ExecutionMode.CONTAINER] = ContainerExecutor(engine, config.containers, config_file, models,
                                                               node_label(config))
    return available


def check_models(config: Config) -> None:
    """``processing.models`` against this node: every name a registered pipeline that runs a model folder
    (built-in or ``$RADNODE_PIPELINES``), every folder present; ConfigError naming the key otherwise. (The
    job loads and probes the model when it starts; ``radnode models check DIR`` does the same beforehand.)"""
    known = registered_pipelines()
    for name, folders in config.processing.models.items():
        key = f"processing.models.{name}"
        if name not in known:
            raise ConfigError(f"{key}: unknown pipeline {name!r} (known: {', '.join(sorted(known))})")
        if not known[name].takes_model:
            takers = sorted(n for n, spec in known.items() if spec.takes_model)
            raise ConfigError(f"{key}: pipeline {name!r} runs no model folder of yours (those that do: "
                              f"{', '.join(takers)})")
        for folder in folders:
            if not Path(folder).is_dir():
                raise ConfigError(f"{key}: {folder}: not a folder")
