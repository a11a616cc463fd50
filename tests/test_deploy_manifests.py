"""The compose and Kubernetes recipes (deploy/compose, deploy/k8s) against radnode's own code.

No container engine runs here, so the images are never built. What is checked instead: every manifest
parses (and validates against the compose-spec and Kubernetes schemas where those validators are
installed); the radnode configurations load with radnode's loader; ports, paths, mounts and probes agree
with those configurations and with the Dockerfiles; the probes' endpoint answers on a real node started
from the recipe's configuration; Orthanc's configuration is what ``radnode orthanc-config`` writes and a
real Orthanc starts with it, loads both plugins and feeds a real node; nginx (when installed) serves the
viewer and proxies /dicom-web to that Orthanc with the recipe's own server block.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from radnode import deploy_manifests as dm
from radnode.config import Config, load_config
from radnode.node.service import Node
from radnode.orthanc_config import write_event_token
from radnode.peers import free_port
from radnode.viewer import DICOMWEB_PREFIX, OHIF_VERSION, ORTHANC_BINARY, render_app_config
from support.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "deploy" / "compose"
K8S = REPO / "deploy" / "k8s"
NGINX_CONF = COMPOSE / "ohif" / "nginx.conf"


# ------------------------------------------------------------------------------------------ helpers

def compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "compose.yaml").read_text())


def k8s_objects() -> list[dict[str, Any]]:
    """Every object the kustomization lists, in order."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((K8S / name).read_text())
            if doc is not None]


