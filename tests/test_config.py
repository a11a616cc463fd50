"""Configuration: defaults with no file, and refusals that name the file, the key and the expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from radnode.cli import build_parser, serve_config
from radnode.config import Config, ConfigError, load_config
from radnode.destinations.dicom import DicomDestination
from radnode.destinations.fhir import FhirDestination


def test_no_file_gives_working_defaults() -> None:
    config = load_config(None)
    assert config.ingress.port == 11112 and config.ingress.ae_title == "RADNODE"
    assert config.rules is None and config.store.url is None  # the shipped rules, SQLite under data_dir
    assert config.egress.destinations == {}


def test_valid_file_loads(tmp_path: Path) -> None:
    f = tmp_path / "radnode.yaml"
    f.write_text("ingress:\n  port: 4242\negress:\n  destinations:\n"
                 "    pacs: {type: dicom, ae_title: PACS, host: 10.1.1.1, port: 104}\n"
                 "    ehr: {type: fhir, url: http://ehr/fhir/}\n")
    config = load_config(f)
    assert config.ingress.port == 4242
    assert config.egress.destinations == {"pacs": DicomDestination(ae_title="PACS", host="10.1.1.1", port=104),
                                          "ehr": FhirDestination(url="http://ehr/fhir")}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ingress:\n  prot: 4242\n", r"radnode.yaml: unknown key 'ingress.prot'"),
        ("ingress:\n  port: many\n", r"key 'ingress.port': .*integer"),
        ("ingress:\n  port: 70000\n", r"key 'ingress.port': .*65535"),
        ("uid_root: 1.2.x.\n", r"key 'uid_root': .*UID root"),
        ("egress:\n  fhir_url: ftp://x\n", r"key 'egress.fhir_url': .*http"),
        ("egress:\n  destinations:\n    ehr: {type: fhir, url: ftp://x}\n", r"key 'egress.destinations.ehr.url': .*http"),
        ("ingress: [1, 2\n", r"radnode.yaml: line \d+ not valid YAML"),
        ("- just\n- a list\n", r"expected a mapping"),
        ("processing:\n  default_pipeline: liver\n",
         r"processing.default_pipeline is gone: the routing rules choose .* `pipelines: \[liver\]`"),
        ("store:\n  url: mysql://radnode@db/radnode\n", r"key 'store.url': .*postgresql://"),
        ("processing:\n  models:\n    model_seg: []\n",
         r"radnode.yaml: key 'processing.models': .*'model_seg': expected a model folder or a non-empty list"),
        ("processing:\n  models: [/srv/model]\n", r"radnode.yaml: key 'processing.models': .*dictionary"),
        ("processing:\n  models:\n    model_seg: {dir: /srv/model}\n",
         r"radnode.yaml: key 'processing.models.model_seg': .*list"),
        ("processing:\n  container_engine: docker\n", r"unknown key 'processing.container_engine'"),
        ("containers:\n  engine: lxc\n", r"key 'containers.engine': .*'docker' or 'podman'"),
        ("containers:\n  scratch_size: lots\n", r"key 'containers.scratch_size': .*pattern"),
        ("containers:\n  limits:\n    ct_tissue: {memory: 4GB}\n", r"key 'containers.limits.ct_tissue.memory'"),
        ("containers:\n  user: holoscan\n", r"key 'containers.user': .*pattern"),
        ("containers:\n  network: host\n", r"unknown key 'containers.network'"),
    ],
)
def test_mistakes_are_refused_with_file_key_and_expectation(tmp_path: Path, text: str, expected: str) -> None:
    f = tmp_path / "radnode.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(f)


def test_model_folders_per_pipeline(tmp_path: Path) -> None:
    f = tmp_path / "radnode.yaml"
    f.write_text("processing:\n  models:\n    model_seg: /srv/models/liver\n    lesions: [/srv/f0, /srv/f1]\n")
    assert load_config(f).processing.models == {"model_seg": [Path("/srv/models/liver")],
                                                "lesions": [Path("/srv/f0"), Path("/srv/f1")]}


def test_serve_flags_override_the_file(tmp_path: Path) -> None:
    f = tmp_path / "radnode.yaml"
    f.write_text("ingress: {port: 4242, ae_title: FROMFILE}\n")
    args = build_parser().parse_args(["serve", "--config", str(f), "--port", "5555",
                                      "--destination", "PACS@127.0.0.1:104", "--data-dir", str(tmp_path)])
    config = serve_config(args)
    assert isinstance(config, Config)
    assert (config.ingress.port, config.ingress.ae_title) == (5555, "FROMFILE")
    assert config.egress.destinations["PACS@127.0.0.1:104"].ae_title == "PACS" and config.data_dir == tmp_path
    with pytest.raises(ConfigError, match="AET@HOST:PORT"):
        serve_config(build_parser().parse_args(["serve", "--destination", "nonsense"]))
