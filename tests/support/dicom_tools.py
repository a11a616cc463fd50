"""Tools radnode did not write, run as a site would: DCMTK storescu/echoscu as senders, dciodvfy as the judge."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"


def storescu(port: int, *inputs: Path, calling_ae: str = "MODALITY", called_ae: str = "RADNODE",
             options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Send files or folders with DCMTK's storescu (verbose, so each response status is in the output)."""
    argv = [STORESCU, "-v", "-aet", calling_ae, "-aec", called_ae, *options, "+sd", "+r", "127.0.0.1", str(port),
            *map(str, inputs)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def dciodvfy_report(path: Path) -> tuple[list[str], list[str]]:
    """dciodvfy's whole report on a file, and the lines of it that are errors (none when the object is valid)."""
    run = subprocess.run([shutil.which("dciodvfy") or "dciodvfy", str(path)], capture_output=True, text=True,
                         check=False)
    report = (run.stdout + run.stderr).splitlines()
    return report, [line for line in report if line.startswith("Error")]


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines dciodvfy reports as errors for a file (empty when the object is valid)."""
    return dciodvfy_report(path)[1]
