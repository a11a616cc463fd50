"""The destination registry: one module per type, one grammar for configuration, rules and command line, unknown
types refused with the known ones, secrets named and never written; the folder type end to end; each type's
live check."""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

import pytest

import radnode.destinations as package
from factories import job_ready_for_delivery, make_pki, write_chest_phantom, write_results
from radnode.cli import build_parser, main, serve_config
from radnode.config import ConfigError, OrthancConfig, load_config, parse_config
from radnode.destinations import Check, SendContext, Timeouts, destination_types, known_types, parse_destination
from radnode.destinations.credentials import BearerAuth, http_session
from radnode.node.egress import Egress, outbox_dir
from radnode.node.store import JobState, JobStore
from radnode.peers import StoreSCP, free_port

KNOWN = known_types()
"""What the refusals list: every registered type (a new type is one new file; these tests need no change)."""


def test_each_type_is_one_module_of_the_package() -> None:
    types = destination_types()
    assert {"dicom", "dicomweb", "fhir", "folder", "orthanc", "orthanc-dicomweb", "orthanc-modality"} <= types.keys()
    assert KNOWN == ", ".join(sorted(types))
    modules = {m.name for m in pkgutil.iter_modules(package.__path__)} - {"base", "registry", "credentials"}
    assert {cls.__module__.rsplit(".", 1)[1] for cls in types.values()} == modules
    for name in modules:  # exactly one registered type per module
        module = importlib.import_module(f"radnode.destinations.{name}")
        assert sum(cls.__module__ == module.__name__ for cls in types.values()) == 1


@pytest.mark.parametrize(("text", "kind", "described"), [
    ("PACS@10.0.0.5:104", "dicom", "PACS@10.0.0.5:104"),
    ("dicom:PACS@pacs.example.org:11112", "dicom", "PACS@pacs.example.org:11112"),
    ("fhir:https://ehr.example.org/fhir/", "fhir", "https://ehr.example.org/fhir"),
    ("dicomweb:https://archive.example.org/dicom-web", "dicomweb", "STOW-RS https://archive.example.org/dicom-web"),
    ("folder:/mnt/results", "folder", "folder /mnt/results"),
    ("orthanc", "orthanc", "Orthanc"),
    ("orthanc-modality:PACS", "orthanc-modality", "Orthanc modality PACS"),
    ("orthanc-dicomweb:RESEARCH", "orthanc-dicomweb", "Orthanc DICOMweb server RESEARCH"),
])
def test_one_line_forms(text: str, kind: str, described: str) -> None:
    destination = parse_destination(text)
    assert (destination.type, destination.describe()) == (kind, described)
    assert parse_destination(destination.model_dump()) == destination  # the mapping form says the same


@pytest.mark.parametrize(("yaml_text", "key", "message"), [
    ("egress:\n  destinations:\n    research: {type: s3, bucket: results}\n", "egress.destinations.research.type",
     f"unknown destination type 's3' (known: {KNOWN})"),
    ("egress:\n  destinations:\n    research: https://archive.example.org/dicom-web\n",
     "egress.destinations.research.type", f"unknown destination type 'https' (known: {KNOWN})"),
    ("egress:\n  named_destinations:\n    ARCHIVE: 'sftp:archive.example.org'\n", "egress.named_destinations.ARCHIVE",
     f"unknown destination type 'sftp' (known: {KNOWN})"),
    ("egress:\n  destinations:\n    pacs: {type: dicom, ae_title: PACS, host: pacs, port: 104, tls_version: 1.3}\n",
     "egress.destinations.pacs.tls_version", "unknown key 'tls_version' for a dicom destination"),
])
def test_an_unknown_type_or_key_in_a_configuration_file_is_refused_with_file_and_key(
        tmp_path: Path, yaml_text: str, key: str, message: str) -> None:
    path = tmp_path / "radnode.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: key '{key}': {message}"


