"""The distributed-engine recipes (compose override, Kubernetes workers, the systemd worker unit) against
radnode's own code, offline as the other recipes are checked: they parse and validate against their
schemas, their configurations load with radnode's loader, and mounts, hosts and timeouts agree."""

from __future__ import annotations

import configparser
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from radnode.cli import build_parser
from radnode.config import load_config

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "deploy" / "compose"
WORKERS = REPO / "deploy" / "k8s" / "workers"


def _cluster_compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "compose.cluster.yaml").read_text())


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    return {spec.split(":")[1]: spec.split(":")[0] for spec in service.get("volumes", [])}


def test_compose_override_validates_and_its_configuration_loads(tmp_path: Path) -> None:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema carries the compose-spec schema")
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(COMPOSE / "compose.cluster.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    config = load_config(COMPOSE / "radnode-cluster.yaml")
    services = _cluster_compose()["services"]
    assert config.engine.kind == "celery" and config.storage.kind == "shared_dir"
    assert urlsplit(config.engine.broker_url).hostname in services  # type: ignore[arg-type]
    assert urlsplit(config.store.url).hostname in services  # type: ignore[arg-type]
    # The node and every worker mount the same configuration and the same shared volume at storage.path.
    for name in ("radnode", "worker"):
        mounts = _mounts(services[name])
        assert mounts["/etc/radnode/radnode.yaml"] == "./radnode-cluster.yaml"
        assert mounts[str(config.storage.path)] == "radnode-shared"
    assert "radnode-shared" in _cluster_compose()["volumes"]


def test_compose_workers_reserve_a_gpu_each_and_run_radnode_worker() -> None:
    worker = _cluster_compose()["services"]["worker"]
    assert worker["deploy"]["replicas"] >= 2
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == 1 and device["capabilities"] == ["gpu"]
    args = build_parser().parse_args(worker["command"])
    assert args.command == "worker" and args.gpus == "0" and args.config == "/etc/radnode/radnode.yaml"


def test_rabbitmq_consumer_timeout_exceeds_the_longest_job() -> None:
    config = load_config(COMPOSE / "radnode-cluster.yaml")
    text = (COMPOSE / "rabbitmq.conf").read_text()
    timeout_ms = int(re.search(r"^consumer_timeout\s*=\s*(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    assert timeout_ms / 1000 > config.processing.job_timeout_seconds
    rabbit = _cluster_compose()["services"]["rabbitmq"]
    assert _mounts(rabbit)["/etc/rabbitmq/conf.d/90-radnode.conf"] == "./rabbitmq.conf"
    assert urlsplit(config.engine.broker_url).path.lstrip("/") == rabbit["environment"]["RABBITMQ_DEFAULT_VHOST"]


def _worker_objects() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((WORKERS / "kustomization.yaml").read_text())
    return [d for name in kustomization["resources"] for d in yaml.safe_load_all((WORKERS / name).read_text()) if d]


def test_k8s_workers_validate_request_a_gpu_and_have_a_disruption_budget(tmp_path: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = _worker_objects()
    version = kubernetes_validate.latest_version()
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)
    by_kind = {o["kind"]: o for o in objects}
    deployment, budget = by_kind["Deployment"], by_kind["PodDisruptionBudget"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    assert budget["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "worker"
    config_file = tmp_path / "radnode.yaml"
    config_file.write_text(by_kind["ConfigMap"]["data"]["radnode.yaml"])
    config = load_config(config_file)
    assert config.engine.kind == "celery"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts[str(config.storage.path)]]["persistentVolumeClaim"]["claimName"] == \
        by_kind["PersistentVolumeClaim"]["metadata"]["name"]
    assert by_kind["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_systemd_worker_unit_runs_one_worker_per_gpu_instance() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment]
    unit.read(REPO / "deploy" / "systemd" / "radnode-worker@.service")
    argv = shlex.split(unit["Service"]["ExecStart"].replace("%i", "1").replace("%H", "gpuhost"))
    assert argv[0].endswith("/radnode")
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.gpus, args.name) == ("worker", "1", "radnode-gpuhost-gpu1")
    assert int(unit["Service"]["TimeoutStopSec"]) > load_config(COMPOSE / "radnode-cluster.yaml").processing.job_timeout_seconds
