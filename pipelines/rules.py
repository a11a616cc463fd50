"""Declarative routing rules: which pipeline(s) a series needs, where it is forwarded, or that it is dropped.

A rule file is plain YAML data (read with a safe loader that refuses tags, aliases and duplicate keys)
parsed into a tree of small condition objects; nothing in it is ever executed. Every mistake is refused
with ``FILE:LINE: reason``. The language is described in ``docs/rules.md``.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TextIO

import pydicom
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydicom import Dataset
from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

DEFAULT_RULES = Path(__file__).with_name("default_rules.yaml")
"""The node's default rule file, installed with the package."""

CONTEXT_FIELDS = ("calling_ae", "called_ae")
"""Fields taken from the association rather than the data set."""
FIELD_ALIASES = {"station": "StationName"}
"""Short names for DICOM keywords."""
OPERATORS = ("between", "equals", "exists", "ge", "gt", "in", "le", "lt", "matches")
_NUMERIC_VRS = frozenset({"DS", "IS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})
_UID_TEXT = re.compile(r"\d+(\.\d+)*")


class RuleError(ValueError):
    """A rule file that cannot be used; ``str()`` is ``FILE:LINE: reason``."""

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        self.path, self.line, self.reason = path, line, reason
        super().__init__(f"{path}:{line}: {reason}" if line is not None else f"{path}: {reason}")


class Priority(StrEnum):
    """How urgently a routed series is processed."""

    STAT = "stat"
    ROUTINE = "routine"
    OFF_PEAK = "off-peak"

    @property
    def rank(self) -> int:
        """Higher is more urgent."""
        return {"off-peak": 0, "routine": 1, "stat": 2}[self.value]


class LateInstances(StrEnum):
    """What happens to instances arriving after a study was judged complete."""

    RERUN = "rerun"
    IGNORE = "ignore"
    NEW_JOB = "new-job"


@dataclass(frozen=True)
class Completeness:
    """Per-route completeness settings; ``None`` leaves the node's default."""

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
    """Per-route execution settings; ``None`` leaves the node's default (in-process; the timeout of the
    MAP, else ``processing.job_timeout_seconds``)."""

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


@dataclass(frozen=True)
class RoutingContext:
    """What the node knows about an arrival besides the data set; empty means unknown."""

    calling_ae: str = ""
    called_ae: str = ""


# --- YAML with line numbers -------------------------------------------------------------------


class _LineDict(dict[str, Any]):
    """A YAML mapping that remembers the line of itself, of each key and of each value (1-based)."""

    line: int
    key_lines: dict[str, int]
    value_lines: dict[str, int]


class _LineList(list[Any]):
    """A YAML sequence that remembers the line of itself and of each item (1-based)."""

    line: int
    item_lines: list[int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records line numbers and refuses aliases, duplicate keys, non-text keys and tags."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in rule files",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    result = _LineDict()
    result.line, result.key_lines, result.value_lines = node.start_mark.line + 1, {}, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is not text", key_node.start_mark)
        if key in result:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
        result.value_lines[key] = value_node.start_mark.line + 1
    return result


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> _LineList:
    result = _LineList(loader.construct_object(item, deep=True) for item in node.value)
    result.line, result.item_lines = node.start_mark.line + 1, [item.start_mark.line + 1 for item in node.value]
    return result


def _refuse_tag(loader: _LineLoader, node: yaml.Node) -> None:
    raise yaml.constructor.ConstructorError(
        None, None, f"YAML tag '{node.tag}' is not allowed: rule files are plain data", node.start_mark)


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)
for _tag in ("tag:yaml.org,2002:omap", "tag:yaml.org,2002:pairs", "tag:yaml.org,2002:set", None):
    _LineLoader.add_constructor(_tag, _refuse_tag)


# --- values as the rules see them -------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    """A name in a condition: a DICOM keyword (``keyword``) or a context field (``keyword`` None)."""

    name: str
    keyword: str | None
    vr: str | None

    @property
    def numeric(self) -> bool:
        """Numbers, compared numerically (a VR such as ``US or SS`` counts as numeric)."""
        return self.vr is not None and any(vr in _NUMERIC_VRS for vr in self.vr.split(" or "))


class _Subject:
    """The values of one series' attributes and its routing context, looked up by field."""

    def __init__(self, attributes: Dataset | Mapping[str, Any], context: RoutingContext) -> None:
        self.attributes, self.context = attributes, context

    def values(self, f: _Field) -> list[Any]:
        """The field's values (several for a multi-valued attribute); empty when absent or empty."""
        raw = getattr(self.context, f.name) if f.keyword is None else self.attributes.get(f.keyword)
        if raw is None or raw == "" or raw == b"":
            return []
        if isinstance(raw, (MultiValue, list, tuple)):
            return [v for v in raw if v is not None and v != ""]
        return [raw]


def _uid_name(text: str) -> str | None:
    entry = UID_dictionary.get(text)
    return entry[0] if entry else None


def _show(value: Any, f: _Field) -> str:
    """A value as reasons print it: numbers plain, text quoted, registered UIDs by their name."""
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(float(value))
    text = str(value).strip()
    return repr((_uid_name(text) if f.vr == "UI" else None) or text)


def _show_all(values: list[Any], f: _Field) -> str:
    if not values:
        return "absent"
    return _show(values[0], f) if len(values) == 1 else "[" + ", ".join(_show(v, f) for v in values) + "]"


def _as_number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _equal(value: Any, operand: str | float) -> bool:
    if not isinstance(operand, str):
        return _as_number(value) == operand
    return str(value).strip() == operand


# --- the condition tree -----------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Whether a condition matched, and one human-readable line per test (nested ones indented)."""

    matched: bool
    reasons: tuple[str, ...]


class Condition(Protocol):
    """A node of a parsed ``when:`` tree."""

    def explain(self, subject: _Subject) -> Verdict: ...

    def keywords(self) -> Iterable[str]: ...


def _indent(verdicts: Iterable[Verdict]) -> tuple[str, ...]:
    return tuple("  " + line for v in verdicts for line in v.reasons)


@dataclass(frozen=True)
class _FieldTest:
    """Base of the leaf tests: one field, one operator."""

    field: _Field

    def keywords(self) -> Iterable[str]:
        return [self.field.keyword] if self.field.keyword else []


@dataclass(frozen=True)
class Equals(_FieldTest):
    """The field (any of its values) equals the operand; numbers compare numerically."""

    operand: str | float

    def explain(self, subject: _Subject) -> Verdict:
        values = subject.values(self.field)
        hit = next((v for v in values if _equal(v, self.operand)), None)
        head = f"{self.field.name} = {_show(self.operand, self.field)}"
        if hit is not None:
            return Verdict(True, (f"{head} matched {_show(hit, self.field)}",))
        return Verdict(False, (f"{head} not matched: {_show_all(values, self.field)}",))


@dataclass(frozen=True)
class OneOf(_FieldTest):
    """The field (any of its values) equals one of the operands."""

    operands: tuple[str | float, ...]

    def explain(self, subject: _Subject) -> Verdict:
        values = subject.values(self.field)
        hit = next((v for v in values if any(_equal(v, o) for o in self.operands)), None)
        shown = [_show(o, self.field) for o in self.operands]
        listing = ", ".join(shown) if len(shown) <= 4 else ", ".join(shown[:3]) + f", … ({len(shown)} values)"
        head = f"{self.field.name} in [{listing}]"
        if hit is not None:
            return Verdict(True, (f"{head} matched {_show(hit, self.field)}",))
        return Verdict(False, (f"{head} not matched: {_show_all(values, self.field)}",))


@dataclass(frozen=True)
class Matches(_FieldTest):
    """A regular expression is found (``re.search``) in the field's text (any of its values)."""

    pattern: re.Pattern[str]

    def explain(self, subject: _Subject) -> Verdict:
        values = subject.values(self.field)
        hit = next((v for v in values if self.pattern.search(str(v))), None)
        head = f"{self.field.name} matches {self.pattern.pattern!r}"
        if hit is not None:
            return Verdict(True, (f"{head} matched {_show(hit, self.field)}",))
        return Verdict(False, (f"{head} not matched: {_show_all(values, self.field)}",))


_COMPARISONS = {"gt": (">", operator.gt), "ge": (">=", operator.ge),
                "lt": ("<", operator.lt), "le": ("<=", operator.le)}


@dataclass(frozen=True)
class Compare(_FieldTest):
    """The field (any of its values) as a number is within ``low``..``high`` (``between``) or beyond a bound."""

    op: str
    bounds: tuple[float, ...]

    def _holds(self, value: Any) -> bool:
        number = _as_number(value)
        if number is None:
            return False
        if self.op == "between":
            return self.bounds[0] <= number <= self.bounds[1]
        return bool(_COMPARISONS[self.op][1](number, self.bounds[0]))

    def _phrase(self) -> str:
        shown = [_show(b, self.field) for b in self.bounds]
        if self.op == "between":
            return f"between {shown[0]} and {shown[1]}"
        return f"{_COMPARISONS[self.op][0]} {shown[0]}"

    def explain(self, subject: _Subject) -> Verdict:
        values = subject.values(self.field)
        if not values:
            return Verdict(False, (f"{self.field.name} absent, not {self._phrase()}",))
        hit = next((v for v in values if self._holds(v)), None)
        if hit is not None:
            return Verdict(True, (f"{self.field.name} {_show(hit, self.field)} {self._phrase()}",))
        if all(_as_number(v) is None for v in values):
            return Verdict(False, (f"{self.field.name} {_show_all(values, self.field)} is not a number",))
        return Verdict(False, (f"{self.field.name} {_show_all(values, self.field)} not {self._phrase()}",))


@dataclass(frozen=True)
class Exists(_FieldTest):
    """The field is present with a non-empty value (``expected`` true) or absent/empty (false)."""

    expected: bool

    def explain(self, subject: _Subject) -> Verdict:
        values = subject.values(self.field)
        if values:
            shown = f"{self.field.name} present ({_show_all(values, self.field)})"
            return Verdict(self.expected, (shown if self.expected else f"{shown}, required absent",))
        return Verdict(not self.expected, (f"{self.field.name} absent" + ("" if self.expected else " as required"),))


@dataclass(frozen=True)
class All:
    """Every child matches. ``implicit`` marks several keys of one mapping: no header line."""

    children: tuple[Condition, ...]
    implicit: bool = False

    def explain(self, subject: _Subject) -> Verdict:
        verdicts = [c.explain(subject) for c in self.children]
        matched = all(v.matched for v in verdicts)
        if self.implicit:
            return Verdict(matched, tuple(line for v in verdicts for line in v.reasons))
        failed = sum(not v.matched for v in verdicts)
        head = f"all of {len(verdicts)}: " + ("matched" if matched else f"{failed} not matched")
        return Verdict(matched, (head, *_indent(verdicts)))

    def keywords(self) -> Iterable[str]:
        return [k for c in self.children for k in c.keywords()]


@dataclass(frozen=True)
class AnyOf:
    """At least one child matches."""

    children: tuple[Condition, ...]

    def explain(self, subject: _Subject) -> Verdict:
        verdicts = [c.explain(subject) for c in self.children]
        hits = sum(v.matched for v in verdicts)
        head = f"any of {len(verdicts)}: " + (f"{hits} matched" if hits else "none matched")
        return Verdict(hits > 0, (head, *_indent(verdicts)))

    def keywords(self) -> Iterable[str]:
        return [k for c in self.children for k in c.keywords()]


@dataclass(frozen=True)
class Not:
    """The child does not match."""

    child: Condition

    def explain(self, subject: _Subject) -> Verdict:
        inner = self.child.explain(subject)
        head = "not: the condition below matched" if inner.matched else "not: the condition below did not match"
        return Verdict(not inner.matched, (head, *_indent([inner])))

    def keywords(self) -> Iterable[str]:
        return self.child.keywords()


# --- rules, outcomes, decisions ---------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One parsed rule: a condition and what a match contributes."""

    name: str
    description: str
    condition: Condition
    pipelines: tuple[str, ...]
    forward: tuple[str, ...]
    discard: bool
    priority: Priority
    completeness: Completeness
    execution: Execution
    stop: bool
    line: int

    def actions(self) -> str:
        """The rule's actions in words, e.g. ``pipelines ct_tissue; priority stat``."""
        parts = ["discard"] if self.discard else []
        parts += [f"pipelines {', '.join(self.pipelines)}"] if self.pipelines else []
        parts += [f"forward {', '.join(self.forward)}"] if self.forward else []
        parts += [f"priority {self.priority}"]
        parts += [f"completeness {self.completeness.describe()}"] if self.completeness.describe() else []
        parts += [f"execution {self.execution.describe()}"] if self.execution.describe() else []
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
class RouteDecision:
    """What the node does with a series: the union of all matched rules' actions."""

    pipelines: tuple[str, ...] = ()
    forwards: tuple[str, ...] = ()
    discard: bool = False
    """Set by any matching discard rule; it then has no pipelines and no forwards."""
    priority: Priority = Priority.ROUTINE
    completeness: Completeness = field(default_factory=Completeness)
    execution: Execution = field(default_factory=Execution)
    matched_rules: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for logs: what happens and which rules said so."""
        if not self.matched_rules:
            return "no rule matched: nothing to do"
        if self.discard:
            action = "discard"
        else:
            parts = [f"pipelines {', '.join(self.pipelines)}"] if self.pipelines else []
            parts += [f"forward {', '.join(self.forwards)}"] if self.forwards else []
            action = "; ".join(parts or ["no action"]) + f"; priority {self.priority}"
            action += f"; completeness {self.completeness.describe()}" if self.completeness.describe() else ""
            action += f"; execution {self.execution.describe()}" if self.execution.describe() else ""
        return f"{action} (rules: {', '.join(self.matched_rules)})"


@dataclass(frozen=True)
class RuleSet:
    """Rules in file order, evaluated per series."""

    rules: tuple[Rule, ...]
    source: str

    def evaluate(self, attributes: Dataset | Mapping[str, Any],
                 context: RoutingContext | None = None) -> list[RuleOutcome]:
        """Every rule's outcome in order; rules after a matching ``stop`` rule are skipped, not evaluated."""
        subject = _Subject(attributes, context or RoutingContext())
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

    def route(self, attributes: Dataset | Mapping[str, Any], context: RoutingContext | None = None) -> RouteDecision:
        """The decision for one series: union of pipelines and forwards, most urgent priority, longest waits,
        most isolated execution mode and longest timeout."""
        matched = [r for r, o in zip(self.rules, self.evaluate(attributes, context), strict=True) if o.matched]
        if not matched:
            return RouteDecision()
        completeness, execution = Completeness(), Execution()
        for rule in matched:
            completeness = completeness.merged(rule.completeness)
            execution = execution.merged(rule.execution)
        discard = any(r.discard for r in matched)
        return RouteDecision(
            pipelines=() if discard else tuple(dict.fromkeys(p for r in matched for p in r.pipelines)),
            forwards=() if discard else tuple(dict.fromkeys(d for r in matched for d in r.forward)),
            discard=discard,
            priority=max((r.priority for r in matched), key=lambda p: p.rank),
            completeness=completeness,
            execution=execution,
            matched_rules=tuple(r.name for r in matched),
        )

    @property
    def keywords(self) -> frozenset[str]:
        """The DICOM keywords the rules read, e.g. for ``dcmread(specific_tags=...)`` at ingest."""
        return frozenset(k for r in self.rules for k in r.condition.keywords())


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
    forward: list[Annotated[str, Field(min_length=1)]] = []
    discard: bool = False
    priority: Literal["stat", "routine", "off-peak"] = "routine"
    completeness: _CompletenessSpec = _CompletenessSpec()
    execution: _ExecutionSpec = _ExecutionSpec()
    stop: bool = False
    final: bool = False


_RULE_KEYS = ("name", "description", "when", *(k for k in _RuleSpec.model_fields if k not in ("name", "description")))
_SECTION_KEYS = {"completeness": tuple(_CompletenessSpec.model_fields), "execution": tuple(_ExecutionSpec.model_fields)}
"""The keys of the rule keys that are mappings themselves."""


def _uid_names() -> dict[str, str]:
    """UID by registry name and by keyword; current entries win over retired ones of the same name."""
    table: dict[str, str] = {}
    retired_first = sorted(UID_dictionary.items(), key=lambda entry: entry[1][3] == "")
    for uid, (name, _kind, _info, _retired, keyword) in retired_first:
        for label in (name, keyword):
            if label:
                table[label] = uid
    return table


_UID_BY_NAME = _uid_names()


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


class _Parser:
    """Turns the line-annotated YAML data of one file into a RuleSet, raising RuleError at the first mistake."""

    def __init__(self, path: str, known_pipelines: Collection[str] | None,
                 known_destinations: Collection[str] | None, execution_modes: Collection[str] | None) -> None:
        self.path = path
        self.known_pipelines, self.known_destinations = known_pipelines, known_destinations
        self.execution_modes = execution_modes

    def error(self, line: int | None, reason: str) -> RuleError:
        return RuleError(self.path, line, reason)

    def rule_set(self, data: Any) -> RuleSet:
        if not isinstance(data, _LineDict):
            line = data.line if isinstance(data, _LineList) else 1
            raise self.error(line, "expected a mapping with 'rules:' at the top level")
        for key in data:
            if key != "rules":
                raise self.error(data.key_lines[key], f"unknown top-level key '{key}'; expected 'rules'")
        rules = data.get("rules")
        if not isinstance(rules, _LineList) or not rules:
            raise self.error(data.value_lines.get("rules", data.line), "'rules' must be a non-empty list of rules")
        parsed: list[Rule] = []
        for item, line in zip(rules, rules.item_lines, strict=True):
            rule = self.rule(item, line)
            if any(r.name == rule.name for r in parsed):
                raise self.error(item.value_lines["name"], f"duplicate rule name '{rule.name}'")
            parsed.append(rule)
        return RuleSet(tuple(parsed), self.path)

    def rule(self, node: Any, line: int) -> Rule:
        if not isinstance(node, _LineDict):
            raise self.error(line, "a rule must be a mapping with name, when and actions")
        name = node.get("name")
        label = f"rule '{name}'" if isinstance(name, str) and name else "rule"
        try:
            spec = _RuleSpec.model_validate({k: v for k, v in node.items() if k != "when"})
        except ValidationError as e:
            raise self._pydantic_error(node, e, label) from None
        if "when" not in node:
            raise self.error(node.line, f"{label}: missing 'when' (the condition)")
        if spec.discard and (spec.pipelines or spec.forward):
            raise self.error(node.key_lines["discard"],
                             f"{label}: 'discard' cannot be combined with pipelines or forward")
        modifiers = {"priority", "completeness", "execution"}
        if not (spec.discard or spec.pipelines or spec.forward or modifiers & node.keys()):
            raise self.error(node.line, f"{label}: no action; give pipelines, forward, discard, priority, "
                                        "completeness or execution")
        self._check_names(node, "pipelines", self.known_pipelines, "pipeline", label)
        self._check_names(node, "forward", self.known_destinations, "destination", label)
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
        return Rule(
            name=spec.name, description=spec.description.strip(), condition=condition,
            pipelines=tuple(dict.fromkeys(spec.pipelines)), forward=tuple(dict.fromkeys(spec.forward)),
            discard=spec.discard, priority=Priority(spec.priority),
            completeness=Completeness(c.study_idle_seconds, c.series_grace_seconds,
                                      LateInstances(c.late_instances) if c.late_instances else None),
            execution=Execution(ExecutionMode(x.mode) if x.mode else None, x.timeout_seconds),
            stop=spec.stop or spec.final, line=node.line,
        )

    def _check_names(self, node: _LineDict, key: str, known: Collection[str] | None, what: str, label: str) -> None:
        if known is None or key not in node:
            return
        for name, line in zip(node[key], node[key].item_lines, strict=True):
            if name not in known:
                listing = ", ".join(sorted(known)) or "none"
                raise self.error(line, f"{label}: unknown {what} '{name}' (known: {listing})")

    def _pydantic_error(self, node: _LineDict, e: ValidationError, label: str) -> RuleError:
        err = e.errors()[0]
        loc = err["loc"]
        line, here = node.line, node
        for i, part in enumerate(loc):
            if isinstance(here, _LineDict) and isinstance(part, str) and part in here:
                last_key = i == len(loc) - 1 and err["type"] == "extra_forbidden"
                line = here.key_lines[part] if last_key else here.value_lines[part]
                here = here[part]
            elif isinstance(here, _LineList) and isinstance(part, int) and part < len(here):
                line, here = here.item_lines[part], here[part]
            else:
                break
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        if err["type"] == "extra_forbidden":
            allowed = _RULE_KEYS if len(loc) == 1 else _SECTION_KEYS[str(loc[0])]
            return self.error(line, f"{label}: unknown key '{key}'{_suggest(str(loc[-1]), allowed)}; "
                                    f"expected one of: {', '.join(allowed)}")
        if err["type"] == "missing":
            return self.error(line, f"{label}: missing '{key}'")
        return self.error(line, f"{label}: '{key}': {err['msg']} (got {err.get('input')!r})")

    def condition(self, node: Any, line: int) -> Condition:
        """A ``when:`` mapping: each key is a field test or all/any/not; several keys must all match."""
        if not isinstance(node, _LineDict) or not node:
            raise self.error(line, "a condition must be a non-empty mapping of DICOM keywords, context fields, "
                                   "or all/any/not")
        parts = [self._entry(key, node[key], node.key_lines[key], node.value_lines[key]) for key in node]
        return parts[0] if len(parts) == 1 else All(tuple(parts), implicit=True)

    def _entry(self, key: str, value: Any, key_line: int, value_line: int) -> Condition:
        if key in ("all", "any"):
            if not isinstance(value, _LineList) or not value:
                raise self.error(value_line, f"'{key}' expects a non-empty list of conditions")
            children = tuple(self.condition(item, line) for item, line in zip(value, value.item_lines, strict=True))
            return All(children) if key == "all" else AnyOf(children)
        if key == "not":
            return Not(self.condition(value, value_line))
        f = self._field(key, key_line)
        if isinstance(value, _LineDict):
            if not value:
                raise self.error(value_line, f"{key}: empty operator mapping; expected one of: {', '.join(OPERATORS)}")
            tests = [self._operator(f, op, value[op], value.key_lines[op], value.value_lines[op]) for op in value]
            return tests[0] if len(tests) == 1 else All(tuple(tests), implicit=True)
        if isinstance(value, _LineList):
            raise self.error(value_line, f"{key}: a list needs an operator, e.g. {{in: [...]}}")
        return Equals(f, self._operand(f, value, value_line))

    def _field(self, name: str, line: int) -> _Field:
        if name in CONTEXT_FIELDS:
            return _Field(name, None, None)
        keyword = FIELD_ALIASES.get(name, name)
        if keyword not in keyword_dict:
            choices = [*keyword_dict, *CONTEXT_FIELDS, *FIELD_ALIASES, "all", "any", "not"]
            raise self.error(line, f"unknown DICOM keyword or field '{name}'{_suggest(name, choices)}")
        vr = dictionary_VR(keyword_dict[keyword])
        return _Field(name, keyword, vr)

    def _operand(self, f: _Field, value: Any, line: int) -> str | float:
        """A value to compare with: text, a number for numeric attributes, a UID (or its registry name)."""
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            shown = "nothing" if value is None else repr(value)
            raise self.error(line, f"{f.name}: expected text or a number, got {shown}"
                                   + ("; quote text such as 'ON' or 'NO'" if isinstance(value, bool) else ""))
        if f.vr == "SQ":
            raise self.error(line, f"{f.name} is a sequence; only 'exists' can test it")
        if f.numeric:
            if isinstance(value, str):
                raise self.error(line, f"{f.name} is numeric (VR {f.vr}); write the number unquoted, got {value!r}")
            return value
        if not isinstance(value, str):
            raise self.error(line, f"{f.name} is text; quote the value ({value!r})")
        if f.vr == "UI" and not _UID_TEXT.fullmatch(value):
            uid = _UID_BY_NAME.get(value)
            if uid is None:
                raise self.error(line, f"{f.name}: {value!r} is neither a UID nor a UID name from the DICOM "
                                       f"registry{_suggest(value, _UID_BY_NAME)}")
            return uid
        return value

    def _number(self, f: _Field, op: str, value: Any, line: int) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise self.error(line, f"{f.name}: '{op}' expects a number, got {value!r}")
        return value

    def _operator(self, f: _Field, op: str, value: Any, key_line: int, value_line: int) -> Condition:
        if op not in OPERATORS:
            raise self.error(key_line, f"{f.name}: unknown operator '{op}'{_suggest(op, OPERATORS)}; "
                                       f"expected one of: {', '.join(OPERATORS)}")
        if op == "exists":
            if not isinstance(value, bool):
                raise self.error(value_line, f"{f.name}: 'exists' expects true or false, got {value!r}")
            return Exists(f, value)
        if f.vr == "SQ":
            raise self.error(key_line, f"{f.name} is a sequence; only 'exists' can test it")
        if op == "equals":
            return Equals(f, self._operand(f, value, value_line))
        if op == "in":
            if not isinstance(value, _LineList) or not value:
                raise self.error(value_line, f"{f.name}: 'in' expects a non-empty list, got {value!r}")
            return OneOf(f, tuple(self._operand(f, v, line) for v, line in zip(value, value.item_lines, strict=True)))
        if op == "matches":
            if not isinstance(value, str):
                raise self.error(value_line, f"{f.name}: 'matches' expects a regular expression as text, got {value!r}")
            try:
                return Matches(f, re.compile(value))
            except re.error as e:
                reason = f"{f.name}: bad regular expression {value!r}: {e.msg} at position {e.pos}"
                raise self.error(value_line, reason) from None
        if op == "between":
            if not isinstance(value, _LineList) or len(value) != 2:
                raise self.error(value_line, f"{f.name}: 'between' expects [low, high], got {value!r}")
            low, high = (self._number(f, op, v, line) for v, line in zip(value, value.item_lines, strict=True))
            if low > high:
                raise self.error(value_line, f"{f.name}: 'between' low {low!r} is above high {high!r}")
            return Compare(f, op, (low, high))
        return Compare(f, op, (self._number(f, op, value, value_line),))


def parse_rules(text: str, source: str = "<rules>", known_pipelines: Collection[str] | None = None,
                known_destinations: Collection[str] | None = None,
                execution_modes: Collection[str] | None = None) -> RuleSet:
    """Parse rule-file text; ``source`` names it in errors. Pipelines, destinations and execution modes are
    checked against what the node has when given."""
    try:
        data = yaml.load(text, Loader=_LineLoader)  # a SafeLoader subclass: plain data only
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        refused = isinstance(e, (yaml.constructor.ConstructorError, yaml.composer.ComposerError))
        reason = ("" if refused else "not valid YAML: ") + (e.problem or e.context or "")
        raise RuleError(source, mark.line + 1 if mark else None, reason) from None
    except yaml.YAMLError as e:
        raise RuleError(source, None, f"not valid YAML: {e}") from None
    if data is None:
        raise RuleError(source, None, "empty rule file; expected 'rules:' with a list of rules")
    return _Parser(source, known_pipelines, known_destinations, execution_modes).rule_set(data)


def parse_condition(data: Any, source: str) -> Condition:
    """A ``when:`` condition given as plain data from elsewhere (e.g. a model's ``input.series``), checked
    exactly as in a rule file; a mistake is a RuleError ``SOURCE: reason`` (plain data has no lines)."""
    try:
        node = yaml.load(yaml.safe_dump(data), Loader=_LineLoader)  # re-read with the rule files' loader
    except yaml.YAMLError as e:
        raise RuleError(source, None, f"not a condition ({e})") from None
    try:
        return _Parser(source, None, None, None).condition(node, 1)
    except RuleError as e:
        raise RuleError(source, None, e.reason) from None


def condition_problem(condition: Condition, attributes: Dataset | Mapping[str, Any]) -> str | None:
    """Why ``attributes`` (a series' first instance) do not satisfy ``condition``, or None when they do."""
    verdict = condition.explain(_Subject(attributes, RoutingContext()))
    return None if verdict.matched else "; ".join(line.strip() for line in verdict.reasons)


def load_rules(path: str | Path, known_pipelines: Collection[str] | None = None,
               known_destinations: Collection[str] | None = None,
               execution_modes: Collection[str] | None = None) -> RuleSet:
    """Load and validate a rule file, raising RuleError (``FILE:LINE: reason``) on the first mistake."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RuleError(str(path), None, f"cannot read rule file ({getattr(e, 'strerror', None) or e})") from None
    return parse_rules(text, str(path), known_pipelines, known_destinations, execution_modes)


# --- command-line helpers ---------------------------------------------------------------------


def check_rules_file(path: str | Path, out: TextIO | None = None, *, known_pipelines: Collection[str] | None = None,
                     known_destinations: Collection[str] | None = None) -> int:
    """``radnode rules check``: 0 and a summary of the rules, or 1 and ``FILE:LINE: reason``."""
    out = out or sys.stdout
    try:
        rules = load_rules(path, known_pipelines, known_destinations)
    except RuleError as e:
        print(e, file=out)
        return 1
    print(f"{path}: {len(rules.rules)} rules OK", file=out)
    for rule in rules.rules:
        print(f"  line {rule.line}: {rule.name}: {rule.actions()}", file=out)
    return 0


@dataclass
class _SeriesHeaders:
    """Headers of one series' files, for ``rules test``."""

    datasets: list[Dataset] = field(default_factory=list)

    @cached_property
    def first(self) -> Dataset:
        """The instance with the lowest InstanceNumber: the one the rules see."""
        return min(self.datasets, key=lambda ds: _as_number(ds.get("InstanceNumber")) or math.inf)

    def describe(self, uid: str) -> str:
        ds = self.first
        text = str(ds.get("SeriesDescription", "") or "").strip()
        label = f"series {ds.get('SeriesNumber') or '?'}" + (f" '{text}'" if text else "")
        return f"{label} ({ds.get('Modality', '?')}, {len(self.datasets)} files) {uid}"


def _read_headers(target: Path) -> tuple[dict[str, _SeriesHeaders], int]:
    """Headers of the DICOM files under ``target`` grouped by SeriesInstanceUID, and how many files were skipped."""
    files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
    series: dict[str, _SeriesHeaders] = {}
    skipped = 0
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            skipped += 1
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            skipped += 1
            continue
        series.setdefault(uid, _SeriesHeaders()).datasets.append(ds)
    return series, skipped


def test_rules_on_path(rules_path: str | Path, target_path: str | Path, out: TextIO | None = None, *,
                       context: RoutingContext | None = None) -> int:
    """``radnode rules test``: for each series under ``target_path``, which rules match and why.

    Returns 0, 1 when the rule file is refused, 2 when no DICOM series could be read.
    """
    out = out or sys.stdout
    try:
        rules = load_rules(rules_path)
    except RuleError as e:
        print(e, file=out)
        return 1
    target = Path(target_path)
    if not target.exists():
        print(f"{target}: no such file or folder", file=out)
        return 2
    series, skipped = _read_headers(target)
    print(f"{target}: {len(series)} series" + (f", {skipped} files skipped (not DICOM or no series UID)"
                                                if skipped else ""), file=out)
    if not series:
        return 2
    for uid, headers in sorted(series.items(), key=lambda s: (_as_number(s[1].first.get("SeriesNumber")) or 0, s[0])):
        print(f"\n{headers.describe(uid)}", file=out)
        for outcome in rules.evaluate(headers.first, context):
            status = "MATCH" if outcome.matched else "skip " if outcome.skipped_by else "no   "
            print(f"  {status} {outcome.rule}", file=out)
            for reason in outcome.reasons:
                print(f"        {reason}", file=out)
        print(f"  => {rules.route(headers.first, context).describe()}", file=out)
    return 0


test_rules_on_path.__test__ = False  # type: ignore[attr-defined]  # a CLI helper, not a pytest test


def pipelines_for_folder(rules: RuleSet, folder: str | Path,
                         context: RoutingContext | None = None) -> tuple[list[str], list[str]]:
    """The pipelines the rules choose for the series under ``folder`` (most urgent first), and per series why.

    Backs ``radnode run`` without ``--pipeline``: the same decision the node would take on receipt.
    """
    series, _ = _read_headers(Path(folder))
    chosen: dict[str, int] = {}
    reasons: list[str] = []
    for uid, headers in series.items():
        decision = rules.route(headers.first, context)
        reasons.append(f"{headers.describe(uid)}: {decision.describe()}")
        if not decision.discard:
            for name in decision.pipelines:
                chosen[name] = max(chosen.get(name, 0), decision.priority.rank)
    return sorted(chosen, key=lambda name: -chosen[name]), reasons
