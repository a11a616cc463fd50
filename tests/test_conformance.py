"""docs/conformance.md (DICOM Conformance Statement and IHE AIR integration statement) says what the code does.

The objects table is compared with the output layout the writers take their SOP class, file and series
number from (radnode/outputs/layout.py) and with what every app writes; networking defaults with the
configuration's; the report SR's sections with the codes the writer uses. A change to any of them fails here until the statement says it too.
"""

from __future__ import annotations

import re
from pathlib import Path

from pynetdicom.sop_class import Verification

from radnode.config import Config, IngressConfig
from radnode.outputs.layout import EVERY_APP, OutputFormat, RunOutput, outputs_of
from radnode.report.sr import SECTIONS

REPO = Path(__file__).resolve().parents[1]
STATEMENT = (REPO / "docs" / "conformance.md").read_text()

WRITTEN = {output.sop_class_uid: (output.file, output.series_number)
           for output in RunOutput if output.format is OutputFormat.DICOM}
"""What the writers create (the output layout they all take it from): SOP class → (file, series number)."""


def _objects_table() -> dict[str, tuple[str, int]]:
    rows = re.findall(r"^\| [^|]+ \| ([\d.]+) \| `([\w.-]+)` \| (\d+) \|", STATEMENT, re.MULTILINE)
    return {uid: (file, int(number)) for uid, file, number in rows}


def test_the_objects_table_is_what_the_writers_create() -> None:
    assert _objects_table() == {str(uid): value for uid, value in WRITTEN.items()}
    assert len({number for _, number in WRITTEN.values()}) == len(WRITTEN)  # one series number per object


def test_every_dicom_file_an_app_writes_is_in_the_statement() -> None:
    listed = {file for file, _ in _objects_table().values()}
    for app in sorted(EVERY_APP):
        assert {o.file for o in outputs_of(app) if o.format is OutputFormat.DICOM} <= listed, app


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
