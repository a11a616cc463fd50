"""The report stage every pipeline ends with: structured findings → verified text → report SR, text, PDF,
Encapsulated PDF and the FHIR Bundle, plus :func:`add_result_writers`, the one output stage of every app.

The Bundle carries, besides the measurement Observations, the DiagnosticReport conclusion (the Impression),
the coded findings with their reference ranges and the report as text/plain and PDF. Which backend writes
the text comes from the node configuration. What the study lacked (patient data, identifier systems) is
recorded as the run's warnings: the outputs degrade, they are never dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path

from holoscan.core import Application, ExecutionContext, InputContext, Operator, OperatorSpec, OutputContext

from radnode.config import FhirConfig, ReportConfig
from radnode.execution import is_reissue, run_state, timed_phase
from radnode.imaging.identity import SeriesDescription, StudyIdentity
from radnode.imaging.volume import Volume
from radnode.operators.result_writers import (
    MeasurementReportWriterOperator,
    SegmentationWriterOperator,
    _write_atomically,
    _WriterOperator,
)
from radnode.operators.uncertainty import UncertaintyMapWriterOperator
from radnode.outputs.algorithm import AlgorithmInfo
from radnode.outputs.encapsulated_pdf import build_encapsulated_pdf
from radnode.outputs.fhir import ReportContent, build_report_bundle, bundle_to_json, identifier_systems
from radnode.outputs.layout import RunOutput
from radnode.report.findings import structured_findings
from radnode.report.generate import generate_report
from radnode.report.pdf import report_pdf
from radnode.report.sr import build_text_report

log = logging.getLogger(__name__)

REPORT_OUTPUTS = (RunOutput.REPORT_TEXT, RunOutput.REPORT_PDF, RunOutput.REPORT_SR, RunOutput.REPORT_PDF_DICOM,
                  RunOutput.FHIR_BUNDLE)
"""What the report stage writes."""


def study_identity(volume: Volume) -> StudyIdentity:
    """The patient and study of ``volume``, with the analysed series, as the report header names them."""
    first = volume.study
    number = first.get("SeriesNumber")
    series = SeriesDescription(str(first.SeriesInstanceUID), int(number) if number not in (None, "") else None,
                               str(first.get("SeriesDescription", "") or "").strip(), volume.modality,
                               len(volume.source))
    return StudyIdentity.from_dataset(first, [series])


class ReportWriterOperator(_WriterOperator):
    """Writes the report (text, PDF, Comprehensive SR, Encapsulated PDF) and the FHIR Bundle with conclusion,
    reference ranges and forms; records the review decision and the warnings in the run's manifest."""

    def __init__(self, fragment, *args, report_config: ReportConfig, fhir_config: FhirConfig,
                 with_parametric_map: bool = False, **kwargs):
        self.report_config = report_config
        self.fhir_config = fhir_config
        self.with_parametric_map = with_parametric_map
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.input("result")
        spec.input("seg")
        spec.input("sr")
        if self.with_parametric_map:
            spec.input("pmap")

    @timed_phase("write_report_fhir")
    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        volume = op_input.receive("volume")
        result = op_input.receive("result")
        seg = op_input.receive("seg")
        sr = op_input.receive("sr")
        pmap = op_input.receive("pmap") if self.with_parametric_map else None
        state = run_state(self.fragment)
        identity = study_identity(volume)
        for problem in identity.problems:
            state.record_warning(problem)
        findings = structured_findings(result, volume.modality, identity=identity,
                                       contrast_agent=str(volume.study.get("ContrastBolusAgent", "") or ""))
        report = generate_report(findings, self.report_config)
        for rejection in report.removed:
            log.warning("report: verifier removed %r (%s)", rejection.sentence, rejection.reason)
        if report.fallback_reason:
            log.warning("report: %s backend not used, template text released: %s", report.requested_backend,
                        report.fallback_reason)
        text = report.text()
        title = f"{identity.study_description or 'Imaging study'} - AI preliminary report"
        pdf = report_pdf(report, title)
        out = self.output_folder
        _write_atomically(out / RunOutput.REPORT_TEXT.file, lambda p: p.write_text(text))
        _write_atomically(out / RunOutput.REPORT_PDF.file, lambda p: p.write_bytes(pdf))
        text_sr = build_text_report(volume, sr, report, self.algorithm, uid_root=self.uid_root,
                                    series_number=RunOutput.REPORT_SR.series_number)
        _write_atomically(out / RunOutput.REPORT_SR.file, text_sr.save_as)
        pdf_dicom = build_encapsulated_pdf(volume, pdf, title, text_sr, self.algorithm, uid_root=self.uid_root,
                                           series_number=RunOutput.REPORT_PDF_DICOM.series_number)
        _write_atomically(out / RunOutput.REPORT_PDF_DICOM.file,
                          lambda p: pdf_dicom.save_as(p, enforce_file_format=True))

        *_, system_warnings = identifier_systems(volume.study, self.fhir_config, self.uid_root)
        for warning in system_warnings:
            state.record_warning(warning)
        codes = [{"value": f.code.value, "scheme_designator": f.code.scheme, "meaning": f.code.meaning}
                 for f in findings.present]
        content = ReportContent(findings=findings, conclusion=report.conclusion,
                                conclusion_codes=list({c["value"]: c for c in codes}.values()),
                                presented_forms=[
                                    (RunOutput.REPORT_TEXT.value.media_type, text.encode(), "Report (text)"),
                                    (RunOutput.REPORT_PDF.value.media_type, pdf, "Report (PDF)")])
        bundle = build_report_bundle(volume, result, sr, self.algorithm, uid_root=self.uid_root, content=content,
                                     fhir=self.fhir_config, reissue=is_reissue(),
                                     result_instances=[seg, sr, *([pmap] if pmap is not None else []),
                                                       text_sr, pdf_dicom])
        _write_atomically(out / RunOutput.FHIR_BUNDLE.file, lambda p: p.write_text(bundle_to_json(bundle)))
        state.record_review(result)  # the manifest's review decision is the one this DiagnosticReport states
        log.info("wrote %s (%s)", ", ".join(o.file for o in REPORT_OUTPUTS), report.generator)


