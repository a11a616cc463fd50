"""From structured findings to the released report: template, optional model rewrite, verification, fallback.

The template text is always built first. With a model backend each section is rewritten, every sentence
verified, unsupported ones removed (logged with the sentence and reason); if the model is unavailable,
or what remains drops a present finding from the Impression or leaves a section empty, the template text
is released instead and the report says so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import radnode
from radnode.config import ReportConfig
from radnode.report.findings import StructuredFindings
from radnode.report.llm import ModelUnavailable, OpenAIEndpoint, TextRewriter, load_local_model
from radnode.report.template import ReportText, limitations, template_report
from radnode.report.verify import Rejection, missing_from_impression, split_sentences, verify_sentences

log = logging.getLogger(__name__)

TEMPLATE_GENERATOR = f"radnode report template {radnode.__version__}"


@dataclass
class Report:
    """The released report text and how it was produced."""

    findings: list[str]
    impression: list[str]
    limitations: list[str]
    algorithms: list[tuple[str, str]]
    requested_backend: str
    generator: str
    """What wrote the released sentences: the template, or the model and the verifier."""
    fallback_reason: str | None = None
    removed: list[Rejection] = field(default_factory=list)
    seconds: float = 0.0
    header: list[str] = field(default_factory=list)
    """Who and what the report is about (patient, accession, study date, series analysed): it opens every
    form of the report, so a page detached from its study still says whose it is."""

    @property
    def disclaimer(self) -> str:
        fallback = f" The {self.requested_backend} language model was not used: {self.fallback_reason}." \
            if self.fallback_reason else ""
        return f"AI-generated preliminary report, not reviewed by a radiologist.{fallback}"

    @property
    def opening(self) -> list[str]:
        """The header lines and the algorithms (with versions) that produced the numbers and the text."""
        made_by = "; ".join(f"{name} {version}" for name, version in self.algorithms)
        return [*self.header, f"Produced by: {made_by} (measurements); {self.generator} (text)"]

    @property
    def conclusion(self) -> str:
        """The Impression as one paragraph (FHIR DiagnosticReport.conclusion)."""
        return " ".join(self.impression)

    def text(self) -> str:
        """Plain text: the header, FINDINGS, IMPRESSION, LIMITATIONS and the AI disclaimer."""
        parts = [*self.opening, "", "FINDINGS:", *self.findings, "", "IMPRESSION:", *self.impression]
        if self.limitations:
            parts += ["", "LIMITATIONS:", *self.limitations]
        return "\n".join([*parts, "", self.disclaimer]) + "\n"


def make_rewriter(config: ReportConfig) -> TextRewriter | None:
    """The configured model backend (None for the template); raises ModelUnavailable if it cannot be used."""
    if config.backend == "template":
        return None
    if config.backend == "local":
        return load_local_model(config.model_path, config.max_new_tokens)
    if not config.url:
        raise ModelUnavailable("report backend 'openai' needs report.url")
    return OpenAIEndpoint(config.url, config.model, config.timeout_seconds, config.max_new_tokens)


def _rewrite(draft: ReportText, findings: StructuredFindings,
             rewriter: TextRewriter) -> tuple[ReportText | None, list[Rejection], str | None]:
    """Model rewrite of both sections, verified: (text or None to fall back, removals, fallback reason)."""
    removed: list[Rejection] = []
    sections: dict[str, list[str]] = {}
    for section, sentences in (("findings", draft.findings), ("impression", draft.impression)):
        verified = verify_sentences(split_sentences(rewriter.rewrite(section, "\n".join(sentences))), findings)
        for rejection in verified.removed:
            log.warning("report verifier removed a %s sentence: %r (%s)", section, rejection.sentence,
                        rejection.reason)
        removed += verified.removed
        if not verified.kept:
            return None, removed, f"no {section} sentence of the model passed verification"
        sections[section] = verified.kept
    missing = missing_from_impression(sections["impression"], findings)
    if missing:
        names = ", ".join(f"{f.finding} ({f.quantity.structure_label.lower()})" for f in missing)
        return None, removed, f"the verified impression omits {names}"
    return ReportText(sections["findings"], sections["impression"]), removed, None


def generate_report(findings: StructuredFindings, config: ReportConfig,
                    rewriter: TextRewriter | None = None) -> Report:
    """The report for ``findings`` with the configured backend (``rewriter`` overrides building one)."""
    start = time.perf_counter()
    draft = template_report(findings)
    template_check = verify_sentences(draft.findings + draft.impression, findings)
    if template_check.removed:  # the template states only findings; a removal here is a bug, never released
        raise RuntimeError(f"template sentence failed verification: {template_check.removed[0]}")
    report = Report(draft.findings, draft.impression, limitations(findings), findings.algorithms,
                    config.backend, TEMPLATE_GENERATOR,
                    header=findings.identity.header_lines() if findings.identity is not None else [])
    if config.backend != "template":
        try:
            rewriter = rewriter or make_rewriter(config)
            text, report.removed, report.fallback_reason = _rewrite(draft, findings, rewriter)
        except ModelUnavailable as e:
            text, report.fallback_reason = None, str(e)
        if text is None:
            log.warning("report falls back to the template: %s", report.fallback_reason)
        else:
            report.findings, report.impression = text.findings, text.impression
            report.generator = f"{rewriter.name} ({config.backend}), checked against the measurements by " \
                               f"the radnode verifier {radnode.__version__}"
    report.seconds = time.perf_counter() - start
    return report
