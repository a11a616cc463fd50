"""A model folder is code: a bundle whose ``$`` expression reaches for the node's secrets and data is checked in
a sandbox where it finds neither, and a job running a site model folder cannot read the data directory or the
network; each folder's content hash goes into the job's events and the audit trail."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from factories import write_chest_phantom
from radnode.cli import main
from radnode.config import Config
from radnode.node.service import Node
from radnode.node.store import JobState
from radnode.security.sandbox import content_hash
from support.dicom_tools import storescu
from support.node import final_job
from support.waiting import wait_until

pytestmark = pytest.mark.slow


def hostile_bundle(folder: Path, marker: Path, secret: Path) -> Path:
    """A bundle whose network_def, when parsed, copies ``secret`` into ``marker`` (what a malicious or careless
    bundle can do: its ``$`` expressions are Python)."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    metadata = {"name": "hostile", "version": "1", "radnode": {
        "input": {"patch_size": [8, 8, 8], "channels": 1, "modality": "CT", "normalisation": {"kind": "zscore"}},
        "labels": {"1": "lesion"}}}
    expression = (f"$__import__('pathlib').Path({str(marker)!r}).write_text("
                  f"__import__('pathlib').Path({str(secret)!r}).read_text())")
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (folder / "configs" / "inference.json").write_text(json.dumps({"network_def": expression}))
    (folder / "models" / "model.pt").write_bytes(b"not really weights")
    return folder


