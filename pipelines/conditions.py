"""The condition language of rule files (``when:``) and the line-aware YAML loader that reads them.

A condition is plain YAML data (read with a safe loader that refuses tags, aliases and duplicate keys and
remembers the line of every key and value) parsed into a tree of small condition objects; nothing in it is
ever executed. Every mistake is refused with ``FILE:LINE: reason``. Used by the routing rules
(``rules.py``), a model's ``input.series`` (``radnode/models/spec.py``) and ``model_seg``'s series selection.
The language is described in ``docs/rules.md``.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import yaml
from pydicom import Dataset
from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.multival import MultiValue

from radnode.pipelines.routing import RoutingContext

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



# --- YAML with line numbers -------------------------------------------------------------------


class LineDict(dict[str, Any]):
    """A YAML mapping that remembers the line of itself, of each key and of each value (1-based)."""

    line: int
    key_lines: dict[str, int]
    value_lines: dict[str, int]


class LineList(list[Any]):
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


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    result = LineDict()
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


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(item, deep=True) for item in node.value)
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


class Subject:
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


def as_number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _equal(value: Any, operand: str | float) -> bool:
    if not isinstance(operand, str):
        return as_number(value) == operand
    return str(value).strip() == operand


# --- the condition tree -----------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Whether a condition matched, and one human-readable line per test (nested ones indented)."""

    matched: bool
    reasons: tuple[str, ...]


class Condition(Protocol):
    """A node of a parsed ``when:`` tree."""

    def explain(self, subject: Subject) -> Verdict: ...

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

    def explain(self, subject: Subject) -> Verdict:
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

    def explain(self, subject: Subject) -> Verdict:
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

    def explain(self, subject: Subject) -> Verdict:
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
        number = as_number(value)
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

    def explain(self, subject: Subject) -> Verdict:
        values = subject.values(self.field)
        if not values:
            return Verdict(False, (f"{self.field.name} absent, not {self._phrase()}",))
        hit = next((v for v in values if self._holds(v)), None)
        if hit is not None:
            return Verdict(True, (f"{self.field.name} {_show(hit, self.field)} {self._phrase()}",))
        if all(as_number(v) is None for v in values):
            return Verdict(False, (f"{self.field.name} {_show_all(values, self.field)} is not a number",))
        return Verdict(False, (f"{self.field.name} {_show_all(values, self.field)} not {self._phrase()}",))


@dataclass(frozen=True)
class Exists(_FieldTest):
    """The field is present with a non-empty value (``expected`` true) or absent/empty (false)."""

    expected: bool

    def explain(self, subject: Subject) -> Verdict:
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

    def explain(self, subject: Subject) -> Verdict:
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

    def explain(self, subject: Subject) -> Verdict:
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

    def explain(self, subject: Subject) -> Verdict:
        inner = self.child.explain(subject)
        head = "not: the condition below matched" if inner.matched else "not: the condition below did not match"
        return Verdict(not inner.matched, (head, *_indent([inner])))

    def keywords(self) -> Iterable[str]:
        return self.child.keywords()


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


def suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def load_yaml_lines(text: str, source: str) -> Any:
    """Plain data from YAML text, mappings and sequences annotated with their lines (``LineDict``,
    ``LineList``); a YAML mistake or a refused construct is a RuleError ``SOURCE:LINE: reason``."""
    try:
        return yaml.load(text, Loader=_LineLoader)  # a SafeLoader subclass: plain data only
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        refused = isinstance(e, (yaml.constructor.ConstructorError, yaml.composer.ComposerError))
        reason = ("" if refused else "not valid YAML: ") + (e.problem or e.context or "")
        raise RuleError(source, mark.line + 1 if mark else None, reason) from None
    except yaml.YAMLError as e:
        raise RuleError(source, None, f"not valid YAML: {e}") from None


