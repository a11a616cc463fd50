"""Declarative routing rules: which pipeline(s) a series needs, where it is forwarded, or that it is dropped.

A rule file is plain YAML data (``conditions.py`` reads it with its lines and parses the ``when:``
conditions); each rule's actions are a :class:`~radnode.pipelines.routing.SeriesDecision`, and the decision
for a series merges those of every matching rule. Every mistake is refused with ``FILE:LINE: reason``. The
language is described in ``docs/rules.md``; ``rules_cli.py`` holds ``radnode rules check/test``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydicom import Dataset

from radnode.destinations import DestinationError, looks_like_destination, parse_destination
from radnode.outputs.provenance import PROVENANCE_TAGS, correction_candidate, own_result
from radnode.pipelines.conditions import (
    Condition, ConditionParser, LineDict, LineList, RuleError, Subject, load_yaml_lines, suggest,
)
from radnode.resources import package_file
from radnode.pipelines.routing import (
    Completeness, Execution, ExecutionMode, LateInstances, Priority, Provenance, RoutingContext, SeriesDecision,
    merge_decisions,
)

DEFAULT_RULES = package_file("radnode.pipelines", "default_rules.yaml")
"""The node's default rule file, installed with the package (used when ``rules:`` is unset)."""


@dataclass(frozen=True)
class Rule:
    """One parsed rule: a condition and what a match contributes."""

    name: str
    description: str
    condition: Condition
    decision: SeriesDecision
    """The rule's actions (``matched_rules`` is the rule's name), merged with the other matching rules'."""
    stop: bool
    line: int

    def describe_actions(self) -> str:
        """The rule's actions in words, e.g. ``pipelines ct_tissue; priority stat``."""
        d = self.decision
        parts = ["discard"] if d.discard else []
        parts += [f"pipelines {', '.join(d.pipelines)}"] if d.pipelines else []
        parts += [f"forward {', '.join(d.forwards)}"] if d.forwards else []
        parts += [f"shadow {', '.join(d.shadow)}"] if d.shadow else []
        parts += [f"priority {d.priority}"]
        parts += [f"completeness {d.completeness.describe()}"] if d.completeness.describe() else []
        parts += [f"execution {d.execution.describe()}"] if d.execution.describe() else []
        parts += [f"queue {d.queue}"] if d.queue else []
        parts += ["stop"] if self.stop else []
        return "; ".join(parts)


@dataclass(frozen=True)
class RuleOutcome:
    """How one rule fared against one series."""

    rule: str
    matched: bool
    reasons: tuple[str, ...]
    skipped_by: str | None = None
    """Name of an earlier matching rule with ``stop``; this rule was then not evaluated."""



@dataclass(frozen=True)
class RuleSet:
    """Rules in file order, evaluated per series."""

    rules: tuple[Rule, ...]
    source: str

    def evaluate(self, attributes: Dataset | Mapping[str, Any],
                 context: RoutingContext | None = None) -> list[RuleOutcome]:
        """Every rule's outcome in order; rules after a matching ``stop`` rule are skipped, not evaluated."""
        subject = Subject(attributes, context or RoutingContext())
        outcomes: list[RuleOutcome] = []
        stopped_by: str | None = None
        for rule in self.rules:
            if stopped_by is not None:
                outcomes.append(RuleOutcome(rule.name, False, (f"not evaluated: rule '{stopped_by}' stops evaluation",),
                                            skipped_by=stopped_by))
                continue
            verdict = rule.condition.explain(subject)
            outcomes.append(RuleOutcome(rule.name, verdict.matched, verdict.reasons))
            if verdict.matched and rule.stop:
                stopped_by = rule.name
        return outcomes

    def route(self, attributes: Dataset | Mapping[str, Any], context: RoutingContext | None = None) -> SeriesDecision:
        """The decision for one series: every matching rule's actions merged (union of pipelines and forwards,
        most urgent priority, longest waits, most isolated execution mode and longest timeout). A result of
        radnode's own (``radnode/outputs/provenance.py``) is never processed, nor a correction candidate (a
        foreign SEG referencing a source series), before any rule is read."""
        own = own_result(attributes)
        if own is not None:
            return SeriesDecision(provenance=Provenance.OWN_RESULT, note=own)
        correction = correction_candidate(attributes)
        if correction is not None:
            return SeriesDecision(provenance=Provenance.CORRECTION, note=correction)
        outcomes = self.evaluate(attributes, context)
        return merge_decisions(r.decision for r, o in zip(self.rules, outcomes, strict=True) if o.matched)

    @property
    def in_process_pipelines(self) -> frozenset[str]:
        """The pipelines a rule runs in-process (its execution mode unset or ``in-process``): those the node
        keeps a warm job process for."""
        return frozenset(p for r in self.rules for p in r.decision.pipelines
                         if r.decision.execution.mode in (None, ExecutionMode.IN_PROCESS))

    def in_process_pipelines_on(self, queues: Iterable[str], default_queue: str) -> frozenset[str]:
        """The in-process pipelines whose rule sends them to one of ``queues`` (a rule naming no queue uses
        ``default_queue``): those a distributed worker serving those queues keeps a warm job process for."""
        served = set(queues)
        return frozenset(p for r in self.rules for p in r.decision.pipelines
                         if r.decision.execution.mode in (None, ExecutionMode.IN_PROCESS)
                         and (r.decision.queue or default_queue) in served)

    @property
    def keywords(self) -> frozenset[str]:
        """The DICOM keywords :meth:`route` reads (the rules' and those recognising the node's own results),
        e.g. for ``dcmread(specific_tags=...)`` at ingest."""
        return frozenset({*PROVENANCE_TAGS, *(k for r in self.rules for k in r.condition.keywords())})


