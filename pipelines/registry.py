"""The pipelines this node can run, by name: the MONAI Deploy applications under ``apps/`` and the site's own.

A site adds its applications without changing radnode: ``RADNODE_PIPELINES`` lists them as
``name=package.module:Class`` entries (separated by commas or whitespace), e.g.
``RADNODE_PIPELINES="body_comp=site_apps.body_comp.app:BodyCompApp"``. The package must be importable
(installed, or on ``PYTHONPATH``) in the node and in its job processes, which inherit the variable; its
``__main__`` (``python -m site_apps.body_comp``, the app's MAP command) calls
``radnode.execution.app_main("body_comp")``.

A site with several models of its own registers one name per model for the shipped model app, e.g.
``RADNODE_PIPELINES="liver=radnode.apps.model_seg.app:ModelSegApp"``, and says in ``processing.models``
which model folder each name runs.
"""

from __future__ import annotations

import importlib
import os
import re
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
    takes_model: bool = False
    """Runs a model folder the site points it to (``--model``, ``HOLOSCAN_MODEL_PATH``, ``processing.models``)."""

    def load_app_class(self) -> "type[Application]":
        module, _, cls = self.app.partition(":")
        return getattr(importlib.import_module(module), cls)

    @property
    def built_in_app(self) -> str | None:
        """The built-in pipeline whose application this one runs: itself for a built-in, ``model_seg`` for a
        site name registered on model_seg's class (one per model); None for a site's own application."""
        return next((spec.name for spec in PIPELINES.values() if spec.app == self.app), None)

    @property
    def map_module(self) -> str:
        """The package whose ``__main__`` is the app's MAP command (run with ``python -m``), e.g.
        ``radnode.apps.ct_tissue``."""
        module = self.app.partition(":")[0]
        return module.rpartition(".")[0] or module


MODEL_SEG_APP = "radnode.apps.model_seg.app:ModelSegApp"
"""The application that runs a site's model folder; a site pipeline naming it takes a model folder too."""

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
        PipelineSpec(
            name="model_seg",
            app=MODEL_SEG_APP,
            description="your own model folder (MONAI bundle, TorchScript + model.yaml): segments, volumes, "
                        "uncertainty map",
            modalities=("CT", "MR"),
            takes_model=True,
        ),
    )
}


SITE_PIPELINES_ENV = "RADNODE_PIPELINES"
"""Environment variable listing the site's own pipelines (see the module docstring)."""

_SITE_ENTRY = re.compile(r"([A-Za-z][\w-]*)=([A-Za-z_][\w.]*:[A-Za-z_]\w*)")


class PipelineRegistryError(ValueError):
    """A ``RADNODE_PIPELINES`` entry that cannot be used; the message says which and why."""


def site_pipelines() -> dict[str, PipelineSpec]:
    """The pipelines ``$RADNODE_PIPELINES`` registers now (read on every call, so job processes see them too)."""
    sites: dict[str, PipelineSpec] = {}
    for entry in re.split(r"[\s,]+", os.environ.get(SITE_PIPELINES_ENV, "").strip()):
        if not entry:
            continue
        match = _SITE_ENTRY.fullmatch(entry)
        if match is None:
            raise PipelineRegistryError(f"${SITE_PIPELINES_ENV}: {entry!r} is not name=package.module:Class")
        name, app = match.groups()
        if name in PIPELINES or name in sites:
            raise PipelineRegistryError(f"${SITE_PIPELINES_ENV}: pipeline {name!r} is already registered")
        sites[name] = PipelineSpec(name=name, app=app, description=f"site application {app}", modalities=(),
                                   takes_model=app == MODEL_SEG_APP)
    return sites


def registered_pipelines() -> dict[str, PipelineSpec]:
    """The built-in pipelines, then the site's (``$RADNODE_PIPELINES``)."""
    return PIPELINES | site_pipelines()


class UnknownPipelineError(KeyError):
    """A pipeline name that is not registered."""

    def __str__(self) -> str:
        return f"unknown pipeline {self.args[0]!r}; known: {', '.join(sorted(registered_pipelines()))}"


def get_pipeline(name: str) -> PipelineSpec:
    """The registered pipeline ``name`` (built-in or site) or UnknownPipelineError listing the known ones."""
    try:
        return registered_pipelines()[name]
    except KeyError:
        raise UnknownPipelineError(name) from None
