"""docs/conformance.md (DICOM Conformance Statement and IHE AIR integration statement) says what the code does.

The objects table is compared with the writers' own constants (SOP class, file, series number) and with the
files every app declares; networking defaults with the configuration's; the report SR's sections with the
codes the writer uses. A change to any of them fails here until the statement says it too.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydicom.uid import (
    ComprehensiveSRStorage,
    Comprehensive3DSRStorage,
    EncapsulatedPDFStorage,
    ParametricMapStorage,
    SegmentationStorage,
)

from pynetdicom.sop_class import Verification

from radnode.config import Config, IngressConfig
from radnode.operators.report import REPORT_PDF_DICOM_FILE, REPORT_SR_FILE
from radnode.operators.result_writers import SEG_FILE, SR_FILE
from radnode.operators.uncertainty import PMAP_FILE
from radnode.outputs.encapsulated_pdf import PDF_SERIES_NUMBER
from radnode.outputs.pmap import PMAP_SERIES_NUMBER
from radnode.outputs.seg import SEG_SERIES_NUMBER
from radnode.outputs.sr import SR_SERIES_NUMBER
from radnode.report.sr import REPORT_SERIES_NUMBER, SECTIONS

REPO = Path(__file__).resolve().parents[1]
STATEMENT = (REPO / "docs" / "conformance.md").read_text()

WRITTEN = {
    SegmentationStorage: (SEG_FILE, SEG_SERIES_NUMBER),
    Comprehensive3DSRStorage: (SR_FILE, SR_SERIES_NUMBER),
    ParametricMapStorage: (PMAP_FILE, PMAP_SERIES_NUMBER),
    ComprehensiveSRStorage: (REPORT_SR_FILE, REPORT_SERIES_NUMBER),
    EncapsulatedPDFStorage: (REPORT_PDF_DICOM_FILE, PDF_SERIES_NUMBER),
}
"""What the writers create: SOP class → (file, series number)."""


def _objects_table() -> dict[str, tuple[str, int]]:
    rows = re.findall(r"^\| [^|]+ \| ([\d.]+) \| `([\w.-]+)` \| (\d+) \|", STATEMENT, re.MULTILINE)
    return {uid: (file, int(number)) for uid, file, number in rows}


def test_the_objects_table_is_what_the_writers_create() -> None:
    assert _objects_table() == {str(uid): value for uid, value in WRITTEN.items()}
    assert len({number for _, number in WRITTEN.values()}) == len(WRITTEN)  # one series number per object


def test_every_dicom_file_an_app_declares_is_in_the_statement() -> None:
    listed = {file for file, _ in _objects_table().values()}
    for app_yaml in sorted((REPO / "apps").glob("*/app.yaml")):
        declared = yaml.safe_load(app_yaml.read_text())["application"]["output-files"]
        assert {f for f in declared if f.endswith(".dcm")} <= listed, app_yaml


def test_networking_defaults_and_services() -> None:
    ingress, flat = IngressConfig(), " ".join(STATEMENT.split())
    assert f"`ingress.ae_title` (default `{ingress.ae_title}`)" in flat
    assert f"`ingress.port` (default {ingress.port})" in flat
    assert str(Verification) in STATEMENT
    for key in re.findall(r"`((?:ingress|egress|fhir|uncertainty)\.\w+)`", STATEMENT):
        section, name = key.split(".")
        assert name in type(getattr(Config(), section)).model_fields, key


def test_report_sr_sections_and_templates() -> None:
    for heading, element in SECTIONS:
        assert f"LN {heading.value}" in STATEMENT, heading
    for template in ("TID 1500", "TID 1411", "TID 1501", "TID 2000", "TID 4019"):
        assert template in STATEMENT
    air = STATEMENT.split("# IHE AI Results")[1]
    assert "Evidence Creator" in air and "Parametric Map" in air and "RAD-8" in air