def test_models_check_runs_the_bundle_where_it_cannot_reach_the_node(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    (data / "keys").mkdir(parents=True)
    secret = data / "keys" / "site.key"
    secret.write_text("the site's secret")
    marker = tmp_path / "stolen.txt"
    bundle = hostile_bundle(tmp_path / "bundle", marker, secret)
    config = tmp_path / "radnode.yaml"
    config.write_text(f"data_dir: {data}\n")

    status = main(["models", "check", str(bundle), "--config", str(config)])
    out = capsys.readouterr().out
    assert status == 2 and "problem:" in out and "network_def cannot be built" in out
    assert not marker.exists()  # neither written (read-only, or a private /tmp) nor the key read
    assert content_hash(bundle) in out

    config.write_text(f"data_dir: {data}\nsandbox: {{mode: none}}\n")  # what the sandbox prevents
    main(["models", "check", str(bundle), "--config", str(config)])
    assert marker.read_text() == "the site's secret"


PROBE = textwrap.dedent('''
    """Job command: reports what it can reach, and writes one result."""
    import argparse, json, os, pathlib, socket
    import pydicom
    from pydicom.uid import generate_uid
    parser = argparse.ArgumentParser()
    parser.add_argument("input")
    parser.add_argument("--output", required=True)
    parser.add_argument("--pipeline")
    args = parser.parse_args()
    data = pathlib.Path(os.environ["PROBE_DATA_DIR"]) if "PROBE_DATA_DIR" in os.environ else None
    seen = {"env": sorted(os.environ), "model": os.environ.get("HOLOSCAN_MODEL_PATH")}
    seen["key"] = (pathlib.Path(%(data)r) / "keys" / "site.key").exists()
    seen["spool"] = (pathlib.Path(%(data)r) / "spool").exists()
    seen["model_readable"] = pathlib.Path(%(model)r, "weights.bin").exists()
    try:
        socket.create_connection(("127.0.0.1", %(port)d), timeout=2).close()
        seen["network"] = True
    except OSError:
        seen["network"] = False
    first = pydicom.dcmread(sorted(pathlib.Path(args.input).iterdir())[0])
    first.SOPInstanceUID = first.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    first.SeriesInstanceUID = generate_uid()
    first.save_as(pathlib.Path(args.output) / "result.dcm")
    (pathlib.Path(args.output) / "seen.json").write_text(json.dumps(seen))
''')


READER = textwrap.dedent('''
    """Job command: what it can read of the given secret files, and one result."""
    import argparse, json, pathlib
    import pydicom
    from pydicom.uid import generate_uid
    parser = argparse.ArgumentParser()
    parser.add_argument("input")
    parser.add_argument("--output", required=True)
    parser.add_argument("--pipeline")
    args = parser.parse_args()
    read = {}
    for name in %(secrets)r:
        try:  # a folder: the names in it
            path = pathlib.Path(name)
            read[name] = sorted(p.name for p in path.iterdir()) if path.is_dir() else path.read_text()
        except OSError as e:  # /dev/null bound over it on a nodev mount: not even opened
            read[name] = type(e).__name__
    first = pydicom.dcmread(sorted(pathlib.Path(args.input).iterdir())[0])
    first.SOPInstanceUID = first.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    first.SeriesInstanceUID = generate_uid()
    first.save_as(pathlib.Path(args.output) / "result.dcm")
    (pathlib.Path(args.output) / "read.json").write_text(json.dumps(read))
''')


def test_a_sandboxed_job_reads_no_secret_file_of_the_configuration_wherever_it_is_kept(tmp_path: Path) -> None:
    """Every secret file of the configuration is hidden, not only those under the paths the sandbox hides
    anyway: the web service's TLS key and the Orthanc plugin's token, kept where a site keeps them (a folder
    outside /tmp, $HOME and the data directory, as /etc/radnode would be), unreadable to a job's process."""
    import shutil
    import tempfile

    cache = Path(__file__).resolve().parents[1] / ".cache"  # visible in the sandbox, as /etc would be
    cache.mkdir(exist_ok=True)
    keys = Path(tempfile.mkdtemp(prefix="sandbox-secrets-", dir=cache))
    try:
        secrets = {keys / "api-key.pem": "API KEY", keys / "orthanc.token": "ORTHANC TOKEN"}
        for path, text in secrets.items():
            path.write_text(text)
        model = tmp_path / "site-model"
        model.mkdir()
        (model / "weights.bin").write_bytes(b"\x01" * 100)
        rules = tmp_path / "rules.yaml"
        rules.write_text("rules:\n  - name: site model\n    when: {Modality: {exists: true}}\n"
                         "    pipelines: [model_seg]\n")
        (tmp_path / "reader.py").write_text(READER % {"secrets": [str(p) for p in secrets]})
        config = Config.model_validate({
            "data_dir": str(tmp_path / "data"), "ingress": {"host": "127.0.0.1", "port": 0, "study_idle_seconds": 0.5},
            "processing": {"models": {"model_seg": [str(model)]}}, "rules": str(rules), "api": {"port": 0, "tls": {
                "certificate": str(keys / "api-cert.pem"), "private_key": str(keys / "api-key.pem")}, "enabled": False},
            "orthanc": {"event_token_file": str(keys / "orthanc.token")}})
        with Node(config, job_command=[sys.executable, str(tmp_path / "reader.py")], poll_seconds=0.05) as node:
            sent = storescu(node.port, *write_chest_phantom(tmp_path / "study", 2, 16, 16))
            assert sent.returncode == 0, sent.stderr
            wait_until(lambda: node.jobs(), timeout=30)
            job = final_job(node, node.jobs()[0].id, timeout=60)
        assert job.state is JobState.DONE, job.reason
        read = json.loads((tmp_path / "data" / "jobs" / str(job.id) / "out" / "read.json").read_text())
    finally:
        shutil.rmtree(keys)
    assert set(read) == {str(p) for p in secrets}
    assert all(value in ("", "PermissionError") for value in read.values()), f"secrets the sandboxed job read: {read}"


def test_a_sandboxed_job_reads_neither_the_audit_log_nor_the_pseudonym_mapping_kept_outside_the_data_directory(
        tmp_path: Path) -> None:
    """The audit log (with ``patient_identity: clear`` it names patients, and its rotated copies) and the
    de-identification mapping folder (original ↔ pseudonym) are the node's private records: kept outside the
    data directory, as a site keeps them under /var/log or /srv, they are still hidden from a job's process,
    the mapping folder as a whole (its database, its journal, whatever it holds)."""
    import shutil
    import tempfile

    from factories import PATIENT

    cache = Path(__file__).resolve().parents[1] / ".cache"  # visible in the sandbox, as /var/log would be
    cache.mkdir(exist_ok=True)
    site = Path(tempfile.mkdtemp(prefix="sandbox-private-", dir=cache))
    try:
        audit_log, rotated, mapping = site / "log" / "audit.log", site / "log" / "audit.log.1", site / "deid"
        rotated.parent.mkdir()
        rotated.write_text(f"an older audit message naming {PATIENT['PatientID']}")
        mapping.mkdir()
        (mapping / "pseudonyms.db").write_text("ORIGINAL -> PSEUDONYM")
        model = tmp_path / "site-model"
        model.mkdir()
        (model / "weights.bin").write_bytes(b"\x01" * 100)
        rules = tmp_path / "rules.yaml"
        rules.write_text("rules:\n  - name: site model\n    when: {Modality: {exists: true}}\n"
                         "    pipelines: [model_seg]\n")
        paths = [audit_log, rotated, mapping, mapping / "pseudonyms.db"]
        (tmp_path / "reader.py").write_text(READER % {"secrets": [str(p) for p in paths]})
        config = Config.model_validate({
            "data_dir": str(tmp_path / "data"), "ingress": {"host": "127.0.0.1", "port": 0, "study_idle_seconds": 0.5},
            "processing": {"models": {"model_seg": [str(model)]}}, "rules": str(rules), "api": {"enabled": False},
            "audit": {"log_file": str(audit_log), "patient_identity": "clear"},
            "deidentification": {"mapping_dir": str(mapping)}})
        with Node(config, job_command=[sys.executable, str(tmp_path / "reader.py")], poll_seconds=0.05) as node:
            sent = storescu(node.port, *write_chest_phantom(tmp_path / "study", 2, 16, 16))
            assert sent.returncode == 0, sent.stderr
            wait_until(lambda: node.jobs(), timeout=30)
            job = final_job(node, node.jobs()[0].id, timeout=60)
        assert job.state is JobState.DONE, job.reason
        assert PATIENT["PatientID"] in audit_log.read_text()  # what there is to hide
        read = json.loads((tmp_path / "data" / "jobs" / str(job.id) / "out" / "read.json").read_text())
    finally:
        shutil.rmtree(site)
    assert read[str(mapping)] == [], f"the mapping folder as the job saw it: {read[str(mapping)]}"
    files = {str(p) for p in (audit_log, rotated, mapping / "pseudonyms.db")}
    unreadable = ("", "PermissionError", "FileNotFoundError")
    assert all(read[name] in unreadable for name in files), f"what the job read: {read}"


def test_a_mapping_folder_made_after_a_job_started_stays_hidden_from_that_job(tmp_path: Path) -> None:
    """The de-identification mapping folder is made on the first pseudonymised delivery, which can come while a
    job already runs: the job's sandbox hides it even so, not only where it existed when the job started."""
    import shutil
    import subprocess
    import tempfile

    from radnode.security.sandbox import sandboxed_argv

    cache = Path(__file__).resolve().parents[1] / ".cache"  # visible in the sandbox, as /srv would be
    cache.mkdir(exist_ok=True)
    site = Path(tempfile.mkdtemp(prefix="sandbox-mapping-", dir=cache))
    mapping = site / "deid"
    config = Config.model_validate({"data_dir": str(tmp_path / "data"), "deidentification": {"mapping_dir": str(mapping)}})
    lister = ("import os, sys; print('ready', flush=True); sys.stdin.readline(); "
              f"p = {str(mapping)!r}; print(sorted(os.listdir(p)) if os.path.isdir(p) else 'absent', flush=True)")
    try:
        job = subprocess.Popen(sandboxed_argv(config, [sys.executable, "-c", lister]), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert job.stdout is not None and job.stdin is not None
        assert job.stdout.readline().strip() == "ready", job.stderr.read() if job.stderr else ""
        mapping.mkdir(exist_ok=True)  # as the first pseudonymised delivery makes it, while the job runs
        (mapping / "pseudonyms.db").write_text("ORIGINAL -> PSEUDONYM")
        seen, errors = job.communicate("go\n", timeout=60)
    finally:
        shutil.rmtree(site)
    assert job.returncode == 0, errors
    assert "pseudonyms.db" not in seen, f"the mapping folder as the running job saw it: {seen}"


def test_a_job_with_a_site_model_runs_without_the_data_directory_or_the_network(tmp_path: Path) -> None:
    model = tmp_path / "site-model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"\x01" * 1000)
    data = tmp_path / "data"
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: site model\n    when: {Modality: {exists: true}}\n    pipelines: [model_seg]\n")
    config = Config.model_validate({
        "data_dir": str(data), "ingress": {"host": "127.0.0.1", "port": 0, "study_idle_seconds": 0.5},
        "processing": {"models": {"model_seg": [str(model)]}}, "rules": str(rules), "api": {"port": 0}})
    with Node(config, job_command=[sys.executable, str(tmp_path / "probe.py")], poll_seconds=0.05) as node:
        (tmp_path / "probe.py").write_text(PROBE % {"data": str(data), "model": str(model), "port": node.port})
        study = write_chest_phantom(tmp_path / "study", 2, 16, 16)
        sent = storescu(node.port, *study)
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: node.jobs(), timeout=30)
        job = final_job(node, node.jobs()[0].id, timeout=60)
        assert job.state is JobState.DONE, job.reason
        seen = json.loads((data / "jobs" / str(job.id) / "out" / "seen.json").read_text())
        events = [e.message for e in node.events(job.id)]
        audit = node.audit.path
    assert seen["key"] is False and seen["spool"] is False and seen["network"] is False
    assert seen["model_readable"] is True and seen["model"] == str(model.resolve())
    assert not any(name.startswith(("AWS_", "RADNODE_ORTHANC")) for name in seen["env"])
    digest = content_hash(model)
    assert any(digest in message and "bwrap" in message for message in events)
    assert any('csd-code="110103"' in m and digest in m for m in audit.read_text().splitlines())