def add_result_writers(app: Application, volume_source: Operator, result_source: Operator, *, output_folder: Path,
                       algorithm: AlgorithmInfo, uid_root: str, report_config: ReportConfig, fhir_config: FhirConfig,
                       uncertainty_map: bool = False, volume_port: str = "volume") -> None:
    """The output stage of every pipeline: DICOM SEG → (uncertainty Parametric Map →) TID 1500 SR → the report
    stage. Each writer takes ``volume`` from ``volume_source``'s ``volume_port`` (a volume, or its geometry
    without voxels when the writers need no voxel values) and ``result`` from ``result_source``."""
    writers = dict(output_folder=output_folder, algorithm=algorithm, uid_root=uid_root)
    seg_writer = SegmentationWriterOperator(app, name="seg_writer", **writers)
    sr_writer = MeasurementReportWriterOperator(app, name="sr_writer", with_parametric_map=uncertainty_map, **writers)
    report_writer = ReportWriterOperator(app, name="report_writer", report_config=report_config,
                                         fhir_config=fhir_config, with_parametric_map=uncertainty_map, **writers)
    stage: list[Operator] = [seg_writer, sr_writer, report_writer]
    if uncertainty_map:
        pmap_writer = UncertaintyMapWriterOperator(app, name="pmap_writer", **writers)
        stage.append(pmap_writer)
        app.add_flow(pmap_writer, sr_writer, {("pmap", "pmap")})
        app.add_flow(pmap_writer, report_writer, {("pmap", "pmap")})
    for writer in stage:
        app.add_flow(volume_source, writer, {(volume_port, "volume")})
        app.add_flow(result_source, writer, {("result", "result")})
    app.add_flow(seg_writer, sr_writer, {("seg", "seg")})
    app.add_flow(seg_writer, report_writer, {("seg", "seg")})
    app.add_flow(sr_writer, report_writer, {("sr", "sr")})
