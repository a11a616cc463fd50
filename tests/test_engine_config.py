"""The distributed engine's settings, checked before anything runs: each problem refused with one line
naming it (the broker unreachable, the database unreachable, the storage not writable)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from radnode.config import ConfigError, parse_config
from radnode.peers import free_port
from radnode.pipelines.rules import parse_rules


def _radnode(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "radnode", *args], capture_output=True, text=True, timeout=120)


def _config(tmp_path: Path, **settings: object) -> Path:
    path = tmp_path / "radnode.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), **settings}))
    return path


def test_the_celery_engine_needs_a_broker_url_and_a_shared_store() -> None:
    with pytest.raises(ConfigError, match="engine.kind celery needs engine.broker_url"):
        parse_config({"engine": {"kind": "celery"}, "store": {"url": "postgresql://u@h/db"}})
    with pytest.raises(ConfigError, match=r"needs store.url \(PostgreSQL\)"):
        parse_config({"engine": {"kind": "celery", "broker_url": "amqp://guest:guest@127.0.0.1:5672/"}})
    with pytest.raises(ConfigError, match="expected an amqp:// or amqps:// URL"):
        parse_config({"engine": {"broker_url": "redis://127.0.0.1:6379/0"}})
    with pytest.raises(ConfigError, match="storage.kind s3 needs storage.bucket"):
        parse_config({"storage": {"kind": "s3"}})
    assert parse_config({}).engine.kind == "local"  # no engine settings: the node runs as it always did


def test_a_rule_sends_its_pipeline_to_a_named_queue() -> None:
    rules = parse_rules(yaml.safe_dump({"rules": [
        {"name": "big-ct", "when": {"Modality": "CT"}, "pipelines": ["ct_tissue"], "queue": "large-gpu"}]}))
    assert rules.rules[0].decision.queue == "large-gpu"
    assert "queue large-gpu" in rules.rules[0].describe_actions()


@pytest.mark.slow
def test_an_unreachable_broker_stops_serve_and_worker_at_start_in_one_line(tmp_path: Path, postgres_url: str) -> None:
    broker = f"amqp://guest:secret@127.0.0.1:{free_port()}/radnode"
    config = _config(tmp_path, store={"url": postgres_url}, engine={"kind": "celery", "broker_url": broker},
                     ingress={"host": "127.0.0.1", "port": 0}, api={"port": 0})
    for command in (("serve", "--config", str(config)), ("worker", "--config", str(config), "--cpu")):
        result = _radnode(*command)
        assert result.returncode == 2, result.stderr
        line = result.stderr.strip().splitlines()[-1]  # serve logs its progress (INFO) before; the refusal is one line
        assert line.startswith(f"radnode: broker amqp://guest:**@127.0.0.1:") and "unreachable" in line, line
        assert "Traceback" not in result.stderr and "store" not in result.stderr, result.stderr
        assert "secret" not in line


@pytest.mark.slow
def test_an_unreachable_database_or_unwritable_storage_stops_a_worker_in_one_line(tmp_path: Path) -> None:
    store = f"postgresql://radnode:secret@127.0.0.1:{free_port()}/radnode"
    config = _config(tmp_path, store={"url": store},
                     engine={"kind": "celery", "broker_url": "amqp://guest:guest@127.0.0.1:1/"})
    result = _radnode("worker", "--config", str(config), "--cpu")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("radnode: job store postgresql://radnode:***@127.0.0.1:") and "unreachable" in line, line


@pytest.mark.slow
def test_unwritable_storage_stops_a_worker_in_one_line(tmp_path: Path, postgres_url: str) -> None:
    (tmp_path / "a-file").write_text("")
    config = _config(tmp_path, store={"url": postgres_url}, storage={"path": str(tmp_path / "a-file" / "shared")},
                     engine={"kind": "celery", "broker_url": "amqp://guest:guest@127.0.0.1:1/"})
    result = _radnode("worker", "--config", str(config), "--cpu")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("radnode: storage shared folder ") and "is not writable" in line, line