class ConditionParser:
    """Turns line-annotated YAML data into a condition tree, raising RuleError at the first mistake."""

    def __init__(self, path: str) -> None:
        self.path = path

    def error(self, line: int | None, reason: str) -> RuleError:
        return RuleError(self.path, line, reason)

    def condition(self, node: Any, line: int) -> Condition:
        """A ``when:`` mapping: each key is a field test or all/any/not; several keys must all match."""
        if not isinstance(node, LineDict) or not node:
            raise self.error(line, "a condition must be a non-empty mapping of DICOM keywords, context fields, "
                                   "or all/any/not")
        parts = [self._entry(key, node[key], node.key_lines[key], node.value_lines[key]) for key in node]
        return parts[0] if len(parts) == 1 else All(tuple(parts), implicit=True)

    def _entry(self, key: str, value: Any, key_line: int, value_line: int) -> Condition:
        if key in ("all", "any"):
            if not isinstance(value, LineList) or not value:
                raise self.error(value_line, f"'{key}' expects a non-empty list of conditions")
            children = tuple(self.condition(item, line) for item, line in zip(value, value.item_lines, strict=True))
            return All(children) if key == "all" else AnyOf(children)
        if key == "not":
            return Not(self.condition(value, value_line))
        f = self._field(key, key_line)
        if isinstance(value, LineDict):
            if not value:
                raise self.error(value_line, f"{key}: empty operator mapping; expected one of: {', '.join(OPERATORS)}")
            tests = [self._operator(f, op, value[op], value.key_lines[op], value.value_lines[op]) for op in value]
            return tests[0] if len(tests) == 1 else All(tuple(tests), implicit=True)
        if isinstance(value, LineList):
            raise self.error(value_line, f"{key}: a list needs an operator, e.g. {{in: [...]}}")
        return Equals(f, self._operand(f, value, value_line))

    def _field(self, name: str, line: int) -> _Field:
        if name in CONTEXT_FIELDS:
            return _Field(name, None, None)
        keyword = FIELD_ALIASES.get(name, name)
        if keyword not in keyword_dict:
            choices = [*keyword_dict, *CONTEXT_FIELDS, *FIELD_ALIASES, "all", "any", "not"]
            raise self.error(line, f"unknown DICOM keyword or field '{name}'{suggest(name, choices)}")
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
                                       f"registry{suggest(value, _UID_BY_NAME)}")
            return uid
        return value

    def _number(self, f: _Field, op: str, value: Any, line: int) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise self.error(line, f"{f.name}: '{op}' expects a number, got {value!r}")
        return value

    def _operator(self, f: _Field, op: str, value: Any, key_line: int, value_line: int) -> Condition:
        if op not in OPERATORS:
            raise self.error(key_line, f"{f.name}: unknown operator '{op}'{suggest(op, OPERATORS)}; "
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
            if not isinstance(value, LineList) or not value:
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
            if not isinstance(value, LineList) or len(value) != 2:
                raise self.error(value_line, f"{f.name}: 'between' expects [low, high], got {value!r}")
            low, high = (self._number(f, op, v, line) for v, line in zip(value, value.item_lines, strict=True))
            if low > high:
                raise self.error(value_line, f"{f.name}: 'between' low {low!r} is above high {high!r}")
            return Compare(f, op, (low, high))
        return Compare(f, op, (self._number(f, op, value, value_line),))


def parse_condition(data: Any, source: str) -> Condition:
    """A ``when:`` condition given as plain data from elsewhere (e.g. a model's ``input.series``), checked
    exactly as in a rule file; a mistake is a RuleError ``SOURCE: reason`` (plain data has no lines)."""
    try:
        node = yaml.load(yaml.safe_dump(data), Loader=_LineLoader)  # re-read with the rule files' loader
    except yaml.YAMLError as e:
        raise RuleError(source, None, f"not a condition ({e})") from None
    try:
        return ConditionParser(source).condition(node, 1)
    except RuleError as e:
        raise RuleError(source, None, e.reason) from None


def condition_problem(condition: Condition, attributes: Dataset | Mapping[str, Any]) -> str | None:
    """Why ``attributes`` (a series' first instance) do not satisfy ``condition``, or None when they do."""
    verdict = condition.explain(Subject(attributes, RoutingContext()))
    return None if verdict.matched else "; ".join(line.strip() for line in verdict.reasons)

