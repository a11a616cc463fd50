"""The container engine (podman or docker) as the node and ``radnode map build --image`` call it.

How the engine is called is configuration (``containers:``: its argv prefix with global flags, its
environment); this module only turns that into commands and reads the engine's answers. Nothing here
decides what a container may do: the lock-down is the container executor's (``radnode/node/executors.py``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from radnode.config import ContainersConfig

ENGINES = ("podman", "docker")
CDI_SPEC_DIRS = (Path("/etc/cdi"), Path("/var/run/cdi"))
NVIDIA_GPU_KIND = "nvidia.com/gpu"
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


class EngineError(RuntimeError):
    """The engine is missing or refused a command; the message has the command and the engine's words."""


def quantity_bytes(quantity: str | int | float) -> int:
    """``4Gi``, ``512Mi``, ``64m`` or a number of bytes → bytes (engines and tmpfs disagree on suffixes)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgG]i?)?[bB]?", str(quantity).strip())
    if not m:
        raise ValueError(f"{quantity!r}: expected a size such as 4Gi, 512Mi or a number of bytes")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


@dataclass(frozen=True)
class Engine:
    """One container engine client: its kind, argv prefix and process environment."""

    kind: str
    """``podman`` or ``docker``: decides the few flags that differ."""
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, containers: ContainersConfig, *, kind: str | None = None) -> "Engine":
        """The engine ``containers:`` names; with none named, podman else docker from the PATH (``kind``
        forces one). The process environment is this process's plus ``containers.environment``."""
        kind = kind or containers.engine
        if kind is None:
            kind = next((name for name in ENGINES if shutil.which(name)), None)
            if kind is None:
                raise EngineError("no container engine: install podman (or docker), or set containers.engine")
        argv = tuple(containers.argv(kind))
        if shutil.which(argv[0]) is None:
            raise EngineError(f"container engine {argv[0]!r} is not installed or not on the PATH")
        return cls(kind, argv, {**os.environ, **containers.environment})

    def command(self, *args: str) -> list[str]:
        """The engine's argv for ``args`` (``engine.command("run", ...)``)."""
        return [*self.argv, *args]

    def run(self, *args: str, timeout: float = 120, input_bytes: bytes | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run one engine command and wait; EngineError with its last stderr lines when it fails and ``check``."""
        argv = self.command(*args)
        try:
            result = subprocess.run(argv, env=self.env, capture_output=True, timeout=timeout, input=input_bytes)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise EngineError(f"{' '.join(argv[:4])} …: {e}") from None
        out = subprocess.CompletedProcess(argv, result.returncode, result.stdout.decode(errors="replace"),
                                          result.stderr.decode(errors="replace"))
        if check and out.returncode != 0:
            detail = " | ".join(out.stderr.strip().splitlines()[-3:])
            raise EngineError(f"{' '.join(argv[len(self.argv):][:3])} failed (status {out.returncode}): {detail}")
        return out

    def image_id(self, image: str) -> str | None:
        """The image's ID (``sha256:…``), or None when the engine has no such image."""
        result = self.run("image", "inspect", "--format", "{{.Id}}", image, check=False)
        if result.returncode != 0:
            return None
        image_id = result.stdout.strip()
        return image_id if image_id.startswith("sha256:") else f"sha256:{image_id}"

    def image_size(self, image: str) -> int:
        """The image's size in bytes as the engine reports it (all layers, uncompressed)."""
        return int(self.run("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())

    def container_exists(self, name: str) -> bool:
        """Whether a container of that name exists (running or not)."""
        result = self.run("ps", "-a", "--filter", f"name=^{name}$", "--format", "{{.Names}}", check=False)
        return name in result.stdout.split()

    def containers_labelled(self, label: str) -> list[str]:
        """Names of the containers carrying ``label`` (``KEY=VALUE``), running or not."""
        result = self.run("ps", "-a", "--filter", f"label={label}", "--format", "{{.Names}}", check=False)
        return result.stdout.split()

    def remove(self, name: str) -> bool:
        """Stop the container (SIGTERM, SIGKILL after its stop timeout) and remove it; True when it is gone."""
        self.run("rm", "--force", name, timeout=120, check=False)
        return not self.container_exists(name)


def cdi_gpu_devices(spec_dirs: Sequence[Path] = CDI_SPEC_DIRS) -> list[str]:
    """The ``nvidia.com/gpu=NAME`` devices the CDI specs on this host declare (``nvidia-ctk cdi generate``),
    one per GPU (``all`` left out), in the specs' order; [] without specs."""
    devices: list[str] = []
    for folder in spec_dirs:
        specs = sorted(folder.glob("*.y*ml")) + sorted(folder.glob("*.json")) if folder.is_dir() else []
        for path in specs:
            try:
                spec = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue
            if not isinstance(spec, dict) or spec.get("kind") != NVIDIA_GPU_KIND:
                continue
            for device in spec.get("devices") or []:
                name = str(device.get("name", "")) if isinstance(device, dict) else ""
                if name and name != "all" and f"{NVIDIA_GPU_KIND}={name}" not in devices:
                    devices.append(f"{NVIDIA_GPU_KIND}={name}")
    return devices
