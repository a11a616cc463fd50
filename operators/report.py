"""Operator that writes the report: structured findings → verified text → SR, PDF, text and FHIR Bundle.

It takes the place of the plain FHIR writer in an app: the Bundle it writes carries, besides the
measurement Observations, the DiagnosticReport conclusion (the Impression), the coded findings and the
report as text/plain and PDF. Which backend writes the text comes from the node configuration.
"""

from __future__ import annotations

import logging

from holoscan.core import ExecutionContext, InputContext, OperatorSpec, OutputContext

from radnode.config import ReportConfig
from radnode.execution import run_state, timed_phase
from radnode.operators.result_writers import _write_atomically, _WriterOperator
from radnode.outputs.fhir import build_report_bundle, bundle_to_json
from radnode.outputs.layout import RunOutput
from radnode.report.findings import structured_findings
from radnode.report.generate import generate_report
from radnode.report.pdf import report_pdf
from radnode.report.sr import build_text_report

log = logging.getLogger(__name__)


class ReportWriterOperator(_WriterOperator):
    """Writes the report text (plain, PDF, Comprehensive SR) and the FHIR Bundle with conclusion and forms."""

    def __init__(self, fragment, *args, report_config: ReportConfig, **kwargs):
        self.report_config = report_config
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.input("result")
        spec.input("sr")

    @timed_phase("write_report_fhir")
    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        volume = op_input.receive("volume")
        result = op_input.receive("result")
        sr = op_input.receive("sr")
        findings = structured_findings(result, volume.modality)
        report = generate_report(findings, self.report_config)
        for rejection in report.removed:
            log.warning("report: verifier removed %r (%s)", rejection.sentence, rejection.reason)
        if report.fallback_reason:
            log.warning("report: %s backend not used, template text released: %s", report.requested_backend,
                        report.fallback_reason)
        text = report.text()
        pdf = report_pdf(report, f"{volume.study.get('StudyDescription', 'Imaging study')} - AI preliminary report")
        out = self.output_folder
        _write_atomically(out / RunOutput.REPORT_TEXT.file, lambda p: p.write_text(text))
        _write_atomically(out / RunOutput.REPORT_PDF.file, lambda p: p.write_bytes(pdf))
        text_sr = build_text_report(volume, sr, report, self.algorithm, uid_root=self.uid_root,
                                    series_number=RunOutput.REPORT_SR.series_number)
        _write_atomically(out / RunOutput.REPORT_SR.file, text_sr.save_as)
        codes = [{"value": f.code.value, "scheme_designator": f.code.scheme, "meaning": f.code.meaning}
                 for f in findings.present]
        bundle = build_report_bundle(volume, result, sr, self.algorithm, conclusion=report.conclusion,
                                     conclusion_codes=list({c["value"]: c for c in codes}.values()),
                                     presented_forms=[
                                         (RunOutput.REPORT_TEXT.value.media_type, text.encode(), "Report (text)"),
                                         (RunOutput.REPORT_PDF.value.media_type, pdf, "Report (PDF)")])
        _write_atomically(out / RunOutput.FHIR_BUNDLE.file, lambda p: p.write_text(bundle_to_json(bundle)))
        run_state(self.fragment).record_review(result)  # the manifest's review is the one this report states
        log.info("wrote %s (%s)", ", ".join(o.file for o in (RunOutput.REPORT_TEXT, RunOutput.REPORT_PDF,
                                                               RunOutput.REPORT_SR, RunOutput.FHIR_BUNDLE)),
                 report.generator)
