"""The deepbet brain-extraction networks (MIT licence), as shipped inside the deepbet wheel on PyPI.

deepbet is two TorchScript UNets: a coarse one on a 128³ copy of the head that finds the brain's
bounding box, and a fine one on a 256³ resampling of that box. Only the weight files are used here;
the pre- and post-processing around them is re-implemented in :mod:`radnode.imaging.brain` on the
node's own geometry, so the ``deepbet`` package's GUI and NIfTI dependencies are not needed.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from radnode.models.errors import ModelError
from radnode.models.loading import load_torchscript

BBOX_MODEL_FILE = "bbox_model.pt"
MODEL_FILE = "model.pt"
MODEL_DIR_ENV = "RADNODE_DEEPBET_MODELS"
"""A folder holding ``model.pt`` and ``bbox_model.pt``; overrides the copy inside the installed wheel."""
PROBE_SHAPE = (1, 1, 32, 32, 32)
OUTPUT_CLASSES = 2


@dataclass
class DeepbetModels:
    """The two networks, on the device they will run on, in eval mode."""

    bbox: torch.jit.ScriptModule
    fine: torch.jit.ScriptModule
    folder: Path
    version: str

    @property
    def device(self) -> torch.device:
        return next(self.fine.parameters()).device


def deepbet_model_folder() -> Path:
    """Where the weights are: ``$RADNODE_DEEPBET_MODELS`` if set, else the installed deepbet wheel's data."""
    if os.environ.get(MODEL_DIR_ENV):
        return Path(os.environ[MODEL_DIR_ENV])
    try:
        distribution = importlib.metadata.distribution("deepbet")
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"deepbet is not installed and {MODEL_DIR_ENV} is not set: "
                         "install the deepbet wheel (pip install --no-deps deepbet) or point "
                         f"{MODEL_DIR_ENV} at a folder with {MODEL_FILE} and {BBOX_MODEL_FILE}") from None
    return Path(str(distribution.locate_file("data/models")))


def _deepbet_version() -> str:
    try:
        return importlib.metadata.version("deepbet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _load(path: Path, device: torch.device) -> torch.nn.Module:
    """One deepbet network, probed with a forward pass so wrong weights fail here."""
    if not path.is_file():
        raise ModelError(f"{path}: deepbet weights missing")
    model = load_torchscript(path, device)
    with torch.no_grad():
        out = model(torch.zeros(PROBE_SHAPE, device=device))
    if tuple(out.shape) != (1, OUTPUT_CLASSES, *PROBE_SHAPE[2:]):
        raise ModelError(f"{path}: output of shape {tuple(out.shape)} for input {PROBE_SHAPE}, "
                         f"expected {OUTPUT_CLASSES} classes on the same grid")
    return model


def load_deepbet(folder: Path | None = None, device: torch.device | None = None) -> DeepbetModels:
    """Load and probe both networks (a 32³ forward pass each), so wrong weights fail at start-up."""
    folder = Path(folder) if folder is not None else deepbet_model_folder()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return DeepbetModels(bbox=_load(folder / BBOX_MODEL_FILE, device), fine=_load(folder / MODEL_FILE, device),
                         folder=folder, version=_deepbet_version())