def k8s(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in deploy/k8s, found {len(found)}"
    return found[0]


def radnode_config(target: str, tmp_path: Path) -> Config:
    """The recipe's radnode configuration through radnode's own loader (a file, as `radnode serve` reads it)."""
    path = tmp_path / f"{target}-radnode.yaml"
    path.write_text(dm.radnode_config_text(target))
    return load_config(path)


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        if raw.strip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                lines.append((word.upper(), rest.strip()))
            current = ""
    return lines


def image_copies(path: Path, every_stage: bool = False) -> dict[str, str]:
    """Path in the image → source path in the build context, for every COPY from the context into the final stage
    (the image), or into any stage (what the build reads from the context)."""
    workdir, copies = "/", {}
    for word, rest in dockerfile(path):
        if word == "FROM":
            workdir = "/"
            copies = copies if every_stage else {}
        elif word == "WORKDIR":
            workdir = rest if rest.startswith("/") else f"{workdir.rstrip('/')}/{rest}"
        elif word == "COPY" and "--from=" not in rest:
            *sources, dest = shlex.split(rest)
            dest = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
            for source in sources:
                target = f"{dest.rstrip('/')}/{Path(source).name}" if dest.endswith("/") or len(sources) > 1 else dest
                copies[os.path.normpath(target)] = source
    return copies


def in_image(dockerfile_path: Path, context: Path, container_path: str) -> Path | None:
    """The build-context file that ends up at ``container_path`` in the image, or None."""
    for dest, source in sorted(image_copies(dockerfile_path).items(), key=lambda item: -len(item[0])):
        if container_path == dest or container_path.startswith(dest + "/"):
            return context / source / os.path.relpath(container_path, dest)
    return None


def image_user(path: Path) -> int:
    users = [rest for word, rest in dockerfile(path) if word == "USER"]
    assert users, f"{path.name}: no USER, the image would run as root"
    return int(users[-1].split(":")[0])


def image_cmd(path: Path) -> list[str]:
    return json.loads([rest for word, rest in dockerfile(path) if word == "CMD"][-1])


def dockerignored(ignore_file: Path, relpath: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = Path(relpath).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for line in ignore_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!")
        pattern = pattern.replace("**/", "*")
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            ignored = not negate
    return ignored


def volume_mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Compose short-syntax volumes: target → (source, read-only)."""
    mounts = {}
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        mounts[target] = (source, "ro" in mode)
    return mounts


def container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(p).rsplit(":", 1)[-1]) for p in service.get("ports", [])}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def named_port(spec: dict[str, Any], port: int | str) -> int:
    """A Service/probe port (number or container port name) as the container port number."""
    if isinstance(port, int):
        return port
    found = [p["containerPort"] for c in spec["containers"] for p in c.get("ports", []) if p.get("name") == port]
    assert len(found) == 1, f"container port {port!r} not defined"
    return found[0]


def service_target(service: dict[str, Any], port_name: str, workload: dict[str, Any]) -> int:
    assert service["spec"]["selector"].items() <= workload["spec"]["template"]["metadata"]["labels"].items(), \
        f"Service {service['metadata']['name']} does not select {workload['metadata']['name']}'s pods"
    port = next(p for p in service["spec"]["ports"] if p["name"] == port_name)
    return named_port(pod_spec(workload), port.get("targetPort", port["port"]))


def nginx_directives() -> dict[str, Any]:
    """nginx.conf's listen port and its locations with their directives (a small parser for one server)."""
    text = re.sub(r"#.*", "", NGINX_CONF.read_text())
    locations = {}
    for m in re.finditer(r"location\s+([^{]+)\{", text):
        depth, end = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        locations[m.group(1).strip()] = text[m.end():end - 1]
    return {"listen": int(re.search(r"listen\s+(\d+)\s*;", text).group(1)), "locations": locations}


def orthanc_settings_of(target: str) -> dict[str, Any]:
    if target == "compose":
        return json.loads((COMPOSE / "orthanc" / "orthanc.json").read_text())
    return json.loads(k8s("ConfigMap", "orthanc-config")["data"]["orthanc.json"])


TARGETS = ["compose", "k8s"]


# ------------------------------------------------------------------------------------------ parsing

def test_every_manifest_parses_and_kustomization_lists_every_file() -> None:
    for path in sorted([*COMPOSE.rglob("*"), *K8S.rglob("*")]):
        if path.suffix in (".yaml", ".yml"):
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            assert docs, f"{path}: empty"
        elif path.suffix == ".json":
            json.loads(path.read_text())
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    for obj in k8s_objects():
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj


def test_compose_file_validates_against_the_compose_spec() -> None:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema carries the compose-spec schema")
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                             "vendor.compose-spec", str(COMPOSE / "compose.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_k8s_objects_validate_against_the_kubernetes_schema() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    for obj in k8s_objects():
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for its built-in kustomize) is not installed")
def test_kustomize_renders_every_object_into_the_namespace() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(rendered) == len(k8s_objects())
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "radnode", obj["metadata"]


# ------------------------------------------------------------------------------- radnode configuration

@pytest.mark.parametrize("target", TARGETS)
def test_radnode_configuration_loads_and_suits_a_container(target: str, tmp_path: Path) -> None:
    config = radnode_config(target, tmp_path)
    assert config.data_dir.is_absolute()
    assert config.ingress.host == "0.0.0.0" and config.api.host == "0.0.0.0", \
        "inside a container, loopback is unreachable for other containers and probes"
    assert config.orthanc.url and config.api.enabled, "Orthanc in front; the API (health) on without it too"
    assert config.containers.engine is None, "the node's image has no container engine"
    # The rule file is the one the image ships, and it loads against this configuration as the node loads it.
    rules = in_image(COMPOSE / "Dockerfile.node", REPO, str(config.rules))
    assert rules is not None and rules.is_file(), f"{config.rules} is not in the node's image"
    assert Node(config.model_copy(update={"rules": rules})).load_rules() is not None


def test_compose_mounts_the_config_and_keeps_every_written_path_on_a_volume(tmp_path: Path) -> None:
    config = radnode_config("compose", tmp_path)
    spec = compose()
    node = spec["services"]["radnode"]
    mounts = volume_mounts(node)
    cmd = image_cmd(COMPOSE / "Dockerfile.node")
    config_path = cmd[cmd.index("--config") + 1]
    assert mounts[config_path] == ("./radnode.yaml", True)
    # Everything the node writes lives under data_dir: one named (persistent) volume, nothing mounted below
    # it (jobs/<id>/in/ hard-links spool/ files, so they must share a filesystem).
    data_dir = str(config.data_dir)
    source, read_only = mounts[data_dir]
    assert source in spec["volumes"] and not read_only
    assert not [t for t in mounts if t.startswith(data_dir + "/")]
    assert any(word == "RUN" and f"-o radnode -g radnode -m 0750 {data_dir}" in rest
               for word, rest in dockerfile(COMPOSE / "Dockerfile.node")), "data_dir must belong to the node's user"


def test_compose_ports_and_healthchecks_agree_with_the_configurations(tmp_path: Path) -> None:
    config = radnode_config("compose", tmp_path)
    services = compose()["services"]
    node = services["radnode"]
    assert container_ports(node) == {config.ingress.port}, "only DICOM is published; the API stays internal"
    assert str(config.api.port) in node["expose"]
    health = " ".join(node["healthcheck"]["test"])
    assert re.search(rf"http://127\.0\.0\.1:{config.api.port}/health\b", health)
    orthanc = orthanc_settings_of("compose")
    assert container_ports(services["orthanc"]) == {orthanc["HttpPort"], orthanc["DicomPort"]}
    assert f"127.0.0.1:{orthanc['HttpPort']}/system" in " ".join(services["orthanc"]["healthcheck"]["test"])
    assert container_ports(services["ohif"]) == {nginx_directives()["listen"]}
    assert "nvidia" in json.dumps(node["deploy"]["resources"]["reservations"]["devices"])


def _probe_paths(target: str, config: Config) -> set[str]:
    """The HTTP paths the recipe's health checks ask of the node, each checked to go to api.port."""
    if target == "compose":
        return set(re.findall(rf"http://127\.0\.0\.1:{config.api.port}(/[\w/.-]*)",
                              " ".join(compose()["services"]["radnode"]["healthcheck"]["test"])))
    spec = pod_spec(k8s("StatefulSet", "radnode"))
    probes = [spec["containers"][0][k] for k in ("startupProbe", "readinessProbe", "livenessProbe")]
    assert {named_port(spec, p["httpGet"]["port"]) for p in probes} == {config.api.port}
    return {p["httpGet"]["path"] for p in probes}


@pytest.mark.parametrize("target", TARGETS)
def test_health_checks_hit_an_endpoint_a_real_node_answers(target: str, tmp_path: Path) -> None:
    config = radnode_config(target, tmp_path)
    paths = _probe_paths(target, config)
    assert paths
    rules = in_image(COMPOSE / "Dockerfile.node", REPO, str(config.rules))
    local = config.model_copy(update={
        "data_dir": tmp_path / "data", "rules": rules,
        "ingress": config.ingress.model_copy(update={"port": 0, "host": "127.0.0.1"}),
        "api": config.api.model_copy(update={"port": 0, "host": "127.0.0.1"}),
        "orthanc": config.orthanc.model_copy(update={"url": None})})  # probes must not depend on Orthanc
    with Node(local) as node:
        for path in paths:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}{path}", timeout=10) as r:
                assert r.status == 200
                assert json.loads(r.read())["status"] == "ok"


# ------------------------------------------------------------------------------------------- Kubernetes

def test_k8s_node_workload(tmp_path: Path) -> None:
    config = radnode_config("k8s", tmp_path)
    sts = k8s("StatefulSet", "radnode")
    spec = pod_spec(sts)
    (container,) = spec["containers"]
    assert sts["spec"]["replicas"] == 1, "one writer for the SQLite job store and the spool"
    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == image_user(COMPOSE / "Dockerfile.node")
    assert security["fsGroup"] == security["runAsGroup"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys() and resources["limits"]["nvidia.com/gpu"] == 1
    assert container["args"] == image_cmd(COMPOSE / "Dockerfile.node")
    assert container["image"].split(":")[0] == compose()["services"]["radnode"]["image"].split(":")[0]
    # The ConfigMap's key is the file --config names; the PVC is data_dir.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_path = Path(container["args"][container["args"].index("--config") + 1])
    assert volumes[mounts[str(config_path.parent)]]["configMap"]["name"] == "radnode-config"
    assert config_path.name in k8s("ConfigMap", "radnode-config")["data"]
    claim = mounts[str(config.data_dir)]
    assert claim in {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert not [m for m in mounts if m.startswith(str(config.data_dir) + "/")]
    # Services reach the configured ports.
    assert service_target(k8s("Service", "radnode-dicom"), "dicom", sts) == config.ingress.port
    api = k8s("Service", "radnode-api")
    assert service_target(api, "api", sts) == config.api.port
    # Orthanc's plugin posts to that Service; the node pulls from the orthanc Service.
    node_url = urlsplit(orthanc_settings_of("k8s")["RadNode"]["NodeUrl"])
    assert (node_url.hostname, node_url.port) == ("radnode-api", api["spec"]["ports"][0]["port"])
    orthanc_url = urlsplit(config.orthanc.url)
    orthanc_service = k8s("Service", "orthanc")
    assert orthanc_url.hostname == "orthanc"
    assert orthanc_url.port in {p["port"] for p in orthanc_service["spec"]["ports"]}
    http_port = service_target(orthanc_service, "http", k8s("Deployment", "orthanc"))
    assert http_port == orthanc_settings_of("k8s")["HttpPort"]
    # The NetworkPolicy lets DICOM in from anywhere and the API only from Orthanc's pods.
    policy = k8s("NetworkPolicy", "radnode")["spec"]
    orthanc_labels = k8s("Deployment", "orthanc")["spec"]["template"]["metadata"]["labels"]
    rules = {r["ports"][0]["port"]: r.get("from") for r in policy["ingress"]}
    assert rules[config.ingress.port] is None
    assert rules[config.api.port][0]["podSelector"]["matchLabels"].items() <= orthanc_labels.items()


def test_k8s_orthanc_and_viewer_workloads() -> None:
    settings = orthanc_settings_of("k8s")
    orthanc = k8s("Deployment", "orthanc")
    spec = pod_spec(orthanc)
    (container,) = spec["containers"]
    assert spec["securityContext"]["runAsUser"] == image_user(COMPOSE / "Dockerfile.orthanc")
    assert container["args"] == image_cmd(COMPOSE / "Dockerfile.orthanc")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts[str(Path(container["args"][0]).parent)]]["configMap"]["name"] == "orthanc-config"
    storage = volumes[mounts[str(dm.ORTHANC_STORAGE)]]["persistentVolumeClaim"]["claimName"]
    k8s("PersistentVolumeClaim", storage)
    assert Path(settings["StorageDirectory"]).is_relative_to(dm.ORTHANC_STORAGE)
    assert named_port(spec, container["readinessProbe"]["httpGet"]["port"]) == settings["HttpPort"]
    assert service_target(k8s("Service", "orthanc-dicom"), "dicom", orthanc) == settings["DicomPort"]
    ohif = k8s("Deployment", "ohif")
    assert service_target(k8s("Service", "ohif"), "http", ohif) == nginx_directives()["listen"]
    assert pod_spec(ohif)["securityContext"]["runAsNonRoot"] is True


# --------------------------------------------------------------------------------------------- Orthanc

@pytest.mark.parametrize("target", TARGETS)
def test_orthanc_configuration_is_what_radnode_orthanc_config_writes(target: str, tmp_path: Path) -> None:
    from radnode.cli import main

    settings = orthanc_settings_of(target)
    out = tmp_path / "orthanc"
    assert main(["orthanc-config", "--output", str(out), "--node-url", settings["RadNode"]["NodeUrl"],
                 "--http-port", str(settings["HttpPort"]), "--dicom-port", str(settings["DicomPort"])]) == 0
    written = json.loads((out / "orthanc.json").read_text())
    # The same settings with the image's paths, and remote access on (other containers call Orthanc's API).
    written["StorageDirectory"] = written["IndexDirectory"] = str(dm.ORTHANC_STORAGE / "db")
    written["PythonScript"] = str(dm.PLUGIN_IN_IMAGE)
    written["RemoteAccessAllowed"] = True
    written["RadNode"]["TokenFile"] = "/run/secrets/radnode-orthanc-token"  # the secret both containers mount
    assert settings == written
    # The plugin is where the image puts it, the configuration where the image's command reads it.
    plugin = in_image(COMPOSE / "Dockerfile.orthanc", REPO, settings["PythonScript"])
    assert plugin == REPO / "orthanc" / "radnode_plugin.py"
    assert image_cmd(COMPOSE / "Dockerfile.orthanc") == [str(dm.ORTHANC_CONFIG_DIR / "orthanc.json")]


def test_compose_orthanc_service_matches_its_configuration(tmp_path: Path) -> None:
    config = radnode_config("compose", tmp_path)
    settings = orthanc_settings_of("compose")
    services = compose()["services"]
    node_url = urlsplit(settings["RadNode"]["NodeUrl"])
    assert node_url.hostname in services and str(node_url.port) in services[node_url.hostname]["expose"]
    assert node_url.port == config.api.port
    orthanc_url = urlsplit(config.orthanc.url)
    assert orthanc_url.hostname == "orthanc" and orthanc_url.port == settings["HttpPort"]
    mounts = volume_mounts(services["orthanc"])
    assert mounts[image_cmd(COMPOSE / "Dockerfile.orthanc")[0]] == ("./orthanc/orthanc.json", True)
    source, _ = mounts[str(dm.ORTHANC_STORAGE)]
    assert source in compose()["volumes"]


def test_orthanc_image_installs_the_packages_that_own_the_plugins() -> None:
    install = " ".join(rest for word, rest in dockerfile(COMPOSE / "Dockerfile.orthanc") if word == "RUN")
    packages = set(re.findall(r"[\w.+-]+", install.split("--no-install-recommends", 1)[1].split("&&")[0]))
    assert {"orthanc", "orthanc-python", "orthanc-dicomweb"} <= packages
    if shutil.which("dpkg") is None:
        pytest.skip("dpkg is not here to say which package owns each plugin")
    for plugin in orthanc_settings_of("compose")["Plugins"]:
        owner = subprocess.run(["dpkg", "-S", plugin], capture_output=True, text=True)
        if owner.returncode != 0:
            pytest.skip(f"{plugin} is not installed here (scripts/bootstrap.sh installs it)")
        assert owner.stdout.split(":")[0] in packages, owner.stdout


@pytest.fixture
def deployed_orthanc(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A real Orthanc started with the compose orthanc.json, its paths and ports moved onto this machine."""
    if not ORTHANC_BINARY.exists():
        pytest.skip("Orthanc is not installed (scripts/bootstrap.sh)")
    storage = Path("/var/tmp") / f"radnode-deploy-{tmp_path.name}"  # Orthanc's SQLite misbehaves under /tmp
    settings = orthanc_settings_of("compose")
    settings.update(StorageDirectory=str(storage / "db"), IndexDirectory=str(storage / "db"),
                    PythonScript=str(REPO / "orthanc" / "radnode_plugin.py"), HttpPort=free_port(),
                    DicomPort=free_port())
    settings["RadNode"]["NodeUrl"] = f"http://127.0.0.1:{free_port()}"
    storage.mkdir(parents=True)
    token = storage / "radnode-orthanc-token"  # the recipe's secret, here a file the test makes
    write_event_token(token)
    settings["RadNode"]["TokenFile"] = str(token)
    (storage / "orthanc.json").write_text(json.dumps(settings))
    log = storage / "orthanc.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(ORTHANC_BINARY), str(storage / "orthanc.json")], stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{settings['HttpPort']}"

    def answers() -> bool:
        assert process.poll() is None, log.read_text(errors="replace")[-2000:]
        try:
            with urllib.request.urlopen(f"{url}/system", timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_until(answers, timeout=30, step=0.2)
        yield {"settings": settings, "url": url, "log": log}
    finally:
        process.terminate()
        process.wait(timeout=20)
        shutil.rmtree(storage, ignore_errors=True)


def test_orthanc_starts_with_the_recipe_configuration_and_feeds_a_real_node(
        deployed_orthanc: dict[str, Any], tmp_path: Path) -> None:
    from factories import write_chest_phantom

    url, settings = deployed_orthanc["url"], deployed_orthanc["settings"]
    with urllib.request.urlopen(f"{url}/plugins", timeout=10) as r:
        assert {"dicom-web", "python"} <= set(json.loads(r.read()))
    config = radnode_config("compose", tmp_path)
    node_port = urlsplit(settings["RadNode"]["NodeUrl"]).port
    local = config.model_copy(update={
        "data_dir": tmp_path / "data", "rules": in_image(COMPOSE / "Dockerfile.node", REPO, str(config.rules)),
        "ingress": config.ingress.model_copy(update={"port": 0, "host": "127.0.0.1"}),
        "api": config.api.model_copy(update={"port": node_port, "host": "127.0.0.1"}),
        "orthanc": config.orthanc.model_copy(update={"url": url,
                                                     "event_token_file": Path(settings["RadNode"]["TokenFile"])})})
    files = write_chest_phantom(tmp_path / "ct", n_slices=2, rows=16, columns=16)
    with Node(local):
        for path in files:
            request = urllib.request.Request(f"{url}/instances", data=path.read_bytes(), method="POST",
                                             headers={"Content-Type": "application/dicom"})
            urllib.request.urlopen(request, timeout=30).close()
        # The plugin's events reach the node at NodeUrl; the node pulls the instances from orthanc.url.
        wait_until(lambda: len(list((tmp_path / "data" / "spool").rglob("*.dcm"))) == len(files), timeout=30)


# ------------------------------------------------------------------------------------------------- OHIF

def test_viewer_proxy_matches_viewer_py_and_orthanc() -> None:
    nginx = nginx_directives()
    proxied = nginx["locations"][DICOMWEB_PREFIX + "/"]
    for target in TARGETS:
        settings = orthanc_settings_of(target)
        assert f"proxy_pass http://orthanc:{settings['HttpPort']}{settings['DicomWeb']['Root']};" in proxied
    assert "orthanc" in compose()["services"] and k8s("Service", "orthanc")
    assert "try_files $uri $uri/ /index.html;" in nginx["locations"]["/"]
    app_config = (COMPOSE / "ohif" / "app-config.js").read_text()
    assert app_config == render_app_config()
    assert f"wadoRoot: '{DICOMWEB_PREFIX}'" in app_config and f"qidoRoot: '{DICOMWEB_PREFIX}'" in app_config
    ohif = dict(dockerfile(COMPOSE / "ohif" / "Dockerfile"))
    args = [rest for word, rest in dockerfile(COMPOSE / "ohif" / "Dockerfile") if word == "ARG"]
    assert f"OHIF_VERSION={OHIF_VERSION}" in args, "keep the image's OHIF in step with radnode/viewer.py"
    copies = image_copies(COMPOSE / "ohif" / "Dockerfile")
    assert copies["/etc/nginx/conf.d/default.conf"] == "nginx.conf"
    assert copies["/usr/share/nginx/html/app-config.js"] == "app-config.js"
    assert ohif["FROM"].startswith("nginxinc/nginx-unprivileged:"), "the viewer runs as a non-root user"


def _nginx() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


@pytest.mark.skipif(_nginx() is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_nginx_serves_the_viewer_and_proxies_dicomweb_to_orthanc(deployed_orthanc: dict[str, Any],
                                                                  tmp_path: Path) -> None:
    from factories import write_chest_phantom

    binary, url = _nginx(), deployed_orthanc["url"]
    files = write_chest_phantom(tmp_path / "ct", n_slices=1, rows=16, columns=16)
    request = urllib.request.Request(f"{url}/instances", data=files[0].read_bytes(), method="POST",
                                     headers={"Content-Type": "application/dicom"})
    urllib.request.urlopen(request, timeout=30).close()
    html = tmp_path / "html"
    html.mkdir()
    (html / "index.html").write_text("<!doctype html><title>OHIF</title>")
    shutil.copy2(COMPOSE / "ohif" / "app-config.js", html / "app-config.js")
    port = free_port()
    server = NGINX_CONF.read_text().replace("listen 8080;", f"listen 127.0.0.1:{port};") \
        .replace("root /usr/share/nginx/html;", f"root {html};") \
        .replace(f"http://orthanc:{orthanc_settings_of('compose')['HttpPort']}", url)
    assert f"listen 127.0.0.1:{port};" in server and url in server
    mime = Path(binary).resolve().parents[2] / "etc" / "nginx" / "mime.types"
    mime = mime if mime.is_file() else Path("/etc/nginx/mime.types")
    temp = {k: tmp_path / k for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    main_conf = tmp_path / "nginx.conf"
    main_conf.write_text(
        ("user root;\n" if os.geteuid() == 0 else "") +
        f"daemon off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        "events {}\nhttp {\n" + (f"include {mime};\n" if mime.is_file() else "") +
        "access_log off;\n" + "".join(f"{k}_temp_path {v};\n" for k, v in temp.items()) + server + "\n}\n")
    check = subprocess.run([binary, "-t", "-c", str(main_conf), "-e", str(tmp_path / "error.log")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    process = subprocess.Popen([binary, "-c", str(main_conf), "-e", str(tmp_path / "error.log")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            urllib.request.urlopen(base + "/app-config.js", timeout=2).close()
            return True
        except OSError:
            return False

    try:
        wait_until(up, timeout=15, step=0.1)
        with urllib.request.urlopen(base + "/app-config.js", timeout=10) as r:
            assert r.read().decode() == render_app_config()
            assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        with urllib.request.urlopen(base + "/viewer?StudyInstanceUIDs=1.2.3", timeout=10) as r:
            assert b"<title>OHIF</title>" in r.read()
            assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
        with urllib.request.urlopen(base + DICOMWEB_PREFIX + "/studies", timeout=10) as r:
            studies = json.loads(r.read())
            assert r.headers["Cross-Origin-Resource-Policy"] == "same-origin"
        uid = studies[0]["0020000D"]["Value"][0]
        import pydicom

        assert uid == pydicom.dcmread(files[0]).StudyInstanceUID
        with pytest.raises(urllib.error.HTTPError) as refused:  # only GET/POST pass the proxy
            urllib.request.urlopen(urllib.request.Request(base + DICOMWEB_PREFIX + "/studies/" + uid,
                                                          method="DELETE"), timeout=10)
        assert refused.value.code == 403
    finally:
        process.terminate()
        process.wait(timeout=10)


# ------------------------------------------------------------------------------------------- the images

def test_node_image_recipe_matches_the_package_and_the_bootstrap() -> None:
    path = COMPOSE / "Dockerfile.node"
    copies = image_copies(path, every_stage=True)
    sources = set(copies.values())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = set(pyproject["tool"]["setuptools"]["package-dir"].values()) | {"pyproject.toml",
                                                                             pyproject["project"]["readme"]}
    assert needed <= sources, f"Dockerfile.node does not copy {needed - sources}"
    torch = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    args = [rest for word, rest in dockerfile(path) if word == "ARG"]
    assert f"TORCH_VERSION={torch.split('==')[1]}" in args
    bootstrap_pin = re.search(r"deepbet==[\d.]+", (REPO / "scripts" / "bootstrap.sh").read_text()).group(0)
    assert bootstrap_pin in path.read_text()
    assert dict(dockerfile(path))["FROM"].startswith("python:3.11")
    assert image_user(path) != 0
    # radnode is installed from its wheel (built in the first stage), never editable: the image has no source tree.
    runs = [rest for word, rest in dockerfile(path) if word == "RUN"]
    assert any("pip wheel --no-deps" in r for r in runs) and not any(re.search(r"pip install .*(-e|--editable)\b", r)
                                                                      for r in runs)
    assert any(re.search(r"pip install /tmp/dist/radnode-\*\.whl", r) for r in runs)
    assert not set(image_copies(path).values()) & set(pyproject["tool"]["setuptools"]["package-dir"].values())
    # What the build copies from the repository is not dockerignored; the bulky local folders are.
    build_files = {"radnode": (path, COMPOSE / "Dockerfile.node.dockerignore"),
                   "orthanc": (COMPOSE / "Dockerfile.orthanc", COMPOSE / "Dockerfile.orthanc.dockerignore")}
    for service, (docker_file, ignore) in build_files.items():
        build = compose()["services"][service]["build"]
        assert (COMPOSE / build["context"]).resolve() == REPO
        assert REPO / build["dockerfile"] == docker_file and ignore.name == docker_file.name + ".dockerignore"
        for source in image_copies(docker_file, every_stage=True).values():
            assert (REPO / source).exists(), source
            assert not dockerignored(ignore, source), f"{ignore.name} keeps {source} out of the build"
    for bulky in (".venv", ".cache", "build", "radnode/__pycache__"):
        assert dockerignored(COMPOSE / "Dockerfile.node.dockerignore", bulky)
    assert (COMPOSE / compose()["services"]["ohif"]["build"]["context"]).resolve() == COMPOSE / "ohif"


def test_generated_files_are_current() -> None:
    stale = [str(p.relative_to(REPO)) for p, text in dm.generated().items()
             if not p.is_file() or p.read_text() != text]
    assert not stale, f"regenerate with `python -m radnode.deploy_manifests`: {stale}"
