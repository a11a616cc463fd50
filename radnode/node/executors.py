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
    ``docker run`` / ``podman run`` of the app's MAP image, input mounted read-only and output writable
    at the MAP's paths, the same variables, as the node's user, with the MAP's resource requests
    (``pkg.json#resources``) as limits; ``processing.models`` folders of the pipeline are mounted read-only
    at ``/var/holoscan/models/<name>`` (then ``HOLOSCAN_MODEL_PATH``, over the image's own
    ``/opt/holoscan/models``). Only when ``processing.container_engine`` names an engine.

A pipeline with ``processing.models`` gets its model folder(s) in every mode: in-process as
``HOLOSCAN_MODEL_PATH`` in the job command's environment (the folder; for an ensemble a folder of links).

Resource requests outside a container: ``resources.cpu`` sets the thread pools (``OMP_NUM_THREADS``,
which torch's intra-op pool follows, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``) so the app uses about
that many cores. Memory and GPU requests are not enforced: an address-space limit (``RLIMIT_AS``) kills
torch, which reserves far more virtual memory than it uses, and hiding GPUs would make the outputs
differ from in-process runs. Use container execution to enforce them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from radnode.config import CONFIG_ENV, Config, ConfigError
from radnode.execution import PIPELINE_ENV, REISSUE_ENV
from radnode.map import APP_METADATA_FILE, INPUT_DIR, MODELS_DIR, OUTPUT_DIR, WORK_DIR, AppMetadata, MapError, \
    app_folder, app_manifest, model_names
from radnode.pipelines.registry import UnknownPipelineError, get_pipeline, registered_pipelines
from radnode.pipelines.routing import ExecutionMode

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
"""Thread-pool sizes set from ``resources.cpu`` (torch's intra-op pool follows ``OMP_NUM_THREADS``)."""
CONTAINER_CONFIG_PATH = f"{WORK_DIR}/radnode-config.yaml"
"""Where the node's configuration is mounted in a MAP container (the apps read it via $RADNODE_CONFIG)."""
SITE_MODELS_DIR = f"{WORK_DIR}/models"
"""Where ``processing.models`` folders are mounted in a MAP container (its ``HOLOSCAN_MODEL_PATH`` then)."""


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
    stop_argv: list[str] | None = None
    """Run after the process group is killed: what killing the command alone does not end (a container)."""


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


class ContainerExecutor:
    """``ENGINE run`` of the app's MAP image with the MAP's paths, variables and resources."""

    def __init__(self, engine: str, images: Mapping[str, str], config_file: Path, env: Mapping[str, str],
                 models: Mapping[str, Sequence[Path]] | None = None) -> None:
        """``engine``: ``docker`` or ``podman``; ``images``: pipeline → image (default ``radnode-<app>``, the built-in app it runs);
        ``config_file`` is mounted for the app; ``env`` is the engine client's own environment; ``models``
        (``processing.models``): a pipeline's model folder(s), mounted read-only under ``SITE_MODELS_DIR``,
        which is then the run's ``HOLOSCAN_MODEL_PATH`` instead of the image's ``/opt/holoscan/models``."""
        self.engine, self.images, self.config_file, self.env = engine, dict(images), config_file, dict(env)
        self.models = dict(models or {})

    def launch(self, run: JobRun) -> Launch:
        meta = map_metadata(run.pipeline)
        resources = meta.resources if meta else {}
        name = f"radnode-job-{run.job_id}-{uuid.uuid4().hex[:8]}"
        input_path, output_path = f"{WORK_DIR}/{INPUT_DIR}".rstrip("/"), f"{WORK_DIR}/{OUTPUT_DIR}".rstrip("/")
        site_models = self.models.get(run.pipeline) or []
        model_path = SITE_MODELS_DIR if site_models else MODELS_DIR
        variables = {"HOLOSCAN_INPUT_PATH": input_path, "HOLOSCAN_OUTPUT_PATH": output_path,
                     "HOLOSCAN_WORKDIR": WORK_DIR, "HOLOSCAN_MODEL_PATH": model_path,
                     CONFIG_ENV: CONTAINER_CONFIG_PATH, PIPELINE_ENV: run.pipeline, **thread_environment(resources),
                     **run.variables}
        argv = [self.engine, "run", "--rm", "--name", name, "--user", f"{os.getuid()}:{os.getgid()}"]
        for flag, key in (("--cpus", "cpu"), ("--memory", "memory"), ("--shm-size", "sharedMemory")):
            if resources.get(key):
                argv += [flag, str(resources[key])]
        if resources.get("gpu"):
            argv += ["--gpus", str(resources["gpu"])]
        argv += ["-v", f"{run.inputs}:{input_path}:ro", "-v", f"{run.outputs}:{output_path}",
                 "-v", f"{self.config_file}:{CONTAINER_CONFIG_PATH}:ro"]
        for name, model in model_names(site_models):
            argv += ["-v", f"{model}:{SITE_MODELS_DIR}/{name}:ro"]
        for key, value in variables.items():
            argv += ["-e", f"{key}={value}"]
        argv.append(self.images.get(run.pipeline, f"radnode-{meta.name if meta else run.pipeline}"))
        return Launch(argv, self.env, run.root, stop_argv=[self.engine, "rm", "--force", name])


def execution_modes(config: Config) -> tuple[ExecutionMode, ...]:
    """The modes this node can run: in-process and subprocess always, container with an engine configured."""
    optional = (ExecutionMode.CONTAINER,) if config.processing.container_engine else ()
    return ExecutionMode.IN_PROCESS, ExecutionMode.SUBPROCESS, *optional


def executors(config: Config, job_command: Sequence[str], config_file: Path) -> dict[ExecutionMode, Executor]:
    """The executors this node has: in-process and subprocess always, container with an engine configured."""
    env = {**os.environ, CONFIG_ENV: str(config_file)}
    models = config.processing.models
    available: dict[ExecutionMode, Executor] = {
        ExecutionMode.IN_PROCESS: InProcessExecutor(job_command, env, models),
        ExecutionMode.SUBPROCESS: SubprocessExecutor(env, models),
    }
    engine = config.processing.container_engine
    if engine:
        available[ExecutionMode.CONTAINER] = ContainerExecutor(engine, config.processing.map_images, config_file,
                                                               dict(os.environ), models)
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
