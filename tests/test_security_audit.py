"""The audit trail and privacy of a whole node: a study in over DICOM, results out to a PACS; the audit log and
a real syslog collector (rsyslog over TLS, RFC 5425) hold the same PS3.15 A.5 messages, valid against the
standard's schema (libxml2 via lxml and, independently, jing); no patient identifier in a log line or a file
the node writes outside the spool, the job folders and the outbox; every file owner-only."""

from __future__ import annotations

import logging
import stat
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from lxml import etree

from factories import ACCESSION, PATIENT, Pki, make_pki, write_chest_phantom
from radnode.node.service import Node
from radnode.node.store import JobState
from radnode.peers import StoreSCP, free_port
from radnode.security.audit_schema import schema_errors, schema_text
from support.dicom_tools import STORESCU
from support.node import final_job, node_config
from support.waiting import wait_until

pytestmark = pytest.mark.slow

RSYSLOGD = "/usr/sbin/rsyslogd"

class Rsyslog:
    """rsyslogd receiving RFC 5425 syslog over TLS on loopback, writing each message's MSG part to a file."""

    def __init__(self, folder: Path, pki: Pki) -> None:
        folder.mkdir(parents=True)
        self.port, self.received = free_port(), folder / "received.log"
        conf = folder / "rsyslog.conf"
        conf.write_text(textwrap.dedent(f'''
            global(workDirectory="{folder}" DefaultNetstreamDriver="gtls" DefaultNetstreamDriverCAFile="{pki.ca}"
                   DefaultNetstreamDriverCertFile="{pki.server_cert}" DefaultNetstreamDriverKeyFile="{pki.server_key}")
            module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
            input(type="imtcp" port="{self.port}" address="127.0.0.1")
            template(name="audit" type="string" string="%app-name% %msgid% %msg%\\n")
            action(type="omfile" file="{self.received}" template="audit")
        '''))
        self.log = (folder / "rsyslogd.log").open("w")
        self.process = subprocess.Popen([RSYSLOGD, "-n", "-f", str(conf), "-i", str(folder / "pid")],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while subprocess.run(["ss", "-ltn", f"sport = :{self.port}"], capture_output=True,
                             text=True).stdout.count("LISTEN") == 0:
            assert self.process.poll() is None, (folder / "rsyslogd.log").read_text()
            assert time.monotonic() < deadline, "rsyslogd did not listen"
            time.sleep(0.1)

    def messages(self) -> list[str]:
        if not self.received.exists():
            return []
        lines = self.received.read_text(encoding="utf-8").splitlines()
        assert all(line.startswith("radnode IHE+RFC-3881 ") for line in lines), lines[:2]
        return [line.removeprefix("radnode IHE+RFC-3881 ").lstrip("\ufeff") for line in lines]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[tuple[Rsyslog, Pki]]:
    if not Path(RSYSLOGD).exists():
        pytest.fail("rsyslogd is missing: scripts/bootstrap.sh installs rsyslog and rsyslog-gnutls")
    pki = make_pki(tmp_path / "pki")
    server = Rsyslog(tmp_path / "rsyslog", pki)
    yield server, pki
    server.stop()


def jing_errors(messages: list[str], folder: Path) -> str:
    """What jing (James Clark's RELAX NG validator, not radnode's code) says of the messages; '' when valid."""
    folder.mkdir(parents=True, exist_ok=True)
    schema = folder / "audit.rnc"
    schema.write_text(schema_text())
    files = []
    for i, message in enumerate(messages):
        files.append(folder / f"{i}.xml")
        files[-1].write_text(message)
    result = subprocess.run(["jing", "-c", str(schema), *map(str, files)], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode else ""


def test_a_study_in_and_results_out_are_audited_locally_and_at_the_collector(
        tmp_path: Path, collector: tuple[Rsyslog, Pki], stand_in: list[str], caplog: pytest.LogCaptureFixture) -> None:
    rsyslog, pki = collector
    study = write_chest_phantom(tmp_path / "study", 4, 16, 16)
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = node_config(tmp_path, egress={"destinations": {"pacs": pacs.destination}}, audit={
            "syslog": {"host": "127.0.0.1", "port": rsyslog.port, "tls": {"ca_bundle": str(pki.ca)}}})
        caplog.set_level(logging.INFO)
        with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
            sent = subprocess.run([STORESCU, "-aet", "CT01", "-aec", "RADNODE", "127.0.0.1", str(node.port),
                                   *map(str, study)], capture_output=True, text=True, timeout=60)
            assert sent.returncode == 0, sent.stderr
            wait_until(lambda: node.jobs(), timeout=30)
            job = final_job(node, node.jobs()[0].id, timeout=60)
            assert job.state is JobState.DONE, job.reason
            assert len(pacs.received()) == 1
            audit_log = node.audit.path
        local = audit_log.read_text(encoding="utf-8").splitlines()

    study_uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
    transferred = [m for m in local if 'csd-code="110104"' in m]
    received = [m for m in transferred if 'EventActionCode="C"' in m]
    sent_out = [m for m in transferred if 'EventActionCode="R"' in m]
    assert len(received) == 1 and len(sent_out) == 1
    for message in (received[0], sent_out[0]):
        root = etree.fromstring(message)
        assert root.find("ParticipantObjectIdentification").get("ParticipantObjectID") == study_uid
        roles = {p.find("RoleIDCode").get("originalText"): p.get("UserID")
                 for p in root.findall("ActiveParticipant") if p.find("RoleIDCode") is not None}
        assert set(roles) == {"Source Role ID", "Destination Role ID"}
    assert "CT01@127.0.0.1" in received[0] and "PACS@127.0.0.1" in sent_out[0]
    assert 'csd-code="110120"' in local[0] and 'csd-code="110121"' in local[-1]  # application start ... stop

    assert all(not schema_errors(m) for m in local), [schema_errors(m) for m in local]
    assert jing_errors(local, tmp_path / "jing") == ""
    wait_until(lambda: len(rsyslog.messages()) == len(local), timeout=20)
    assert rsyslog.messages() == local

    # privacy: no patient identifier in any log line, nor in the files the node wrote outside the spool, jobs
    # and outbox; every file and folder under the data directory owner-only
    identifiers = [PATIENT["PatientName"], PATIENT["PatientID"], PATIENT["PatientBirthDate"], ACCESSION]
    for record in caplog.records:
        assert not any(i in record.getMessage() for i in identifiers), record.getMessage()
    data = tmp_path / "data"
    for path in [data, *data.rglob("*")]:
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode):
            assert not mode & 0o077, f"{path} is {stat.filemode(mode)}"
        relative = path.relative_to(data).parts
        if path.is_file() and relative[0] not in ("spool", "jobs", "outbox"):  # the job store included: sealed
            content = path.read_bytes()
            assert not any(i.encode() in content for i in identifiers), path
