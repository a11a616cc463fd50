"""Running a loaded model on a volume: preprocessing on GPU (CuPy) or CPU (NumPy), sliding-window inference
with mixed precision, uncertainty samples, and results mapped back to the source grid.

The same functions run on both back ends: :func:`array_backend` picks CuPy when it imports and sees a
CUDA device, NumPy/SciPy otherwise, and every array operation goes through the chosen module. Samples
for uncertainty are the product of ensemble members × mirror test-time augmentations × Monte Carlo
dropout passes (dropout layers switched to training mode, only when the network has any).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from radnode.imaging.volume import Volume
from radnode.measure import MILLILITER, VOLUME, VOLUME_DECIMALS
from radnode.models.loading import LoadedModel
from radnode.models.spec import ModelSpec
from radnode.results import Measurement, Segment
from radnode.uncertainty import UncertainSegmentation, UncertaintyThresholds, summarise

log = logging.getLogger(__name__)

MIRROR_AXES: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (4,))
"""Identity and one mirror per spatial axis of an (N, C, z, y, x) batch, as nnU-Net's test-time mirroring."""


@dataclass(frozen=True)
class ArrayBackend:
    """The array module doing preprocessing: ``cupy`` (GPU) or ``numpy`` (CPU), with its ndimage."""

    name: str
    xp: ModuleType
    ndimage: ModuleType

    def to_numpy(self, array: Any) -> np.ndarray:
        return array.get() if self.name == "cupy" else np.asarray(array)

    def to_torch(self, array: Any, device: torch.device) -> torch.Tensor:
        """Zero-copy on the GPU (DLPack) when array and device agree; a copy otherwise."""
        if self.name == "cupy" and device.type == "cuda":
            return torch.from_dlpack(array)
        return torch.as_tensor(self.to_numpy(array), device=device)

    def from_torch(self, tensor: torch.Tensor) -> Any:
        if self.name == "cupy" and tensor.is_cuda:
            return self.xp.from_dlpack(tensor.contiguous())
        return tensor.detach().float().cpu().numpy()


def array_backend(prefer_gpu: bool = True) -> ArrayBackend:
    """CuPy when asked for, importable and a CUDA device is visible; NumPy/SciPy otherwise (logged once)."""
    if prefer_gpu:
        try:
            import cupy
            import cupyx.scipy.ndimage as cupy_ndimage

            if cupy.cuda.runtime.getDeviceCount() > 0:
                return ArrayBackend("cupy", cupy, cupy_ndimage)
        except Exception as e:  # ImportError, or CUDA errors when no driver: fall back either way
            log.info("CuPy unavailable (%s: %s); preprocessing with NumPy", type(e).__name__, e)
    from scipy import ndimage as scipy_ndimage

    return ArrayBackend("numpy", np, scipy_ndimage)


def resample(array: Any, shape: tuple[int, ...], backend: ArrayBackend, order: int = 1) -> Any:
    """Resample the last three axes of ``array`` to ``shape`` (voxel centres aligned, edges clamped)."""
    source = array.shape[-3:]
    if tuple(source) == tuple(shape):
        return array
    scale = np.array(source, float) / np.array(shape, float)
    offset = 0.5 * scale - 0.5  # out voxel o ↔ in coordinate (o + 0.5)·scale − 0.5
    xp = backend.xp

    def one(a: Any) -> Any:
        return backend.ndimage.affine_transform(a, xp.asarray(scale), offset=tuple(offset), output_shape=tuple(shape),
                                                order=order, mode="nearest")

    if array.ndim == 3:
        return one(array)
    flat = array.reshape(-1, *source)
    return xp.stack([one(a) for a in flat]).reshape(*array.shape[:-3], *shape)


def normalise(array: Any, spec: ModelSpec, backend: ArrayBackend) -> Any:
    """Intensity normalisation of the spec: HU/intensity window, z-score, or percentile clipping."""
    xp, norm = backend.xp, spec.normalisation
    array = array.astype(xp.float32)
    if norm.kind == "window":
        return xp.clip((array - norm.low) / (norm.high - norm.low), 0.0, 1.0)
    if norm.kind == "percentile":
        low, high = (float(v) for v in xp.percentile(array, [norm.low, norm.high]))
        return xp.clip((array - low) / max(high - low, 1e-6), 0.0, 1.0)
    return (array - array.mean()) / xp.maximum(array.std(), 1e-6)


@dataclass
class Prepared:
    """The network's input grid: (channels, z, y, x) on the backend, and the source grid it came from."""

    array: Any
    source_shape: tuple[int, int, int]
    backend: ArrayBackend


def model_grid_shape(volume: Volume, spec: ModelSpec) -> tuple[int, int, int]:
    """Shape of the volume resampled to the model's spacing (the source shape when it has none)."""
    if spec.spacing is None:
        return volume.shape
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(volume.shape, volume.spacing, spec.spacing))  # type: ignore[return-value]


