"""Tools radnode did not write, run as a site would: DCMTK storescu/echoscu as senders (pynetdicom's SCU for bytes
storescu will not send), dciodvfy as the judge."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2")
"""What :func:`send_unparsed` proposes for CT Image Storage."""


def storescu(port: int, *inputs: Path, calling_ae: str = "MODALITY", called_ae: str = "RADNODE",
             options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Send files or folders with DCMTK's storescu (verbose, so each response status is in the output)."""
    argv = [STORESCU, "-v", "-aet", calling_ae, "-aec", called_ae, *options, "+sd", "+r", "127.0.0.1", str(port),
            *map(str, inputs)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def send_unparsed(port: int, paths: list[Path], calling_ae: str = "FUZZER") -> list[tuple[int | None, str]]:
    """Each file's bytes after its file meta sent as they are, over associations from pynetdicom's SCU; the
    (status, error comment) of each (None: no response)."""
    ae = AE(ae_title=calling_ae)
    for syntax in TRANSFER_SYNTAXES:
        ae.add_requested_context(CTImageStorage, syntax)
    answers: list[tuple[int | None, str]] = []
    previous, pynetdicom_config.STORE_SEND_CHUNKED_DATASET = pynetdicom_config.STORE_SEND_CHUNKED_DATASET, True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="RADNODE")
        for path in paths:
            for _ in range(5):  # a sender whose association ended associates again, as a modality does
                if assoc.is_established:
                    break
                time.sleep(0.5)
                assoc = ae.associate("127.0.0.1", port, ae_title="RADNODE")
            assert assoc.is_established, f"no association for {path.name}"
            status = assoc.send_c_store(path)
            answers.append((int(status.Status), str(status.get("ErrorComment", ""))) if status else (None, ""))
        assoc.release()
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = previous
    return answers


def dciodvfy_report(path: Path) -> tuple[list[str], list[str]]:
    """dciodvfy's whole report on a file, and the lines of it that are errors (none when the object is valid)."""
    run = subprocess.run([shutil.which("dciodvfy") or "dciodvfy", str(path)], capture_output=True, text=True,
                         check=False)
    report = (run.stdout + run.stderr).splitlines()
    return report, [line for line in report if line.startswith("Error")]


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines dciodvfy reports as errors for a file (empty when the object is valid)."""
    return dciodvfy_report(path)[1]
