"""The routing vocabulary: what the node does with a series, and how a study's series decisions merge.

Below both the rules and the node: the rule parser (``rules.py``) produces a :class:`SeriesDecision` per
series, the node records it as it is (the job store keeps it by field name, :meth:`SeriesDecision.to_record`)
and merges the decisions of a study's series into its :class:`StudyRoute` with :func:`study_route`. Nothing
here reads DICOM, YAML or the database.

Adding a routing field is one line in :class:`SeriesDecision` (its type, default and how two decisions
merge) plus its entry in the rule parser; the store and the merge need no change.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from functools import cache, reduce
from typing import Any, TypeVar

from pydantic import TypeAdapter


class Priority(StrEnum):
    """How urgently a routed series is processed."""

    STAT = "stat"
    ROUTINE = "routine"
    OFF_PEAK = "off-peak"

    @property
    def rank(self) -> int:
        """Higher is more urgent (what the job queue orders by)."""
        return {"off-peak": 0, "routine": 1, "stat": 2}[self.value]

    @classmethod
    def from_rank(cls, rank: int) -> Priority:
        """The priority of a queue rank (as the job store orders jobs)."""
        return next(p for p in cls if p.rank == rank)


class LateInstances(StrEnum):
    """What happens to instances arriving after a study was judged complete."""

    RERUN = "rerun"
    """Re-run the pipeline on the whole study (a queued or running job waits for the study again)."""
    IGNORE = "ignore"
    """Keep them in the spool and the job's log; not part of any job's input."""
    NEW_JOB = "new-job"
    """A new job for the late instances alone."""


@dataclass(frozen=True)
class Completeness:
    """Per-route completeness settings; ``None`` leaves the node's default (``ingress.*``)."""

    study_idle_seconds: float | None = None
    series_grace_seconds: float | None = None
    late_instances: LateInstances | None = None

    def merged(self, other: Completeness) -> Completeness:
        """Both routes' needs: the longer waits, and the first late-instance policy that was set."""

        def longer(a: float | None, b: float | None) -> float | None:
            return b if a is None else a if b is None else max(a, b)

        return Completeness(longer(self.study_idle_seconds, other.study_idle_seconds),
                            longer(self.series_grace_seconds, other.series_grace_seconds),
                            self.late_instances or other.late_instances)

    def describe(self) -> str:
        """``name=value`` of the settings that are set, or an empty string."""
        return ", ".join(f"{k}={v}" for k, v in vars(self).items() if v is not None)


class ExecutionMode(StrEnum):
    """How a routed pipeline's application runs (``radnode/node/executors.py``)."""

    IN_PROCESS = "in-process"
    SUBPROCESS = "subprocess"
    CONTAINER = "container"

    @property
    def isolation(self) -> int:
        """Higher isolates the app more from the node."""
        return {"in-process": 0, "subprocess": 1, "container": 2}[self.value]


@dataclass(frozen=True)
class Execution:
    """Per-route execution settings of a pipeline; ``None`` leaves the node's default (in-process; the
    timeout of the MAP, else ``processing.job_timeout_seconds``)."""

    mode: ExecutionMode | None = None
    timeout_seconds: float | None = None

    def merged(self, other: Execution) -> Execution:
        """Both routes' needs: the more isolated mode and the longer timeout."""
        modes = [m for m in (self.mode, other.mode) if m is not None]
        timeouts = [t for t in (self.timeout_seconds, other.timeout_seconds) if t is not None]
        return Execution(max(modes, key=lambda m: m.isolation) if modes else None,
                         max(timeouts) if timeouts else None)

    def describe(self) -> str:
        """``mode=…, timeout_seconds=…`` of the settings that are set, or an empty string."""
        return ", ".join(f"{k}={v}" for k, v in vars(self).items() if v is not None)


class Provenance(StrEnum):
    """Where a series comes from, as far as routing cares."""

    EXTERNAL = "external"
    """Sent to the node from outside (a modality, a PACS, Orthanc): routed by the rules."""
    OWN_RESULT = "own-result"
    """A result a radnode node wrote (its SEG, SR, Parametric Map, report) come back: recorded, never
    processed, whatever the rules or the late-instance policy say (``radnode/outputs/provenance.py``).
    A foreign object that modifies such a result is ``EXTERNAL``."""
    CORRECTION = "correction"
    """A SEG from another creator referencing a source series (a clinician's edit of a segmentation,
    ``outputs/provenance.correction_candidate``): recorded and matched to the job whose result it corrects
    (``radnode/feedback``), never processed."""


@dataclass(frozen=True)
class RoutingContext:
    """What the node knows about an arrival besides the data set; empty means unknown."""

    calling_ae: str = ""
    called_ae: str = ""