def test_an_unknown_type_in_a_rules_file_is_refused_with_file_line_and_known_types(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: ct\n    when: {Modality: CT}\n    pipelines: [ct_tissue]\n"
                     "    forward: ['s3:results']\n")
    config = tmp_path / "radnode.yaml"
    config.write_text("egress:\n  destinations:\n    pacs: PACS@10.0.0.5:104\n")
    assert main(["rules", "check", str(rules), "--config", str(config)]) == 1
    assert (f"{rules}:5: rule 'ct': forward 's3:results': unknown destination type 's3' (known: {KNOWN})"
            in capsys.readouterr().out)


def test_old_forms_are_shorthands_of_the_one_grammar() -> None:
    old = parse_config({"egress": {"destinations": [{"ae_title": "PACS", "host": "10.0.0.5", "port": 104}],
                                   "named_destinations": {"ARCHIVE": "ARCHIVE@10.0.0.6:104"},
                                   "fhir_url": "https://ehr.example.org/fhir"}})
    new = parse_config({"egress": {"destinations": {
        "PACS@10.0.0.5:104": {"type": "dicom", "ae_title": "PACS", "host": "10.0.0.5", "port": 104},
        "ARCHIVE": {"type": "dicom", "ae_title": "ARCHIVE", "host": "10.0.0.6", "port": 104, "forward_only": True},
        "fhir": {"type": "fhir", "url": "https://ehr.example.org/fhir"}}}})
    assert old.egress.destinations == new.egress.destinations
    assert parse_config(old.model_dump(mode="json")) == old  # what job processes read back ($RADNODE_CONFIG)


def test_secrets_are_named_never_written(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="a secret is named, not written here"):
        parse_config({"egress": {"destinations": {"r": {"type": "dicomweb", "url": "https://a/dicom-web", "auth": {
            "type": "bearer", "token": "eyJhbGciOi-the-token-itself"}}}}})
    with pytest.raises(ConfigError, match="credentials do not belong in the URL") as err:
        parse_config({"egress": {"destinations": {"r": "dicomweb:https://user:hunter2@a/dicom-web"}}})
    assert "hunter2" not in str(err.value)
    config = parse_config({"egress": {"destinations": {"r": {"type": "fhir", "url": "https://ehr/fhir", "auth": {
        "type": "bearer", "token": {"env": "RADNODE_TEST_FHIR_TOKEN"}}}}}})
    assert config.egress.destinations["r"].describe() == "https://ehr/fhir (bearer token from $RADNODE_TEST_FHIR_TOKEN)"
    monkeypatch.setenv("RADNODE_TEST_FHIR_TOKEN", "tok-123")
    assert "tok-123" not in json.dumps(config.model_dump(mode="json"))
    auth = config.egress.destinations["r"].auth  # type: ignore[attr-defined]
    assert isinstance(auth, BearerAuth) and http_session(auth).headers["Authorization"] == "Bearer tok-123"


def test_command_line_destinations_use_the_same_grammar(tmp_path: Path) -> None:
    args = ["serve", "--data-dir", str(tmp_path), "--destination", "PACS@127.0.0.1:104",
            "--destination", "dicomweb:https://archive.example.org/dicom-web", "--fhir-url", "https://ehr/fhir"]
    config = serve_config(build_parser().parse_args(args))
    assert {n: d.type for n, d in config.egress.destinations.items()} == {
        "PACS@127.0.0.1:104": "dicom", "dicomweb:https://archive.example.org/dicom-web": "dicomweb", "fhir": "fhir"}
    with pytest.raises(ConfigError, match=f"--destination 's3:bucket': unknown destination type 's3' .known: {KNOWN}"):
        serve_config(build_parser().parse_args(["serve", "--destination", "s3:bucket"]))