def preprocess(volume: Volume, spec: ModelSpec, backend: ArrayBackend) -> Prepared:
    """Volume → normalised, resampled (1, z, y, x) array on the backend."""
    array = normalise(backend.xp.asarray(volume.array), spec, backend)
    array = resample(array, model_grid_shape(volume, spec), backend, order=1)
    return Prepared(array[None], volume.shape, backend)


@dataclass(frozen=True)
class InferenceOptions:
    """Sampling and sliding-window settings."""

    mirror_tta: bool = True
    mc_dropout_passes: int = 0
    """Passes with dropout on (0: off; ignored when the network has no dropout)."""
    amp: bool = True
    """float16 autocast on CUDA; CPU always runs float32 (CPU half precision is slow and inexact)."""
    overlap: float = 0.25
    sw_batch_size: int = 2


def _set_dropout(network: torch.nn.Module, active: bool) -> None:
    for module in network.modules():
        if "Dropout" in type(module).__name__ or "Dropout" in getattr(module, "original_name", ""):
            module.train(active)


@torch.no_grad()
def predict_samples(model: LoadedModel, prepared: Prepared, options: InferenceOptions = InferenceOptions()
                    ) -> tuple[list[Any], str]:
    """Softmax probability samples on the model grid, each (C, z, y, x) on the backend, and how they were made."""
    device = model.device
    image = prepared.backend.to_torch(prepared.array, device)[None].float()
    patch = model.spec.patch_size
    mirrors = MIRROR_AXES if options.mirror_tta else ((),)
    dropout_passes = options.mc_dropout_passes if model.has_dropout else 0
    samples = []
    autocast = torch.autocast(device_type="cuda", dtype=torch.float16, enabled=options.amp and device.type == "cuda")
    for network in model.networks:
        for dropout_pass in range(max(1, dropout_passes)):
            _set_dropout(network, dropout_passes > 0)
            if dropout_passes:
                torch.manual_seed(dropout_pass)
            for axes in mirrors:
                x = torch.flip(image, axes) if axes else image
                with autocast:
                    logits = sliding_window_inference(x, patch, options.sw_batch_size, network,
                                                      overlap=options.overlap, mode="gaussian")
                probability = torch.softmax(logits.float(), dim=1)
                probability = torch.flip(probability, axes) if axes else probability
                samples.append(prepared.backend.from_torch(probability[0]))
        _set_dropout(network, False)
    parts = [f"ensemble of {len(model.networks)}" if len(model.networks) > 1 else "",
             "TTA (mirrors)" if options.mirror_tta else "", f"MC dropout ({dropout_passes})" if dropout_passes else ""]
    return samples, " x ".join(p for p in parts if p) or "single pass (softmax entropy)"


def postprocess(samples: list[Any], prepared: Prepared, spec: ModelSpec, method: str,
                limits: UncertaintyThresholds = UncertaintyThresholds()) -> UncertainSegmentation:
    """Samples back on the source grid (linear resampling of probabilities), consensus masks and uncertainty,
    computed on the preprocessing back end (GPU with CuPy) one sample at a time (a running sum and each
    sample's label map, never the stack); masks, map and mean probabilities return as NumPy."""
    backend, xp = prepared.backend, prepared.backend.xp
    total, sample_labels = None, []
    for sample in samples:  # one source-grid sample at a time: S stacked samples of a 512²×300 CT are 10 GB
        restored = resample(sample, prepared.source_shape, backend, order=1)
        sample_labels.append(restored.argmax(axis=0).astype(xp.uint8))
        if total is None:
            total = restored.astype(xp.float32, copy=True)
        else:
            total += restored
        del restored
    total /= len(samples)
    mean = total
    labels = {index: structure.key for index, structure in spec.labels.items()}
    report = summarise(mean, sample_labels, labels, method, limits)  # on the GPU when the samples are
    consensus = mean.argmax(axis=0)
    segments = [Segment(structure, backend.to_numpy(consensus == index)) for index, structure in spec.labels.items()]
    return UncertainSegmentation(segments, report, backend.to_numpy(mean))


def segment_volumes(volume: Volume, segments: list[Segment]) -> list[Measurement]:
    """Volume (mL) of every non-empty segment."""
    return [Measurement(s.structure.key, VOLUME, round(int(s.mask.sum()) * volume.voxel_volume_ml, VOLUME_DECIMALS),
                        MILLILITER) for s in segments if s.mask.any()]


def segment_with_model(volume: Volume, model: LoadedModel, options: InferenceOptions = InferenceOptions(), *,
                       prefer_gpu: bool = True, limits: UncertaintyThresholds = UncertaintyThresholds()
                       ) -> UncertainSegmentation:
    """The whole chain the operators run, in one call (benchmarks, evaluation)."""
    prepared = preprocess(volume, model.spec, array_backend(prefer_gpu))
    samples, method = predict_samples(model, prepared, options)
    return postprocess(samples, prepared, model.spec, method, limits)
