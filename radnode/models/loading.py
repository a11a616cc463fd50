"""Loading a model folder a hospital points the node to, and checking one before it is deployed.

Recognised layouts:

* **MONAI bundle**: ``configs/metadata.json`` (+ ``configs/inference.json``/``.yaml``) and weights in
  ``models/`` as TorchScript (``model.ts``) or a state dict (``model.pt``) for the config's ``network_def``.
  Labels come from ``network_data_format.outputs.pred.channel_def``; codes and preprocessing from an
  optional ``radnode`` section of the metadata, else from the inference config's transforms.
* **TorchScript + sidecar**: ``model.yaml`` (see :func:`radnode.models.spec.parse_model_yaml`) naming its
  weights file (``weights: model.ts``; several for an ensemble).
* **nnU-Net / TotalSegmentator results folder** (``dataset.json`` + ``plans.json``): recognised, and
  refused with a clear message unless the ``nnunetv2`` package is installed (it is not a radnode dependency).

Every loaded network is probed with one patch of zeros, so missing or mismatched weights fail when the
pipeline starts, not in the middle of a study.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from radnode.models.errors import ModelError
from radnode.models.spec import ModelSpec, parse_model_yaml

SIDECAR = "model.yaml"
BUNDLE_METADATA = Path("configs") / "metadata.json"
BUNDLE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")
BUNDLE_WEIGHTS = ("model.ts", "model.pt")


@dataclass
class LoadedModel:
    """A model ready to run: its contract and one or more networks (several form an ensemble)."""

    spec: ModelSpec
    networks: list[torch.nn.Module]
    folder: Path
    kind: str
    """``bundle`` or ``torchscript``."""

    @property
    def device(self) -> torch.device:
        return next(self.networks[0].parameters()).device

    @property
    def has_dropout(self) -> bool:
        """Whether Monte Carlo dropout can sample it (TorchScript modules are inspected by their type name)."""
        return any("Dropout" in type(m).__name__ or "Dropout" in getattr(m, "original_name", "")
                   for net in self.networks for m in net.modules())


def model_kind(folder: Path) -> str:
    """Which layout ``folder`` has: ``bundle``, ``torchscript`` or ``nnunet``; ModelError if none."""
    if not folder.is_dir():
        raise ModelError(f"{folder}: not a folder")
    if (folder / BUNDLE_METADATA).is_file():
        return "bundle"
    if (folder / SIDECAR).is_file():
        return "torchscript"
    if (folder / "dataset.json").is_file() and (folder / "plans.json").is_file():
        return "nnunet"
    raise ModelError(f"{folder}: not a model folder (no {BUNDLE_METADATA}, {SIDECAR}, or nnU-Net dataset.json "
                     "+ plans.json)")


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ModelError(f"{path}: cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a mapping")
    return data


def _probe(network: torch.nn.Module, spec: ModelSpec, where: str) -> None:
    """One forward pass on a zero patch: the output must have one channel per label plus background."""
    device = next(network.parameters()).device
    try:
        with torch.no_grad():
            out = network(torch.zeros((1, spec.in_channels, *spec.patch_size), device=device))
    except Exception as e:  # any failure here means the weights do not fit the declared input
        raise ModelError(f"{where}: fails on a {spec.patch_size} patch with {spec.in_channels} channel(s): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    out = out[0] if isinstance(out, (list, tuple)) else out
    if out.ndim != 5 or out.shape[1] != spec.out_channels or tuple(out.shape[2:]) != spec.patch_size:
        raise ModelError(f"{where}: output of shape {tuple(out.shape)}, expected (1, {spec.out_channels}, "
                         f"{', '.join(map(str, spec.patch_size))}) for {len(spec.labels)} labels + background")


def load_torchscript(path: Path, device: torch.device) -> torch.nn.Module:
    """A TorchScript file in eval mode, or ModelError naming the file and what is wrong with it."""
    if not path.is_file():
        raise ModelError(f"{path}: weights file missing")
    try:
        network = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"{path}: not a loadable TorchScript model ({str(e).splitlines()[0]})") from None
    return network.eval()


def _load_sidecar(folder: Path, device: torch.device) -> LoadedModel:
    data = _read_mapping(folder / SIDECAR)
    spec = parse_model_yaml(data, str(folder / SIDECAR), name=folder.name)
    weights = data.get("weights", "model.ts")
    files = [weights] if isinstance(weights, str) else list(weights)
    networks = [load_torchscript(folder / f, device) for f in files]
    for f, network in zip(files, networks):
        _probe(network, spec, str(folder / f))
    return LoadedModel(spec, networks, folder, "torchscript")


def _find_target(config: Any, name: str) -> dict[str, Any] | None:
    """The first config item (depth first) whose ``_target_`` ends with ``name``."""
    if isinstance(config, dict):
        if str(config.get("_target_", "")).split(".")[-1] == name:
            return config
        items = config.values()
    elif isinstance(config, list):
        items = config
    else:
        return None
    for value in items:
        found = _find_target(value, name)
        if found is not None:
            return found
    return None


def _bundle_spec(folder: Path, metadata: dict[str, Any], parser: Any) -> ModelSpec:
    """The spec from the metadata's ``radnode`` section, else from the bundle's own configs."""
    where = str(folder / BUNDLE_METADATA)
    name, version = str(metadata.get("name", folder.name)), str(metadata.get("version", "unknown"))
    if "radnode" in metadata:
        return parse_model_yaml(metadata["radnode"], f"{where} (radnode)", name=name, version=version)
    try:
        outputs = metadata["network_data_format"]["outputs"]["pred"]
        channel_def = outputs["channel_def"]
        in_channels = int(metadata["network_data_format"]["inputs"]["image"].get("num_channels", 1))
        modality = metadata["network_data_format"]["inputs"]["image"].get("modality")  # the bundle spec's field
    except (KeyError, TypeError):
        raise ModelError(f"{where}: network_data_format.outputs.pred.channel_def missing") from None
    config = parser.get() if parser is not None else {}
    inferer = _find_target(config, "SlidingWindowInferer")
    if inferer is None or "roi_size" not in inferer:
        raise ModelError(f"{where}: no SlidingWindowInferer roi_size in the inference config and no radnode section")
    spacing = _find_target(config, "Spacingd")
    window = _find_target(config, "ScaleIntensityRanged")
    normalisation: dict[str, Any] = {"kind": "zscore"}
    if window is not None:
        normalisation = {"kind": "window", "low": float(window["a_min"]), "high": float(window["a_max"])}
    return parse_model_yaml({
        "input": {"patch_size": list(inferer["roi_size"]), "channels": in_channels, "modality": modality,
                  # MONAI's pixdim is (x, y, z) in RAS order; the node's grid is (slice, row, column).
                  "spacing": list(reversed([float(v) for v in spacing["pixdim"]])) if spacing else None,
                  "normalisation": normalisation},
        "labels": channel_def,
    }, where, name=name, version=version)


def _load_bundle(folder: Path, device: torch.device) -> LoadedModel:
    from monai.bundle import ConfigParser

    metadata = _read_mapping(folder / BUNDLE_METADATA)
    config_path = next((folder / "configs" / c for c in BUNDLE_CONFIGS if (folder / "configs" / c).is_file()), None)
    parser = None
    if config_path is not None:
        parser = ConfigParser()
        parser.read_config(str(config_path))
        parser["bundle_root"] = str(folder)
    spec = _bundle_spec(folder, metadata, parser)
    weights = next((folder / "models" / w for w in BUNDLE_WEIGHTS if (folder / "models" / w).is_file()), None)
    if weights is None:
        raise ModelError(f"{folder / 'models'}: no weights ({' or '.join(BUNDLE_WEIGHTS)})")
    if weights.suffix == ".ts":
        network = load_torchscript(weights, device)
    else:
        if parser is None or "network_def" not in parser.get():
            raise ModelError(f"{folder}: {weights.name} is a state dict but no configs/inference.* defines network_def")
        try:
            network = parser.get_parsed_content("network_def", instantiate=True)
        except Exception as e:  # a broken config raises anything from import errors to type errors
            raise ModelError(f"{config_path}: network_def cannot be built ({type(e).__name__}: {e})") from None
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise ModelError(f"{weights}: weights do not fit network_def ({first})") from None
        network = network.to(device).eval()
    _probe(network, spec, str(weights))
    return LoadedModel(spec, [network], folder, "bundle")


def load_model_folder(folder: str | Path, device: torch.device | None = None) -> LoadedModel:
    """Load, probe and describe the model in ``folder``; ModelError says what is wrong and where."""
    folder = Path(folder)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = model_kind(folder)
    if kind == "nnunet":
        if importlib.util.find_spec("nnunetv2") is None:
            raise ModelError(f"{folder}: an nnU-Net results folder, but the nnunetv2 package is not installed "
                             "(pip install nnunetv2, or export the model as TorchScript with a model.yaml)")
        raise ModelError(f"{folder}: nnU-Net results folders are recognised but not run by radnode yet; "
                         "export the network as TorchScript with a model.yaml")
    return _load_bundle(folder, device) if kind == "bundle" else _load_sidecar(folder, device)


def load_ensemble(folders: list[Path], device: torch.device | None = None) -> LoadedModel:
    """Several folders of the same model contract as one ensemble (their networks are averaged)."""
    loaded = [load_model_folder(f, device) for f in folders]
    first = loaded[0]
    for other in loaded[1:]:
        if (other.spec.labels, other.spec.patch_size, other.spec.spacing, other.spec.normalisation) != \
                (first.spec.labels, first.spec.patch_size, first.spec.spacing, first.spec.normalisation):
            raise ModelError(f"{other.folder}: labels or input contract differ from {first.folder}; "
                             "an ensemble needs identical ones")
    return LoadedModel(first.spec, [n for m in loaded for n in m.networks], first.folder, first.kind)


def check_model_folder(folder: str | Path) -> list[str]:
    """Problems that would stop the model in ``folder`` from running (empty when it loads and probes on CPU)."""
    try:
        load_model_folder(folder, torch.device("cpu"))
    except ModelError as e:
        return [str(e)]
    return []


def model_folders(path: str | Path) -> list[Path]:
    """The model folder(s) a path names, as the MAP contract hands them over (``HOLOSCAN_MODEL_PATH``,
    ``/opt/holoscan/models``): the path itself when it is a model folder, else each of its sub-folders (by
    name; several form an ensemble). ModelError, as ``radnode models check`` words it, when it holds none."""
    path = Path(path)
    try:
        model_kind(path)
        return [path]
    except ModelError as e:
        if not path.is_dir():
            raise
        not_a_model = e
    found: list[Path] = []
    problems: list[ModelError] = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            model_kind(sub)
            found.append(sub)
        except ModelError as e:
            problems.append(e)
    if not found:
        raise not_a_model  # e.g. a bundle folder without configs/metadata.json: name the folder itself
    if problems:
        raise problems[0]  # a folder of models with something else in it
    return found


def load_models(folders: list[Path], device: torch.device | None = None) -> LoadedModel:
    """One model folder, or several as an ensemble (:func:`load_ensemble`)."""
    if not folders:
        raise ModelError("no model folder given")
    return load_model_folder(folders[0], device) if len(folders) == 1 else load_ensemble(folders, device)
