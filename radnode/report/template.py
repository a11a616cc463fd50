"""The deterministic report text: Findings and Impression from structured findings, plus fixed limitations.

This is the default and the fallback of every model path: each sentence is built from one quantity or
finding, so it states exactly what was measured and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from radnode.report.findings import Finding, StructuredFindings


@dataclass
class ReportText:
    """The two sections a model may rephrase, as lists of sentences."""

    findings: list[str]
    impression: list[str]


def _finding_sentence(finding: Finding) -> str:
    q = finding.quantity
    state = finding.finding if finding.present else f"no {finding.finding}"
    return f"{q.structure_label}: {state} ({q.text()}, reference {finding.reference.limit_text(finding.limit)})."


def _impression_sentence(finding: Finding) -> str:
    q = finding.quantity
    where = f" of the {q.structure_label.lower()}" if q.laterality else ""
    return f"{finding.finding.capitalize()}{where} ({q.text()})."


def template_report(findings: StructuredFindings) -> ReportText:
    """Findings: one sentence per structure's quantities and per reference-range comparison.
    Impression: every present finding, then each assessed finding that is absent everywhere."""
    sentences: list[str] = []
    by_structure: dict[str, list[str]] = {}
    for q in findings.quantities:
        by_structure.setdefault(q.structure_key, []).append(q.text())
    for key, texts in by_structure.items():
        sentences.append(f"{findings.structures[key].label}: {', '.join(texts)}.")
    sentences += [_finding_sentence(f) for f in findings.findings]

    impression = [_impression_sentence(f) for f in findings.present]
    present_names = {f.finding for f in findings.present}
    for name in dict.fromkeys(f.finding for f in findings.findings):
        if name not in present_names:
            impression.append(f"No {name}.")
    if not findings.present:
        impression.insert(0, "No abnormality among the assessed measurements.")
    return ReportText(sentences, impression)


def limitations(findings: StructuredFindings) -> list[str]:
    """Fixed sentences on what was not assessed and on segmentation uncertainty (never model-rewritten)."""
    lines = [f"Not assessed: {n.what}: {n.reason}." for n in findings.not_assessed]
    lines += [f"Caution: {flag}." for flag in findings.flags]
    return lines