# --- parsing ----------------------------------------------------------------------------------


class _CompletenessSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    study_idle_seconds: Annotated[float, Field(gt=0)] | None = None
    series_grace_seconds: Annotated[float, Field(ge=0)] | None = None
    late_instances: Literal["rerun", "ignore", "new-job"] | None = None


class _ExecutionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    mode: Literal["in-process", "subprocess", "container"] | None = None
    timeout_seconds: Annotated[float, Field(gt=0)] | None = None


class _RuleSpec(BaseModel):
    """A rule's keys other than ``when``, type-checked; semantics are checked by the parser."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    pipelines: list[Annotated[str, Field(min_length=1)]] = []
    shadow: list[Annotated[str, Field(min_length=1)]] = []
    forward: list[Annotated[str, Field(min_length=1)]] = []
    discard: bool = False
    priority: Literal["stat", "routine", "off-peak"] = "routine"
    completeness: _CompletenessSpec = _CompletenessSpec()
    execution: _ExecutionSpec = _ExecutionSpec()
    queue: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")] | None = None
    stop: bool = False
    final: bool = False


_RULE_KEYS = ("name", "description", "when", *(k for k in _RuleSpec.model_fields if k not in ("name", "description")))
_SECTION_KEYS = {"completeness": tuple(_CompletenessSpec.model_fields), "execution": tuple(_ExecutionSpec.model_fields)}
"""The keys of the rule keys that are mappings themselves."""

class _Parser(ConditionParser):
    """Turns the line-annotated YAML data of one file into a RuleSet, raising RuleError at the first mistake."""

    def __init__(self, path: str, known_pipelines: Collection[str] | None,
                 known_destinations: Collection[str] | None, execution_modes: Collection[str] | None) -> None:
        super().__init__(path)
        self.known_pipelines, self.known_destinations = known_pipelines, known_destinations
        self.execution_modes = execution_modes

    def rule_set(self, data: Any) -> RuleSet:
        if not isinstance(data, LineDict):
            line = data.line if isinstance(data, LineList) else 1
            raise self.error(line, "expected a mapping with 'rules:' at the top level")
        for key in data:
            if key != "rules":
                raise self.error(data.key_lines[key], f"unknown top-level key '{key}'; expected 'rules'")
        rules = data.get("rules")
        if not isinstance(rules, LineList) or not rules:
            raise self.error(data.value_lines.get("rules", data.line), "'rules' must be a non-empty list of rules")
        parsed: list[Rule] = []
        for item, line in zip(rules, rules.item_lines, strict=True):
            rule = self.rule(item, line)
            if any(r.name == rule.name for r in parsed):
                raise self.error(item.value_lines["name"], f"duplicate rule name '{rule.name}'")
            parsed.append(rule)
        return RuleSet(tuple(parsed), self.path)


    def rule(self, node: Any, line: int) -> Rule:
        if not isinstance(node, LineDict):
            raise self.error(line, "a rule must be a mapping with name, when and actions")
        name = node.get("name")
        label = f"rule '{name}'" if isinstance(name, str) and name else "rule"
        try:
            spec = _RuleSpec.model_validate({k: v for k, v in node.items() if k != "when"})
        except ValidationError as e:
            raise self._pydantic_error(node, e, label) from None
        if "when" not in node:
            raise self.error(node.line, f"{label}: missing 'when' (the condition)")
        if spec.discard and (spec.pipelines or spec.forward or spec.shadow):
            raise self.error(node.key_lines["discard"],
                             f"{label}: 'discard' cannot be combined with pipelines, forward or shadow")
        modifiers = {"priority", "completeness", "execution", "queue", "shadow"}
        if not (spec.discard or spec.pipelines or spec.forward or modifiers & node.keys()):
            raise self.error(node.line, f"{label}: no action; give pipelines, forward, discard, priority, "
                                        "completeness, execution, queue or shadow")
        self._check_names(node, "pipelines", self.known_pipelines, "pipeline", label)
        self._check_names(node, "shadow", self.known_pipelines, "shadow pipeline", label)
        self._check_forwards(node, label)
        mode = spec.execution.mode
        if mode is not None and self.execution_modes is not None and mode not in self.execution_modes:
            hint = "; set containers.engine (podman or docker) to run MAP containers" \
                if mode == ExecutionMode.CONTAINER else ""
            raise self.error(node["execution"].value_lines["mode"],
                             f"{label}: execution mode '{mode}' is not available on this node (available: "
                             f"{', '.join(self.execution_modes)}){hint}")
        try:
            condition = self.condition(node["when"], node.value_lines["when"])
        except RuleError as e:
            raise self.error(e.line, f"{label}: {e.reason}") from None
        c, x = spec.completeness, spec.execution
        decision = SeriesDecision(
            pipelines=tuple(dict.fromkeys(spec.pipelines)), shadow=tuple(dict.fromkeys(spec.shadow)),
            forwards=tuple(dict.fromkeys(spec.forward)),
            discard=spec.discard, priority=Priority(spec.priority),
            completeness=Completeness(c.study_idle_seconds, c.series_grace_seconds,
                                      LateInstances(c.late_instances) if c.late_instances else None),
            execution=Execution(ExecutionMode(x.mode) if x.mode else None, x.timeout_seconds),
            queue=spec.queue or "", matched_rules=(spec.name,),
        )
        return Rule(name=spec.name, description=spec.description.strip(), condition=condition, decision=decision,
                    stop=spec.stop or spec.final, line=node.line)

    def _check_forwards(self, node: LineDict, label: str) -> None:
        """A forward names a configured destination, or is a one-line destination (``AET@HOST:PORT``,
        ``TYPE:ARGUMENT``) that the destination registry parses: an unknown type is refused with the known ones."""
        if "forward" not in node:
            return
        known = self.known_destinations
        for name, line in zip(node["forward"], node["forward"].item_lines, strict=True):
            if known is not None and name in known:
                continue
            if "," in name:
                raise self.error(line, f"{label}: forward '{name}': a destination name cannot hold a comma")
            if looks_like_destination(name):
                try:
                    parse_destination(name)
                except DestinationError as e:
                    raise self.error(line, f"{label}: forward '{name}': {e}") from None
            elif known is not None:
                listing = ", ".join(sorted(known)) or "none"
                raise self.error(line, f"{label}: unknown destination '{name}' (known: {listing}; or a one-line "
                                       "destination such as PACS@10.0.0.5:104 or dicomweb:https://host/dicom-web)")

    def _check_names(self, node: LineDict, key: str, known: Collection[str] | None, what: str, label: str) -> None:
        if known is None or key not in node:
            return
        for name, line in zip(node[key], node[key].item_lines, strict=True):
            if name not in known:
                listing = ", ".join(sorted(known)) or "none"
                raise self.error(line, f"{label}: unknown {what} '{name}' (known: {listing})")

    def _pydantic_error(self, node: LineDict, e: ValidationError, label: str) -> RuleError:
        err = e.errors()[0]
        loc = err["loc"]
        line, here = node.line, node
        for i, part in enumerate(loc):
            if isinstance(here, LineDict) and isinstance(part, str) and part in here:
                last_key = i == len(loc) - 1 and err["type"] == "extra_forbidden"
                line = here.key_lines[part] if last_key else here.value_lines[part]
                here = here[part]
            elif isinstance(here, LineList) and isinstance(part, int) and part < len(here):
                line, here = here.item_lines[part], here[part]
            else:
                break
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        if err["type"] == "extra_forbidden":
            allowed = _RULE_KEYS if len(loc) == 1 else _SECTION_KEYS[str(loc[0])]
            return self.error(line, f"{label}: unknown key '{key}'{suggest(str(loc[-1]), allowed)}; "
                                    f"expected one of: {', '.join(allowed)}")
        if err["type"] == "missing":
            return self.error(line, f"{label}: missing '{key}'")
        return self.error(line, f"{label}: '{key}': {err['msg']} (got {err.get('input')!r})")


def parse_rules(text: str, source: str = "<rules>", known_pipelines: Collection[str] | None = None,
                known_destinations: Collection[str] | None = None,
                execution_modes: Collection[str] | None = None) -> RuleSet:
    """Parse rule-file text; ``source`` names it in errors. Pipelines, destinations and execution modes are
    checked against what the node has when given."""
    data = load_yaml_lines(text, source)
    if data is None:
        raise RuleError(source, None, "empty rule file; expected 'rules:' with a list of rules")
    return _Parser(source, known_pipelines, known_destinations, execution_modes).rule_set(data)


def load_rules(path: str | Path, known_pipelines: Collection[str] | None = None,
               known_destinations: Collection[str] | None = None,
               execution_modes: Collection[str] | None = None) -> RuleSet:
    """Load and validate a rule file, raising RuleError (``FILE:LINE: reason``) on the first mistake."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RuleError(str(path), None, f"cannot read rule file ({getattr(e, 'strerror', None) or e})") from None
    return parse_rules(text, str(path), known_pipelines, known_destinations, execution_modes)

