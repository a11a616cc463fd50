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
from radnode.security.secrets import REDACTED, Secret, SecretError


def test_a_secret_is_read_where_it_lives_and_never_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORTHANC_PW", "from-the-environment")
    secret_file = tmp_path / "pw"
    secret_file.write_text("from-a-file\n")
    secret_file.chmod(0o600)
    for value, expected, reference in (({"env": "ORTHANC_PW"}, "from-the-environment", {"env": "ORTHANC_PW"}),
                                       ({"file": str(secret_file)}, "from-a-file", {"file": str(secret_file)}),
                                       ("written-in-clear", "written-in-clear", REDACTED)):
        config = parse_config({"orthanc": {"url": "http://127.0.0.1:8042", "username": "u", "password": value}})
        assert config.orthanc.password.reveal() == expected
        assert expected not in repr(config) and expected not in str(config.orthanc)
        assert config.model_dump(mode="json")["orthanc"]["password"] == reference
    with pytest.raises(SecretError, match=r"\$NOT_SET_ANYWHERE is not set") as e:
        Secret(env="NOT_SET_ANYWHERE").reveal()
    assert "from" not in str(e.value)
    secret_file.chmod(0o644)
    assert "readable by others" in Secret(file=secret_file).problems()[0]


def test_node_config_for_jobs_is_owner_only_and_holds_no_secret(tmp_path: Path) -> None:
    config = parse_config({"data_dir": str(tmp_path / "data"), "ingress": {"host": "127.0.0.1", "port": 0},
                           "orthanc": {"password": "the-orthanc-password"}})
    (tmp_path / "data").mkdir(mode=0o755)
    (tmp_path / "data" / "old.log").write_text("left by an older version")
    (tmp_path / "data" / "old.log").chmod(0o644)
    with Node(config):
        written = tmp_path / "data" / "node-config.yaml"
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
        assert "the-orthanc-password" not in written.read_text()
        assert yaml.safe_load(written.read_text())["orthanc"]["password"] == REDACTED
        assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "data" / "old.log").stat().st_mode) == 0o600


def test_config_check_reports_each_setting_and_warns_for_what_is_left_open(tmp_path: Path, capsys) -> None:
    open_config = tmp_path / "open.yaml"
    open_config.write_text(yaml.safe_dump({"orthanc": {"url": "http://10.2.3.4:8042", "username": "radnode",
                                                       "password": "hunter2-in-clear"},
                                           "audit": {"syslog": {"host": "127.0.0.1", "transport": "udp"}}}))
    assert main(["config", "check", str(open_config)]) == 0
    out = capsys.readouterr().out
    assert "hunter2-in-clear" not in out
    for setting in ("ingress.plain_listener", "ingress.tls", "ingress.reject_unknown", "orthanc.url",
                    "orthanc.password", "audit.syslog"):
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
                "require_client_certificate": True}}}))
    main(["config", "check", str(closed)])
    out = capsys.readouterr().out
    assert "ok    ingress.reject_unknown: on: 1 allowed peer(s)" in out
    assert "ok    ingress.plain_listener: off: TLS only" in out
    assert "ok    ingress.tls.require_client_certificate: on" in out
    assert "not a PEM certificate" in out  # checked, not only named


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
