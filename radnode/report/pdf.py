"""The report text as a one-document PDF (FHIR presentedForm, Encapsulated PDF), with fpdf2's core fonts."""

from __future__ import annotations

from fpdf import FPDF

from radnode.report.generate import Report

SECTIONS = ("FINDINGS", "IMPRESSION", "LIMITATIONS")


def _latin1(text: str) -> str:
    """Core PDF fonts are Latin-1: map the few typographic characters a model may write, drop the rest."""
    text = text.replace("\u2212", "-").replace("\u2013", "-").replace("\u2014", "-").replace("\u2019", "'")
    return text.encode("latin-1", "replace").decode("latin-1")


def report_pdf(report: Report, title: str) -> bytes:
    """A PDF of ``title``, the report's opening (patient, study, series, algorithms), the AI disclaimer in bold and
    the report's sections."""
    pdf = FPDF(format="A4")
    pdf.set_title(_latin1(title))
    pdf.set_creator("radnode")
    pdf.add_page()
    width = pdf.w - pdf.l_margin - pdf.r_margin
    pdf.set_font("Helvetica", "B", 14)
    pdf.multi_cell(width, 8, _latin1(title), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 9)
    for line in report.opening:  # whose report this is, before anything else: a detached page stays safe
        pdf.multi_cell(width, 5, _latin1(line), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    pdf.set_font("Helvetica", "B", 9)
    pdf.multi_cell(width, 5, _latin1(report.disclaimer), new_x="LMARGIN", new_y="NEXT")
    for heading, lines in zip(SECTIONS, (report.findings, report.impression, report.limitations)):
        if not lines:
            continue
        pdf.ln(3)
        pdf.set_font("Helvetica", "B", 11)
        pdf.cell(width, 7, heading, new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", "", 10)
        for line in lines:
            pdf.multi_cell(width, 5, _latin1(line), new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())
