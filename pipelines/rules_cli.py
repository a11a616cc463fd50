"""The rule files' command-line helpers: ``radnode rules check``, ``radnode rules test`` and the routing
``radnode run`` does without ``--pipeline`` (the decision the node would take on receipt)."""

from __future__ import annotations

import math
import sys
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TextIO

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from radnode.pipelines.conditions import RuleError, as_number
from radnode.pipelines.routing import RoutingContext
from radnode.pipelines.rules import RuleSet, load_rules


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
        print(f"  line {rule.line}: {rule.name}: {rule.describe_actions()}", file=out)
    return 0


@dataclass
class _SeriesHeaders:
    """Headers of one series' files, for ``rules test``."""

    datasets: list[Dataset] = field(default_factory=list)

    @cached_property
    def first(self) -> Dataset:
        """The instance with the lowest InstanceNumber: the one the rules see."""
        return min(self.datasets, key=lambda ds: as_number(ds.get("InstanceNumber")) or math.inf)

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
    for uid, headers in sorted(series.items(), key=lambda s: (as_number(s[1].first.get("SeriesNumber")) or 0, s[0])):
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