def test_a_folder_destination_gets_every_output_and_a_resend_replaces_them(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_chest_phantom(out, n_slices=2, rows=8, columns=8)
    (out / "fhir-bundle.json").write_text('{"resourceType": "Bundle"}')
    (out / "manifest.json").write_text("{}")
    config = parse_config({"data_dir": str(tmp_path / "data"),
                           "egress": {"destinations": {"share": f"folder:{tmp_path / 'share'}"}}})
    store = JobStore(tmp_path / "data" / "radnode.db")
    egress = Egress(config, store)
    job_id = job_ready_for_delivery(store)
    egress.stage(job_id, out)
    egress.deliver_due()
    assert store.job(job_id).state is JobState.DONE  # type: ignore[union-attr]
    delivered = tmp_path / "share" / str(job_id)
    assert sorted(p.name for p in delivered.iterdir()) == sorted(p.name for p in out.iterdir())
    assert egress.resend(job_id, "share", user="operator", reason="share was wiped") == 4
    egress.deliver_due()
    assert sorted(p.name for p in delivered.iterdir()) == sorted(p.name for p in out.iterdir())  # replaced, once
    assert all((delivered / p.name).read_bytes() == p.read_bytes() for p in out.iterdir())
    store.close()


def test_a_review_decision_reaches_a_folder_in_its_own_folder_beside_what_went_before(tmp_path: Path) -> None:
    """An accepted decision's verified report SR goes to ``<job>/review-<id>/report-sr.dcm``: the report first
    delivered stays as it was (it is what the decision verified; a PACS keeps both too)."""
    out = tmp_path / "out"
    write_results(out, report_sr=True)
    config = parse_config({"data_dir": str(tmp_path / "data"),
                           "egress": {"destinations": {"share": f"folder:{tmp_path / 'share'}"}}})
    store = JobStore(tmp_path / "data" / "radnode.db")
    egress = Egress(config, store)
    job_id = job_ready_for_delivery(store)
    egress.stage(job_id, out)
    egress.deliver_due()
    assert store.job(job_id).state is JobState.DONE  # type: ignore[union-attr]
    assert "report-sr.dcm → share" in egress.decide(job_id, "dr-x", "", "accepted", None)
    (review,) = [r.id for r in store.review_rows()]
    egress.deliver_due()
    assert store.job(job_id).state is JobState.DONE  # type: ignore[union-attr]
    delivered, outbox = tmp_path / "share" / str(job_id), outbox_dir(config, job_id)
    assert (delivered / "report-sr.dcm").read_bytes() == (out / "report-sr.dcm").read_bytes()
    verified = f"review-{review}/report-sr.dcm"
    assert (delivered / verified).read_bytes() == (outbox / verified).read_bytes()
    assert sorted(str(p.relative_to(delivered)) for p in delivered.rglob("*") if p.is_file()) == sorted(
        [p.name for p in out.iterdir()] + [verified])
    store.close()


def test_the_encapsulated_pdf_goes_only_to_destinations_that_ask_for_it(tmp_path: Path) -> None:
    """A PACS that renders SR gets the report SR alone; one configured ``encapsulated_pdf: true`` (it does not render
    SR) gets the report's PDF as a DICOM instance too. The FHIR server never gets DICOM; a folder gets everything."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("seg.dcm", "sr.dcm", "report-sr.dcm", "report-pdf.dcm", "fhir-bundle.json", "report.pdf"):
        (out / name).write_bytes(b"result")
    config = parse_config({"data_dir": str(tmp_path / "data"), "egress": {"destinations": {
        "pacs": "PACS@127.0.0.1:104",
        "old_pacs": {"type": "dicom", "ae_title": "OLDPACS", "host": "127.0.0.1", "port": 105, "encapsulated_pdf": True},
        "ehr": "fhir:http://127.0.0.1:1/fhir", "share": f"folder:{tmp_path / 'share'}"}}})
    store = JobStore(tmp_path / "data" / "radnode.db")
    job_id = job_ready_for_delivery(store)
    Egress(config, store).stage(job_id, out)
    planned: dict[str, set[str]] = {}
    for delivery in store.deliveries(job_id):
        planned.setdefault(delivery.destination, set()).add(delivery.object)
    assert planned == {"pacs": {"seg.dcm", "sr.dcm", "report-sr.dcm"},
                       "old_pacs": {"seg.dcm", "sr.dcm", "report-sr.dcm", "report-pdf.dcm"},
                       "ehr": {"fhir-bundle.json"},
                       "share": {"seg.dcm", "sr.dcm", "report-sr.dcm", "report-pdf.dcm", "fhir-bundle.json", "report.pdf"}}
    with pytest.raises(ConfigError, match="encapsulated_pdf"):
        parse_config({"egress": {"destinations": {"p": {"type": "dicom", "ae_title": "P", "host": "h", "port": 1,
                                                         "encapsulated_pdf": "sometimes"}}}})


def test_each_type_checks_its_peer_live_and_sends_nothing(tmp_path: Path, pacs: StoreSCP) -> None:
    """The console's destination check is each type's own: a C-ECHO, a FHIR CapabilityStatement, a QIDO-RS
    search, Orthanc's /system, a writable folder; a failure says its cause."""
    context = SendContext(ae_title="RADNODE", timeouts=Timeouts(connect_seconds=2, acse_seconds=2, dimse_seconds=2,
                                                                network_seconds=2),
                          orthanc=OrthancConfig(), job_id=0)
    closed = free_port()
    found = {text: parse_destination(text).check(context) for text in (
        pacs.address, f"PACS@127.0.0.1:{closed}", f"fhir:http://127.0.0.1:{closed}/fhir",
        f"dicomweb:http://127.0.0.1:{closed}/dicom-web", "orthanc", f"folder:{tmp_path / 'share' / 'new'}",
        f"folder:{pacs.log_path}")}
    assert found[pacs.address] == Check(True, f"C-ECHO to {pacs.address}: status 0x0000")
    assert found[f"PACS@127.0.0.1:{closed}"] == Check(
        False, f"cannot connect to PACS@127.0.0.1:{closed}: connection refused (nothing listens on that port)")
    assert found[f"fhir:http://127.0.0.1:{closed}/fhir"] == Check(
        False, f"GET http://127.0.0.1:{closed}/fhir/metadata: connection refused")
    assert found[f"dicomweb:http://127.0.0.1:{closed}/dicom-web"] == Check(
        False, f"GET http://127.0.0.1:{closed}/dicom-web/studies?limit=1: connection refused")
    assert found["orthanc"] == Check(False, "orthanc.url is not configured")
    share = found[f"folder:{tmp_path / 'share' / 'new'}"]
    assert share.ok and f"(created under {tmp_path} on the first delivery)" in share.detail
    assert found[f"folder:{pacs.log_path}"] == Check(False, f"{pacs.log_path} is not a folder")
    assert not (tmp_path / "share").exists() and list(pacs.folder.iterdir()) == [], "a check sends nothing"


def test_the_check_of_a_tls_destination_associates_over_tls_as_a_delivery_does(tmp_path: Path) -> None:
    """A C-ECHO check of a ``dicom`` destination with ``tls`` shakes hands with its CA bundle and the node's
    certificate (mutual TLS), as the delivery would; a CA bundle that cannot be read is a failed check."""
    pki = make_pki(tmp_path / "pki")
    context = SendContext(ae_title="RADNODE", timeouts=Timeouts(connect_seconds=5, acse_seconds=5, dimse_seconds=5,
                                                                network_seconds=5),
                          orthanc=OrthancConfig(), job_id=0)
    with StoreSCP(tmp_path / "pacs", tls=(pki.server_key, pki.server_cert, pki.ca),
                  require_client_certificate=True) as pacs:
        def destination(tls: dict) -> object:
            return parse_config({"egress": {"destinations": {"pacs": {
                "type": "dicom", "ae_title": pacs.ae_title, "host": "localhost", "port": pacs.port,
                "tls": tls}}}}).egress.destinations["pacs"]

        mutual = {"ca_bundle": str(pki.ca), "certificate": str(pki.client_cert), "private_key": str(pki.client_key)}
        checked = destination(mutual).check(context)  # type: ignore[attr-defined]
        missing_ca = {**mutual, "ca_bundle": str(tmp_path / "missing-ca.pem")}
        unreadable = destination(missing_ca).check(context)  # type: ignore[attr-defined]
    assert checked == Check(True, f"C-ECHO to PACS@localhost:{pacs.port} (TLS): status 0x0000")
    assert not unreadable.ok and "missing-ca.pem: no such file" in unreadable.detail
