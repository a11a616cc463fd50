"""Secrets by environment variable or file, never echoed or written out; ``radnode config check`` names every
security setting and warns for each one left open; settings that would leave the node deaf are refused."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from radnode.cli import main
from radnode.config import ConfigError, load_config, parse_config
from radnode.node.service import Node
from radnode.security.secrets import Secret, SecretError


def test_a_secret_is_read_where_it_lives_and_never_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORTHANC_PW", "from-the-environment")
    secret_file = tmp_path / "pw"
    secret_file.write_text("from-a-file\n")
    secret_file.chmod(0o600)
    for value, expected in (({"env": "ORTHANC_PW"}, "from-the-environment"),
                            ({"file": str(secret_file)}, "from-a-file")):
        config = parse_config({"orthanc": {"url": "http://127.0.0.1:8042", "username": "u", "password": value}})
        assert config.orthanc.password.reveal() == expected
        assert expected not in repr(config) and expected not in str(config.orthanc)
        assert config.model_dump(mode="json")["orthanc"]["password"] == value
    with pytest.raises(ConfigError, match=r"orthanc.password': a secret is named, not written here") as refused:
        parse_config({"orthanc": {"url": "http://127.0.0.1:8042", "username": "u", "password": "written-in-clear"}})
    assert "written-in-clear" not in str(refused.value)
    with pytest.raises(SecretError, match=r"environment variable NOT_SET_ANYWHERE is not set"):
        Secret(env="NOT_SET_ANYWHERE").reveal()
    secret_file.chmod(0o644)
    assert "readable by others" in Secret(file=secret_file).problems()[0]


def test_node_config_for_jobs_is_owner_only_and_holds_no_secret(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADNODE_TEST_ORTHANC_PW", "the-orthanc-password")
    config = parse_config({"data_dir": str(tmp_path / "data"), "ingress": {"host": "127.0.0.1", "port": 0},
                           "api": {"port": 0}, "orthanc": {"password": {"env": "RADNODE_TEST_ORTHANC_PW"}}})
    (tmp_path / "data").mkdir(mode=0o755)
    (tmp_path / "data" / "old.log").write_text("left by an older version")
    (tmp_path / "data" / "old.log").chmod(0o644)
    with Node(config):
        written = tmp_path / "data" / "node-config.yaml"
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
        assert "the-orthanc-password" not in written.read_text()
        assert yaml.safe_load(written.read_text())["orthanc"]["password"] == {"env": "RADNODE_TEST_ORTHANC_PW"}
        assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "data" / "old.log").stat().st_mode) == 0o600


def test_config_check_reports_each_setting_and_warns_for_what_is_left_open(tmp_path: Path, capsys) -> None:
    password = tmp_path / "orthanc-password"
    password.write_text("hunter2-in-a-loose-file")
    password.chmod(0o644)
    open_config = tmp_path / "open.yaml"
    open_config.write_text(yaml.safe_dump({
        "orthanc": {"url": "http://10.2.3.4:8042", "username": "radnode", "password": {"file": str(password)}},
        "egress": {"destinations": {"pacs": "PACS@10.0.0.5:104",
                                    "cloud": {"type": "dicomweb", "url": "http://10.9.9.9/dicom-web"}}},
        "audit": {"syslog": {"host": "127.0.0.1", "transport": "udp"}}}))
    assert main(["config", "check", str(open_config)]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    for setting in ("ingress.plain_listener", "ingress.tls", "ingress.reject_unknown", "orthanc.url",
                    "orthanc.password", "audit.syslog", "egress.destinations.pacs", "egress.destinations.cloud.url"):
        assert any(line.startswith("warn") and f"  {setting}:" in line for line in out.splitlines()), setting
    assert main(["config", "check", str(open_config), "--strict"]) == 1

    key = tmp_path / "node.key"
    key.write_text("key")
    key.chmod(0o600)
    cert = tmp_path / "node.pem"
    cert.write_text("cert")
    closed = tmp_path / "closed.yaml"
    closed.write_text(yaml.safe_dump({"ingress": {
        "host": "127.0.0.1", "plain_listener": False, "reject_unknown": True,
        "allowed_peers": [{"ae_title": "CT01", "host": "10.0.0.20"}],
        "tls": {"certificate": str(cert), "private_key": str(key), "ca_bundle": str(cert),
                "require_client_certificate": True}},
        "egress": {"destinations": {"research": {"type": "dicom", "ae_title": "RESEARCH", "host": "10.9.0.4",
                                                 "port": 2762, "tls": {"ca_bundle": str(cert)},
                                                 "deidentify": "research"}}}}))
    main(["config", "check", str(closed)])
    out = capsys.readouterr().out
    assert "ok    ingress.reject_unknown: on: 1 allowed peer(s)" in out
    assert "ok    ingress.plain_listener: off: TLS only" in out
    assert "ok    ingress.tls.require_client_certificate: on" in out
    assert "ok    egress.destinations.research: RESEARCH@10.9.0.4:2762 (TLS), de-identified (research)" in out
    assert "not a PEM certificate" in out  # checked, not only named


def test_config_check_counts_https_on_the_api_and_warns_for_metrics_open_to_the_network(tmp_path: Path,
                                                                                       capsys) -> None:
    """An API on the network over HTTPS (``api.tls``) is a closed setting, so ``--strict`` passes a node with
    nothing left open; without TLS, or with ``/metrics`` answering without a token off loopback, it warns."""
    from factories import make_pki
    from radnode.security.check import security_findings

    pki = make_pki(tmp_path / "pki", days=400)
    api_tls = {"certificate": str(pki.server_cert), "private_key": str(pki.server_key)}
    closed = {"data_dir": str(tmp_path / "data"),
              "ingress": {"host": "127.0.0.1", "plain_listener": False, "reject_unknown": True,
                          "allowed_peers": [{"ae_title": "CT01", "host": "10.0.0.20"}],
                          "tls": {"certificate": str(pki.server_cert), "private_key": str(pki.server_key),
                                  "ca_bundle": str(pki.ca), "require_client_certificate": True}},
              "audit": {"syslog": {"host": "10.0.0.9", "tls": {"ca_bundle": str(pki.ca)}}},
              "api": {"host": "0.0.0.0", "tls": api_tls}}

    def findings(**api: object) -> dict[str, object]:
        return {f.setting: f for f in security_findings(parse_config({**closed, "api": {**closed["api"], **api}}))}

    https = findings()
    assert not https["api.host"].open and "HTTPS" in https["api.host"].message, https["api.host"]
    assert not https["api.tls.private_key"].open and not https["api.public_metrics"].open
    assert "valid until" in https["api.tls.certificate"].message  # the certificate read, not only named
    assert findings(tls=None)["api.host"].open
    assert findings(public_metrics=True)["api.public_metrics"].open
    assert not findings(host="127.0.0.1", public_metrics=True)["api.public_metrics"].open  # a local Prometheus

    path = tmp_path / "closed.yaml"
    path.write_text(yaml.safe_dump(closed))
    assert main(["config", "check", str(path), "--strict"]) == 0, capsys.readouterr().out
    path.write_text(yaml.safe_dump({**closed, "api": {**closed["api"], "public_metrics": True}}))
    assert main(["config", "check", str(path), "--strict"]) == 1
    assert any(line.startswith("warn") and "  api.public_metrics:" in line
               for line in capsys.readouterr().out.splitlines())


def test_settings_that_would_leave_the_node_deaf_or_closed_to_all_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="plain_listener is false and no tls listener"):
        parse_config({"ingress": {"plain_listener": False}})
    with pytest.raises(ConfigError, match="reject_unknown is set but allowed_peers is empty"):
        parse_config({"ingress": {"reject_unknown": True}})
    with pytest.raises(ConfigError, match="needs certificate and private_key"):
        parse_config({"ingress": {"tls": {"port": 2762}}})
    with pytest.raises(ConfigError, match="require_client_certificate needs ca_bundle"):
        parse_config({"ingress": {"tls": {"certificate": "a", "private_key": "b", "require_client_certificate": True}}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("orthanc: {password: {vault: x}}\n")
    with pytest.raises(ConfigError, match=r"orthanc.password.*\{env: VARIABLE\} or \{file: PATH\}"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"egress.destinations.pacs.deidentify': unknown de-identification profile "
                                          r"'anonymous' \(known: basic, research\)"):
        parse_config({"egress": {"destinations": {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "h",
                                                           "port": 104, "deidentify": "anonymous"}}}})
