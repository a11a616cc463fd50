"""Checks a de-identified object against DICOM PS3.15 Table E.1-1 itself (``standard/``), not against the
library that did the work: every attribute the table says the profile removes, empties or replaces (X, Z, D,
U and their combinations) must no longer hold any of the values it had in the original, at any level of
nesting; private attributes must be gone. An option's K column lets an attribute keep its value; its C
column (clean) asks for a changed value like D, except for the descriptors Clean Descriptors keeps when they
hold no identifying value, which this check cannot judge and so leaves to that option.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources

from pydicom.dataset import Dataset

OPTION_COLUMNS = {"retain_longitudinal_modified_dates": "rtnLongModifDatesOpt",
                  "retain_patient_characteristics": "rtnPatCharsOpt", "clean_descriptors": "cleanDescOpt"}
"""Each option's column in the standard's table (K keep, C clean)."""


@lru_cache(maxsize=1)
def standard_table() -> list[dict[str, str]]:
    """PS3.15 Table E.1-1 as published (see ``standard/SOURCES.md``), one row per attribute; the row for
    private attributes ("(GGGG,EEEE) WHERE GGGG IS ODD", X) is left out: it is checked on its own."""
    table = resources.files("radnode.security").joinpath("standard", "confidentiality_profile_attributes.json")
    return [row for row in json.loads(table.read_text()) if "ODD" not in row["tag"]]


TagPattern = tuple[int, int, int, int]
"""(group, element, group mask, element mask): ``(50xx,xxxx)`` is ``(0x5000, 0, 0xFF00, 0)``."""


def tag_pattern(text: str) -> TagPattern:
    """``(0010,0010)`` or ``(60xx,4000)`` as a :data:`TagPattern`."""
    group, element = text.strip("()").split(",")

    def part(p: str) -> tuple[int, int]:
        return int(p.replace("x", "0").replace("X", "0"), 16), int("".join("0" if c in "xX" else "F" for c in p), 16)

    (g, gm), (e, em) = part(group), part(element)
    return g, e, gm, em


def matches(pattern: TagPattern, group: int, element: int) -> bool:
    g, e, gm, em = pattern
    return group & gm == g & gm and element & em == e & em


def option_tags(options: Iterable[str], value: str) -> list[TagPattern]:
    """The table's attributes whose column for one of ``options`` holds ``value`` (``K`` or ``C``)."""
    columns = [OPTION_COLUMNS[o] for o in options]
    return [tag_pattern(row["tag"]) for row in standard_table() if any(row.get(c) == value for c in columns)]



CHANGED_ACTIONS = {"X", "Z", "D", "U", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"}


def _values(ds: Dataset) -> dict[tuple[int, int], set[str]]:
    """Every non-empty value of every element, at every depth, by tag (sequences by their items' values)."""
    found: dict[tuple[int, int], set[str]] = defaultdict(set)

    def visit(dataset: Dataset) -> None:
        for elem in dataset:
            if elem.VR == "SQ":
                for item in elem.value or ():
                    visit(item)
                continue
            value = elem.value
            if value in (None, "", b""):
                continue
            texts = [str(v) for v in value] if elem.VM > 1 else [str(value)]
            found[(elem.tag.group, elem.tag.element)].update(t for t in texts if t.strip())

    visit(ds)
    return found


def remaining_original_values(original: Dataset, deidentified: Dataset, options: Iterable[str] = ()) -> list[str]:
    """The table's attributes that still hold an original value, and private attributes left (empty: none)."""
    options = list(options)
    kept = option_tags(options, "K") + (option_tags(["clean_descriptors"], "C") if "clean_descriptors" in options
                                        else [])
    if "retain_longitudinal_modified_dates" in options:
        kept += [p for p in option_tags(["retain_longitudinal_modified_dates"], "C")]  # TM kept, dates checked below
    rules: list[tuple[TagPattern, str]] = [(tag_pattern(row["tag"]), row["name"]) for row in standard_table()
                                           if row["basicProfile"] in CHANGED_ACTIONS]
    before, after = _values(original), _values(deidentified)
    problems = []
    for tag, values in before.items():
        if tag[0] % 2:
            continue
        rule = next((name for pattern, name in rules if matches(pattern, *tag)), None)
        if rule is None or any(matches(k, *tag) for k in kept):
            continue
        left = values & after.get(tag, set())
        if left:
            problems.append(f"({tag[0]:04X},{tag[1]:04X}) {rule} still holds {sorted(left)[:3]}")
    if "retain_longitudinal_modified_dates" in options:
        for pattern in option_tags(["retain_longitudinal_modified_dates"], "C"):
            for tag, values in before.items():
                if matches(pattern, *tag) and any(len(v) >= 8 and v[:8].isdigit() for v in values):
                    dates = {v for v in values if len(v) >= 8 and v[:8].isdigit()}
                    if dates & after.get(tag, set()):
                        problems.append(f"({tag[0]:04X},{tag[1]:04X}) date not shifted")
    private = sorted({f"({t[0]:04X},{t[1]:04X})" for t in after if t[0] % 2})
    if private:
        problems.append(f"private attributes left: {', '.join(private[:5])}")
    return problems
