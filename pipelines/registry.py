"""The pipelines this node can run, by name: each is a MONAI Deploy application under ``apps/``."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing Holoscan is slow and noisy; only running an app needs it
    from monai.deploy.core import Application


@dataclass(frozen=True)
class PipelineSpec:
    """A named pipeline: which application runs it and what it is for."""

    name: str
    app: str
    """``module:Class`` of the MONAI Deploy Application."""
    description: str
    modalities: tuple[str, ...]

    def load_app_class(self) -> "type[Application]":
        module, _, cls = self.app.partition(":")
        return getattr(importlib.import_module(module), cls)


PIPELINES: dict[str, PipelineSpec] = {
    spec.name: spec
    for spec in (
        PipelineSpec(
            name="ct_tissue",
            app="radnode.apps.ct_tissue.app:CTTissueApp",
            description="CT: body, lungs, bone, adipose tissue, skeletal muscle; volumes, HU, emphysema index",
            modalities=("CT",),
        ),
        PipelineSpec(
            name="mri_brain",
            app="radnode.apps.mri_brain.app:MRIBrainApp",
            description="MRI 3D T1: brain extraction (deepbet), intracranial and brain volumes, uncertainty map",
            modalities=("MR",),
        ),
    )
}


class UnknownPipelineError(KeyError):
    """A pipeline name that is not registered."""

    def __str__(self) -> str:
        return f"unknown pipeline {self.args[0]!r}; known: {', '.join(sorted(PIPELINES))}"


def get_pipeline(name: str) -> PipelineSpec:
    """The registered pipeline ``name`` or UnknownPipelineError listing the known ones."""
    try:
        return PIPELINES[name]
    except KeyError:
        raise UnknownPipelineError(name) from None
