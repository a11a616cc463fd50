"""Running one pipeline application on a folder: in-process, with the MAP input/output contract.

``radnode run``, the node's per-job subprocess and each app's ``__main__`` (the MAP command) all come
through here, so the three give the same outputs: the result files plus ``manifest.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import pydicom

from radnode.outputs.layout import OutputFormat, OutputLayoutError, RunOutput, layout_problems, output_named

log = logging.getLogger(__name__)

MANIFEST_FILE = RunOutput.MANIFEST.file
HOLOSCAN_STACK_BYTES = 32 * 1024 * 1024


def timed_phase(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for an operator's ``compute``: its wall time and peak resident memory go into phase ``name`` of
    the operator's run (:func:`run_state` of its application), which the manifest reports as ``phases[name]``."""
    def decorate(compute: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(compute)
        def timed(operator: Any, *args: Any, **kwargs: Any) -> Any:
            state = run_state(operator.fragment)
            state.begin_phase(name)
            started, cpu_started = time.perf_counter(), time.process_time()
            try:
                return compute(operator, *args, **kwargs)
            finally:
                state.end_phase(name, time.perf_counter() - started, time.process_time() - cpu_started)
        return timed
    return decorate


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_rss_bytes() -> int:
    """This process's resident high-water mark (``VmHWM``, which :func:`reset_peak_rss` lowers to the present
    resident size); ``ru_maxrss`` where there is no /proc."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Lower the resident high-water mark to the present resident size (Linux ``clear_refs`` 5), so the next
    :func:`peak_rss_bytes` is the peak since now; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def prepare_holoscan_process() -> None:
    """Quiet Holoscan's per-run info logging and raise the stack limit it asks for (32 MB), where allowed."""
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft != resource.RLIM_INFINITY and soft < HOLOSCAN_STACK_BYTES:
        target = HOLOSCAN_STACK_BYTES if hard == resource.RLIM_INFINITY else min(HOLOSCAN_STACK_BYTES, hard)
        resource.setrlimit(resource.RLIMIT_STACK, (target, hard))


@dataclass
class OutputFile:
    """One file a run wrote, with what a router needs to know about it."""

    file: str
    kind: str
    """Its :class:`radnode.outputs.layout.OutputFormat`: ``dicom``, ``fhir`` or ``document`` (report text, PDF)."""
    sop_class: str | None = None
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    modality: str | None = None


@dataclass
class ReviewDecision:
    """A study-level review decision from the run's segmentation uncertainty (as the DiagnosticReport states it)."""

    needs_review: bool
    reasons: list[str]
    """One sentence per score past its limit, e.g. ``lesion: mean uncertainty 0.471 > 0.2``."""
    exceeded: list[dict[str, Any]]
    """Each score past its limit: ``structure``, ``score`` (mean, boundary, agreement), ``code`` (its SR/FHIR
    concept), ``value``, ``limit`` (the setting, e.g. ``max_mean``) and ``threshold``."""
    thresholds: dict[str, float]
    """The limits the run applied (the ``uncertainty`` settings): max_mean, max_boundary, min_agreement."""
    method: str = ""
    """How the samples were made, e.g. ``TTA (mirrors) x MC dropout (2)``."""
    samples: int = 0


_SCORES = {"UNC-MEAN": ("mean", "max_mean"), "UNC-BOUNDARY": ("boundary", "max_boundary"),
           "UNC-AGREEMENT": ("agreement", "min_agreement")}
"""Uncertainty concept code → (score attribute, limit attribute) (see :mod:`radnode.uncertainty`)."""


def review_decision(report: Any) -> ReviewDecision:
    """The review decision of a :class:`radnode.uncertainty.UncertaintyReport`, with the scores that decided it."""
    limits = report.limits
    exceeded = []
    for segment in report.segments:
        for code in segment.exceeded(limits):
            score, limit = _SCORES[code]
            exceeded.append({"structure": segment.structure_key, "score": score, "code": code,
                             "value": round(float(getattr(segment, score)), 4), "limit": limit,
                             "threshold": float(getattr(limits, limit))})
    return ReviewDecision(needs_review=report.needs_review, reasons=list(report.review_reasons), exceeded=exceeded,
                          thresholds={name: float(getattr(limits, name)) for _, name in _SCORES.values()},
                          method=str(report.method), samples=int(report.n_samples))


@dataclass
class Phase:
    """One named phase of a run (the ``compute`` calls :func:`timed_phase` marks with that name)."""

    seconds: float = 0.0
    """Wall time, summed over the phase's calls."""
    cpu_seconds: float = 0.0
    """CPU time of the whole process (all its threads) during the phase's calls: what the phase costs whatever
    else the machine runs, and, beside ``seconds``, how many cores it kept busy."""
    peak_rss_bytes: int = 0
    """The process's peak resident memory during the phase's calls (what it held when the phase began
    included: the libraries, the data earlier phases kept); where the kernel refuses to lower the high-water
    mark (:func:`reset_peak_rss`), the run's peak so far."""
    started_at: float = 0.0
    """Wall clock (Unix time) when its first call began: the first phase's is when the job began reading."""
    in_child: bool = False
    """It ran in a child process beside the phases after it (:func:`run_in_child`): its wall time overlaps theirs,
    its CPU time and peak memory are the child's."""


@dataclass
class RunState:
    """What the operators of one run record while it runs: time per phase and the review decision.

    It belongs to the run's application object (:func:`run_state`), never to the process, so two runs in one
    process (``radnode run`` twice, a test, a warm worker) each report only their own."""

    phases: dict[str, Phase] = field(default_factory=dict)
    """In the order the phases first ran."""
    review: ReviewDecision | None = None
    """Set by the writer of the DiagnosticReport (:meth:`record_review`); None: not assessed."""
    warnings: list[str] = field(default_factory=list)
    """What the run's outputs had to do without (:meth:`record_warning`), in the order first recorded."""
    peak_outside_phases: int = 0
    """Peak resident memory seen between phases (start-up, imports), for :attr:`peak_rss_bytes`."""
    children: list["ChildPhase"] = field(default_factory=list)
    """Phases running in a child process beside the operators that follow (:func:`run_in_child`), joined by
    :meth:`join_children` before the run's outputs are checked."""

    def begin_phase(self, name: str) -> None:
        """A call of phase ``name`` starts: the high-water mark so far is kept, then lowered to the present, so
        the phase's own peak can be told apart (phases run one after another under Holoscan's default
        greedy scheduler)."""
        self.peak_outside_phases = max(self.peak_outside_phases, peak_rss_bytes())
        reset_peak_rss()
        if name not in self.phases:
            self.phases[name] = Phase(started_at=time.time())

    def end_phase(self, name: str, seconds: float, cpu_seconds: float = 0.0, peak: int | None = None) -> None:
        """A call of phase ``name`` ended after ``seconds`` (``cpu_seconds`` of CPU): its times and peak memory
        (``peak`` when it ran in another process, else this process's) are added to the phase."""
        phase = self.phases.setdefault(name, Phase(started_at=time.time() - seconds))
        phase.seconds += seconds
        phase.cpu_seconds += cpu_seconds
        phase.peak_rss_bytes = max(phase.peak_rss_bytes, peak_rss_bytes() if peak is None else peak)

    def join_children(self) -> None:
        """Wait for the phases running in child processes and record their times; RuntimeError naming the phase
        and why when one failed (its outputs are then missing or incomplete: the run must not end well)."""
        failures = []
        while self.children:
            child = self.children.pop(0)
            if (failure := child.join(self)) is not None:
                failures.append(failure)
        if failures:
            raise RuntimeError("; ".join(failures))

    @property
    def peak_rss_bytes(self) -> int:
        """The process's peak resident memory over the run so far, phases and what lies between them."""
        return max([self.peak_outside_phases, peak_rss_bytes(), *(p.peak_rss_bytes for p in self.phases.values())])

    def record_review(self, result: Any) -> None:
        """Called by the writer of the DiagnosticReport with the result it reports: the result's review decision
        goes into the manifest, so the node's job store holds what the report says. A result without uncertainty
        leaves the review ``None`` (not assessed)."""
        report = getattr(result, "uncertainty", None)
        self.review = None if report is None else review_decision(report)

    def record_warning(self, text: str) -> None:
        """Record something the run's outputs had to do without (an empty Patient ID, a Study Date that is not a
        date, no FHIR identifier system): the results still went out, and the node ends the job ``done`` with
        these warnings instead of failing it."""
        if text not in self.warnings:
            self.warnings.append(text)


@dataclass
class ChildPhase:
    """A phase running in a forked child process (:func:`run_in_child`)."""

    name: str
    pid: int
    report: int
    """The read end of the pipe the child reports its wall time or its error on."""

    def join(self, state: RunState) -> str | None:
        """Wait for the child and record its phase in ``state``; None when it succeeded, else why not."""
        _, status, usage = os.wait4(self.pid, 0)
        with os.fdopen(self.report, "rb") as pipe:
            text = pipe.read().decode(errors="replace")
        try:
            report = json.loads(text) if text else {}
        except ValueError:
            report = {}
        state.end_phase(self.name, float(report.get("seconds", 0.0)), usage.ru_utime + usage.ru_stime,
                        peak=usage.ru_maxrss * 1024)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            return None
        if os.WIFSIGNALED(status):
            return f"{self.name} (child process {self.pid}) was killed by signal {os.WTERMSIG(status)}"
        return f"{self.name} failed: {report.get('error') or f'child process exited with status {status}'}"


def run_in_child(app: Any, name: str, work: Callable[[], None]) -> None:
    """Run ``work`` as phase ``name`` of ``app``'s run in a forked child process, beside the operators that follow,
    so a single-threaded writer (highdicom encoding a SEG's frames) uses another core while this process writes
    the SR and the report. The child shares the data by copy-on-write (nothing is pickled); ``run_app`` joins it
    before the outputs are checked, and a failed child fails the run. Where this process may use one CPU only
    (the job's CPU request, ``OMP_NUM_THREADS``) or cannot fork, ``work`` runs here, as an ordinary phase."""
    from radnode.imaging.slabs import worker_count

    state = run_state(app)
    if worker_count() < 2 or not hasattr(os, "fork"):
        state.begin_phase(name)
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            work()
        finally:
            state.end_phase(name, time.perf_counter() - started, time.process_time() - cpu_started)
        return
    state.begin_phase(name)
    state.phases[name].in_child = True
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: do the work, report, and leave without running the parent's exit handlers
        os.close(read_end)
        started, code = time.perf_counter(), 0
        report: dict[str, Any] = {}
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - everything is reported to the parent, which fails the run
            report["error"], code = f"{type(e).__name__}: {e}", 1
        finally:
            report["seconds"] = time.perf_counter() - started
            try:
                os.write(write_end, json.dumps(report).encode())
            finally:
                os._exit(code)
    os.close(write_end)
    state.children.append(ChildPhase(name, pid, read_end))


def parent_alive(parent_pid: int) -> bool:
    """In a :func:`run_in_child` child: whether the process that forked it still runs (an orphan's output is
    for a run that has ended; it must not land in a folder a re-run has made since)."""
    return os.getppid() == parent_pid


_RUN_STATE = "radnode_run_state"
"""The attribute of an application object that holds its :class:`RunState`."""


def run_state(app: Any) -> RunState:
    """The run state of an application (an operator's ``self.fragment``), created with its first use."""
    state = getattr(app, _RUN_STATE, None)
    if state is None:
        state = RunState()
        setattr(app, _RUN_STATE, state)
    return state


class ManifestError(ValueError):
    """A ``manifest.json`` that is not a radnode run manifest; the message names the file and the first problem."""


REISSUE_ENV = "RADNODE_REISSUE"
"""Set (to any non-empty value) by whoever runs a pipeline again on a study whose result already went out: the
report is then a re-issue (FHIR DiagnosticReport status ``corrected``, updated in place under the same
identifier). ``radnode run --reissue`` sets it, and the node's executors for a job whose study's report it already
delivered (:attr:`radnode.node.executors.JobRun.reissue`)."""


def is_reissue() -> bool:
    """Whether this run re-issues a report already sent for the study (:data:`REISSUE_ENV`)."""
    return bool(os.environ.get(REISSUE_ENV))


@dataclass
class RunManifest:
    """What a pipeline run produced, written as ``manifest.json`` next to the outputs (one reader:
    :meth:`read`)."""

    pipeline: str
    version: str
    input: str
    outputs: list[OutputFile]
    measurements: list[dict[str, Any]]
    seconds: float
    study_instance_uid: str | None = None
    notes: list[str] = field(default_factory=list)
    phases: dict[str, Phase] = field(default_factory=dict)
    """Per operator phase (``load``, ``segment``, ``write_seg``, …), in the order they ran."""
    peak_rss_bytes: int = 0
    """Peak resident memory of the process that ran the app (its whole life, imports included); each phase's
    own peak is in ``phases``."""
    review: ReviewDecision | None = None
    """Whether the study needs human review, from the segmentation uncertainty; None: not assessed (the
    pipeline scores no uncertainty). The node copies it into its job store."""
    warnings: list[str] = field(default_factory=list)
    """What the outputs had to do without (missing or malformed patient data, no FHIR identifier system):
    the results are complete otherwise, so the job ends ``done`` with these warnings."""

    def write(self, folder: Path) -> Path:
        path = folder / MANIFEST_FILE
        tmp = path.with_name(f".{MANIFEST_FILE}.tmp")
        tmp.write_bytes(_MANIFEST_SCHEMA.dump_json(self, indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, folder: Path) -> "RunManifest":
        """The manifest in a run's output folder, validated; FileNotFoundError when there is none, ManifestError
        when it is not a radnode run manifest (e.g. a site command's own file)."""
        path = Path(folder) / MANIFEST_FILE
        text = path.read_bytes()
        try:
            return _MANIFEST_SCHEMA.validate_json(text)
        except pydantic.ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "(top level)"
            raise ManifestError(f"{path}: not a radnode run manifest: {where}: {first['msg']}") from None


_MANIFEST_SCHEMA = pydantic.TypeAdapter(RunManifest)
"""Reads and writes :class:`RunManifest` as JSON, nested records included, with type checks."""


def _describe_outputs(folder: Path) -> tuple[list[OutputFile], list[dict[str, Any]], str | None]:
    """List the files in an output folder by the output layout; measurements are read back from the measurement
    SR so they match it. A known DICOM output with another SOP class or series number than the layout's is
    refused (OutputLayoutError)."""
    from radnode.outputs.sr import read_measurements

    outputs: list[OutputFile] = []
    measurements: list[dict[str, Any]] = []
    study_uid = None
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name == MANIFEST_FILE:
            continue
        known = output_named(path.name)
        kind = known.format if known is not None else (
            OutputFormat.DICOM if path.suffix == ".dcm" else OutputFormat.FHIR if path.suffix == ".json"
            else OutputFormat.DOCUMENT)
        if kind is not OutputFormat.DICOM:
            outputs.append(OutputFile(path.name, kind.value))
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if known is not None and (ds.SOPClassUID, ds.get("SeriesNumber")) != (known.sop_class_uid,
                                                                            known.series_number):
            raise OutputLayoutError(f"{path.name}: SOP class {ds.SOPClassUID}, series {ds.get('SeriesNumber')}; "
                                    f"the output layout has {known.sop_class_uid}, series {known.series_number}")
        study_uid = str(ds.StudyInstanceUID)
        outputs.append(OutputFile(path.name, kind.value, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                  str(ds.SeriesInstanceUID), str(ds.Modality)))
        if known is RunOutput.MEASUREMENT_SR:
            measurements = read_measurements(ds)
    return outputs, measurements, study_uid


def run_app(pipeline_name: str, input_folder: Path, output_folder: Path, models: Sequence[Path] = ()) -> RunManifest:
    """Run the named pipeline's application once, in this process, and write its manifest.

    ``models``: the model folder(s) of a pipeline that runs the site's model (``model_seg``), passed on as
    ``--model``; without them the app reads ``HOLOSCAN_MODEL_PATH``."""
    from radnode.pipelines.registry import get_pipeline

    spec = get_pipeline(pipeline_name)
    if models and not spec.takes_model:
        raise ValueError(f"pipeline {pipeline_name} runs no model folder of yours; --model is for "
                         "model_seg (or a site pipeline running its app)")
    input_folder, output_folder = Path(input_folder).resolve(), Path(output_folder).resolve()
    output_folder.mkdir(parents=True, exist_ok=True)
    prepare_holoscan_process()
    app_cls = spec.load_app_class()
    started = time.monotonic()
    # Holoscan drops argv[0] (the program name) before handing argv to the application.
    app = app_cls(argv=[pipeline_name, "--input", str(input_folder), "--output", str(output_folder),
                        *(a for m in models for a in ("--model", str(Path(m).resolve())))])
    try:
        app.run()
    except BaseException:
        with contextlib.suppress(Exception):  # no child outlives a failed run; the run's own error is the reason
            run_state(app).join_children()
        raise
    run_state(app).join_children()
    problems = layout_problems(spec.built_in_app, (p.name for p in output_folder.iterdir()))
    if problems:  # an incomplete or mixed-up result never goes out as done
        raise OutputLayoutError(f"{spec.name} in {output_folder}: " + "; ".join(problems))
    outputs, measurements, study_uid = _describe_outputs(output_folder)
    state = run_state(app)
    manifest = RunManifest(pipeline=spec.name, version=str(app_cls.version), input=str(input_folder),
                           outputs=outputs, measurements=measurements,
                           seconds=round(time.monotonic() - started, 3), study_instance_uid=study_uid,
                           phases={name: Phase(round(phase.seconds, 3), round(phase.cpu_seconds, 3),
                                               phase.peak_rss_bytes, phase.started_at, phase.in_child)
                                   for name, phase in state.phases.items()},
                           peak_rss_bytes=state.peak_rss_bytes,
                           review=state.review, warnings=list(state.warnings))
    for warning in manifest.warnings:
        log.warning("%s: %s", spec.name, warning)
    manifest.write(output_folder)
    return manifest


def _map_arguments(prog: str) -> argparse.ArgumentParser:
    """The MAP command's arguments, each defaulting to its HOLOSCAN_* variable as a MAP host sets them."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("-i", "--input", default=os.environ.get("HOLOSCAN_INPUT_PATH", "input"))
    parser.add_argument("-o", "--output", default=os.environ.get("HOLOSCAN_OUTPUT_PATH", "output"))
    parser.add_argument("-m", "--model", action="append", help="model folder (repeatable: an ensemble); "
                        "default $HOLOSCAN_MODEL_PATH")
    parser.add_argument("-w", "--workdir", default=os.environ.get("HOLOSCAN_WORKDIR"))
    return parser


def app_paths(app_name: str, argv: list[str]) -> tuple[Path, Path]:
    """Input and output folders of an app from its argv (Holoscan's ``Application.argv``) or HOLOSCAN_*.

    This is the part of monai.deploy.core's ``init_app_context`` the apps need; importing that module
    imports all of MONAI (torch, transformers: about 8 s per job on 2 cores), which model-free apps skip.
    """
    args, _ = _map_arguments(f"python -m radnode.apps.{app_name}").parse_known_args(argv)
    return Path(args.input), Path(args.output)


def app_model_folders(app_name: str, argv: list[str]) -> list[Path]:
    """The model folders an app was given: every ``--model`` in its argv, else ``$HOLOSCAN_MODEL_PATH`` (a
    model folder, or a folder of them as a MAP's ``/opt/holoscan/models``), each expanded by
    :func:`radnode.models.loading.model_folders`. ModelError (the ``radnode models check`` message) when
    there is none or one is not a model folder."""
    from radnode.models.errors import ModelError
    from radnode.models.loading import model_folders

    args, _ = _map_arguments(f"python -m radnode.apps.{app_name}").parse_known_args(argv)
    given = args.model or ([os.environ["HOLOSCAN_MODEL_PATH"]] if os.environ.get("HOLOSCAN_MODEL_PATH") else [])
    if not given:
        raise ModelError(f"{app_name}: no model folder; give --model DIR (radnode run) or set HOLOSCAN_MODEL_PATH "
                         "(a MAP host, or processing.models in the node's configuration)")
    return [folder for path in given for folder in model_folders(path)]


PIPELINE_ENV = "RADNODE_PIPELINE"
"""Set by the node's executors to the job's pipeline name, so an app registered under a site name (e.g. one
per model on model_seg's class) records that name in its manifest."""


def app_main(pipeline_name: str) -> int:
    """The MAP command of an app: paths from --input/--output or HOLOSCAN_INPUT_PATH/HOLOSCAN_OUTPUT_PATH, the
    model folders (apps that run one) from --model or HOLOSCAN_MODEL_PATH; the pipeline name from
    ``$RADNODE_PIPELINE`` when that names a pipeline running this same app."""
    from radnode.pipelines.registry import UnknownPipelineError, get_pipeline

    args = _map_arguments(f"python -m radnode.apps.{pipeline_name}").parse_args()
    try:
        if (alias := os.environ.get(PIPELINE_ENV)) and get_pipeline(alias).built_in_app == pipeline_name:
            pipeline_name = alias
    except UnknownPipelineError:
        pass
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        models = [Path(m) for m in args.model or ()] if get_pipeline(pipeline_name).takes_model else []
        run_app(pipeline_name, Path(args.input), Path(args.output), models)
    except Exception as e:  # the last stderr line is the job's recorded reason
        print(f"{pipeline_name} failed: {e}", file=sys.stderr)
        return 1
    return 0