_T = TypeVar("_T")


def _union(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    """Both, in first-seen order, each once."""
    return tuple(dict.fromkeys((*a, *b)))


def _most_urgent(a: Priority, b: Priority) -> Priority:
    return max(a, b, key=lambda p: p.rank)


def _first_set(default: Any) -> Callable[[Any, Any], Any]:
    """The first value that differs from the field's default."""
    return lambda a, b: a if a != default else b


def _field(default: _T, merge: Callable[[_T, _T], _T]) -> Any:
    """A decision field with its default and how the decisions of two matched rules combine."""
    if isinstance(default, (Completeness, Execution)):
        return field(default_factory=lambda: default, metadata={"merge": merge})
    return field(default=default, metadata={"merge": merge})


@dataclass(frozen=True)
class SeriesDecision:
    """What the node does with one series: taken once, on its first instance, and recorded as it is.

    A rule's actions are one of these; several matching rules merge field by field (:meth:`merged`).
    """

    pipelines: tuple[str, ...] = _field((), _union)
    """Pipelines to run on the study, in the order the rules name them."""
    forwards: tuple[str, ...] = _field((), _union)
    """Destinations (configured names in ``egress.destinations``, or one-line destinations) the study is
    forwarded to, or its results."""
    discard: bool = _field(False, operator.or_)
    """Set by any matching discard rule; it then has no pipelines and no forwards."""
    priority: Priority = _field(Priority.ROUTINE, _most_urgent)
    completeness: Completeness = _field(Completeness(), Completeness.merged)
    execution: Execution = _field(Execution(), Execution.merged)
    """How the pipelines of this series' routes run (merged per pipeline over a study, see :func:`study_route`)."""
    queue: str = _field("", _first_set(""))
    """The broker queue its pipelines' jobs go to with the distributed engine (only workers serving it take
    them, e.g. a large GPU); '' for the default queue (``engine.default_queue``)."""
    matched_rules: tuple[str, ...] = _field((), _union)
    provenance: Provenance = _field(Provenance.EXTERNAL, _first_set(Provenance.EXTERNAL))
    note: str = _field("", _first_set(""))
    """Why, when the rules did not decide (e.g. the node's own result and how it was recognised)."""
    refused_pipelines: tuple[str, ...] = _field((), _union)
    """Pipelines the rules chose that the sender may not trigger (``ingress.allowed_peers[].pipelines``): not
    run, and said so in :meth:`describe`."""
    shadow: tuple[str, ...] = _field((), _union)
    """Candidate pipelines run beside the production ones on the same input: their results are stored and
    compared with the production run's, never delivered (``radnode/feedback/shadow.py``)."""

    def merged(self, other: SeriesDecision) -> SeriesDecision:
        """Both decisions' actions, field by field (union of pipelines and forwards, most urgent priority,
        longest waits, most isolated execution, union of shadow pipelines); a discard clears pipelines, forwards and
        shadows."""
        values = {f.name: f.metadata["merge"](getattr(self, f.name), getattr(other, f.name)) for f in fields(self)}
        if values["discard"]:
            values.update(pipelines=(), forwards=(), shadow=())
        return SeriesDecision(**values)

    @property
    def skipped(self) -> bool:
        """Nothing to do: discarded, the node's own result, a correction, or no pipeline and no forward."""
        return (self.discard or self.provenance in (Provenance.OWN_RESULT, Provenance.CORRECTION)
                or not (self.pipelines or self.forwards))

    def with_defaults(self, late_instances: LateInstances) -> SeriesDecision:
        """The decision as the node takes it: the node's late-instance policy where no rule set one."""
        if self.completeness.late_instances is not None:
            return self
        return replace(self, completeness=replace(self.completeness, late_instances=late_instances))

    @property
    def late_instances(self) -> LateInstances:
        """The late-instance policy in force (``ignore`` for a series that is skipped)."""
        if self.skipped:
            return LateInstances.IGNORE
        return self.completeness.late_instances or LateInstances.IGNORE

    def describe(self) -> str:
        """One line for logs: what happens, which rules said so, and what the sender was refused."""
        refused = (f"; not run for this sender (ingress.allowed_peers): {', '.join(self.refused_pipelines)}"
                   if self.refused_pipelines else "")
        return self._action() + refused

    def _action(self) -> str:
        if self.provenance is Provenance.OWN_RESULT:
            return self.note or "a result of the node's own: never processed"
        if self.provenance is Provenance.CORRECTION:
            return self.note or "a correction of a segmentation: matched to its job, never processed"
        if not self.matched_rules:
            return self.note or "no rule matched: nothing to do"
        if self.discard:
            action = "discard"
        else:
            parts = [f"pipelines {', '.join(self.pipelines)}"] if self.pipelines else []
            parts += [f"forward {', '.join(self.forwards)}"] if self.forwards else []
            parts += [f"shadow {', '.join(self.shadow)}"] if self.shadow else []
            action = "; ".join(parts or ["no action"]) + f"; priority {self.priority}"
            action += f"; completeness {self.completeness.describe()}" if self.completeness.describe() else ""
            action += f"; execution {self.execution.describe()}" if self.execution.describe() else ""
            action += f"; queue {self.queue}" if self.queue else ""
        return f"{action} (rules: {', '.join(self.matched_rules)})"

    def to_record(self) -> dict[str, Any]:
        """The decision as plain JSON data, by field name (what the job store keeps)."""
        return _adapter().dump_python(self, mode="json")

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> SeriesDecision:
        """A decision from :meth:`to_record`'s data; fields it lacks (written by an older release) default."""
        known = {f.name for f in fields(cls)}
        return _adapter().validate_python({k: v for k, v in data.items() if k in known})


@cache
def _adapter() -> TypeAdapter[SeriesDecision]:
    return TypeAdapter(SeriesDecision)


def merge_decisions(decisions: Iterable[SeriesDecision]) -> SeriesDecision:
    """Several decisions (e.g. every matching rule's) as one; none: the empty decision (nothing to do). The
    first is the start, not the empty decision, whose defaults would win the merge (routine over off-peak)."""
    decisions = list(decisions)
    return reduce(SeriesDecision.merged, decisions) if decisions else SeriesDecision()


@dataclass(frozen=True)
class StudyRoute:
    """What the node does with a study: its series' decisions merged (:func:`study_route`).

    The study's job runs ``pipelines[0]``; each further pipeline runs as a sibling job on the same input.
    Only the main job forwards, so the study is forwarded once. Each shadow pipeline runs as a *shadow* job on
    the same input after the main job's run, its results never delivered.
    """

    pipelines: tuple[str, ...] = ()
    forwards: tuple[str, ...] = ()
    priority: Priority = Priority.ROUTINE
    executions: Mapping[str, Execution] = field(default_factory=dict)
    """Per pipeline: the execution settings of the series' routes choosing it, merged."""
    skipped: tuple[str, ...] = ()
    """Why each skipped series' decision does nothing (its ``describe()``), each once."""
    queue: str = ""
    """The broker queue the rules name for the study ('' for the default), the first one a series' rule set."""
    shadow: tuple[str, ...] = ()
    """Candidate pipelines compared with the main job's (none that is also a production pipeline: that one's
    results are delivered); empty when the study has no production pipeline to compare with."""

    @property
    def nothing_to_do(self) -> bool:
        """Every series is skipped: no pipeline, no forward."""
        return not (self.pipelines or self.forwards)

    @property
    def main_pipeline(self) -> str:
        """The pipeline the study's own job runs ('' for a forward-only route)."""
        return self.pipelines[0] if self.pipelines else ""

    @property
    def sibling_pipelines(self) -> tuple[str, ...]:
        """The pipelines that run as sibling jobs of the study's job."""
        return self.pipelines[1:]

    def execution(self, pipeline: str) -> Execution:
        """How ``pipeline`` runs for this study (the node's defaults when no route says)."""
        return self.executions.get(pipeline, Execution())


def study_route(decisions: Iterable[SeriesDecision]) -> StudyRoute:
    """Merge a study's series decisions: union of pipelines, forwards and shadows (first-seen order), the most
    urgent priority, and per pipeline the merged execution of the routes choosing it. Skipped series contribute
    nothing but their reason."""
    decisions = list(decisions)
    kept = [d for d in decisions if not d.skipped]
    executions: dict[str, Execution] = {}
    for decision in kept:
        for pipeline in (*decision.pipelines, *decision.shadow):
            executions[pipeline] = executions.get(pipeline, Execution()).merged(decision.execution)
    pipelines = reduce(_union, (d.pipelines for d in kept), ())
    shadow = reduce(_union, (d.shadow for d in kept), ())
    return StudyRoute(
        pipelines=pipelines,
        shadow=tuple(p for p in shadow if p not in pipelines) if pipelines else (),
        forwards=reduce(_union, (d.forwards for d in kept), ()),
        priority=reduce(_most_urgent, (d.priority for d in kept), Priority.OFF_PEAK) if kept else Priority.ROUTINE,
        executions=executions,
        skipped=tuple(sorted({d.describe() for d in decisions if d.skipped})),
        queue=next((d.queue for d in kept if d.queue), ""),
    )
