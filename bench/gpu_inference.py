"""GPU inference benchmark: a CT of SIZE×SIZE×SLICES through a sliding-window MONAI SegResNet (random weights).

Times each phase of the radnode path (load DICOM, load model, preprocess on CuPy or NumPy, sliding-window
inference with mixed precision, postprocess back to the source grid, SEG write) and, side by side on the
same model file and the same DICOM series, the stock monai-deploy-app-sdk path: its DICOM loader, series
selector and series-to-volume operators, then ``MonaiSegInferenceOperator`` with the MONAI transforms the
SDK's own example apps use (orientation, spacing, intensity range; softmax, inversion, argmax). Each path
runs ``--repeats`` times, alternating which goes first; the fastest run of each phase is kept (the first
CUDA run pays for kernel selection). Peak GPU memory is per path. Runs on an NVIDIA GPU when torch sees
one, on the CPU otherwise; the JSON output records which.

    python bench/gpu_inference.py [--size 512] [--slices 300] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from monai.networks.nets import SegResNet

from radnode.imaging.series import VolumeCriteria, load_volume
from radnode.models.inference import InferenceOptions, array_backend, postprocess, predict_samples, preprocess
from radnode.models.loading import load_model_folder
from radnode.outputs.algorithm import AlgorithmInfo
from radnode.outputs.seg import build_segmentation
from radnode.phantom import make_ct_phantom, write_ct_series

PATCH = (96, 96, 96)
SPACING = (1.5, 1.5, 1.5)
WINDOW = (-1000.0, 1000.0)
LABELS = 3
OVERLAP = 0.25
SW_BATCH = 2


def make_model_folder(folder: Path) -> None:
    """A TorchScript SegResNet (random weights) with its sidecar, as a hospital would hand one over."""
    torch.manual_seed(0)
    network = SegResNet(spatial_dims=3, in_channels=1, out_channels=LABELS + 1, init_filters=16).eval()
    torch.jit.script(network).save(str(folder / "model.ts"))
    (folder / "model.yaml").write_text(yaml.safe_dump({
        "name": "segresnet-random", "version": "0", "weights": "model.ts",
        "input": {"spacing": list(SPACING), "patch_size": list(PATCH),
                  "normalisation": {"kind": "window", "low": WINDOW[0], "high": WINDOW[1]}},
        "labels": {i: f"label {i}" for i in range(1, LABELS + 1)}}))


class _Clock:
    """Wall time per named phase, synchronising CUDA so asynchronous kernels count where they run."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    def phase(self, name: str, work: Callable[[], object]) -> object:
        start = time.perf_counter()
        result = work()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds[name] = time.perf_counter() - start
        return result


def radnode_path(ct: Path, model_dir: Path, device: torch.device, seg_out: Path) -> tuple[dict, str]:
    """radnode's own chain; returns seconds per phase and the preprocessing back end used."""
    clock = _Clock(device)
    volume, _ = clock.phase("load_dicom", lambda: load_volume(ct, VolumeCriteria()))
    model = clock.phase("load_model", lambda: load_model_folder(model_dir, device))
    backend = array_backend(prefer_gpu=device.type == "cuda")
    prepared = clock.phase("preprocess", lambda: preprocess(volume, model.spec, backend))
    samples, method = clock.phase("inference", lambda: predict_samples(model, prepared, InferenceOptions(
        mirror_tta=False, overlap=OVERLAP, sw_batch_size=SW_BATCH)))
    segmentation = clock.phase("postprocess", lambda: postprocess(samples, prepared, model.spec, method))

    def write_seg() -> None:
        segments = [s for s in segmentation.segments if s.mask.any()]
        build_segmentation(volume, segments, AlgorithmInfo("bench", "0"),
                           uid_root="1.2.826.0.1.3680043.8.498.").save_as(seg_out)

    clock.phase("seg_write", write_seg)
    return clock.seconds, backend.name


def stock_sdk_path(ct: Path, model_dir: Path, device: torch.device) -> dict:
    """monai-deploy-app-sdk's stock operators on the same series and TorchScript file (no SEG writer: the
    SDK's writes via highdicom as radnode's does, so only load and inference are compared)."""
    from monai.deploy.core import AppContext, Application
    from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
    from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
    from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
    from monai.deploy.operators.monai_seg_inference_operator import InMemImageReader, MonaiSegInferenceOperator
    from monai.transforms import (Activationsd, AsDiscreted, Compose, EnsureChannelFirstd, EnsureTyped, Invertd,
                                  LoadImaged, Orientationd, ScaleIntensityRanged, Spacingd)

    clock = _Clock(device)
    fragment = Application()
    loader = DICOMDataLoaderOperator(fragment, input_folder=ct, name="loader")
    selector = DICOMSeriesSelectorOperator(fragment, name="selector")
    to_volume = DICOMSeriesToVolumeOperator(fragment, name="to_volume")

    def load() -> object:
        studies = loader.load_data_to_studies(ct)
        return to_volume.convert_to_image(selector.filter(None, studies))

    image = clock.phase("load_dicom", load)
    # The SDK's example segmentation apps build the transforms around an in-memory reader of the image.
    key, pred = "image", "pred"
    pre = Compose([LoadImaged(keys=key, reader=InMemImageReader(image)), EnsureChannelFirstd(keys=key),
                   Orientationd(keys=key, axcodes="RAS"), Spacingd(keys=key, pixdim=SPACING, mode="bilinear"),
                   ScaleIntensityRanged(keys=key, a_min=WINDOW[0], a_max=WINDOW[1], b_min=0.0, b_max=1.0,
                                        clip=True), EnsureTyped(keys=key)])
    post = Compose([EnsureTyped(keys=pred), Activationsd(keys=pred, softmax=True),
                    Invertd(keys=pred, transform=pre, orig_keys=key, nearest_interp=False, to_tensor=True),
                    AsDiscreted(keys=pred, argmax=True)])
    operator = clock.phase("load_model", lambda: MonaiSegInferenceOperator(
        fragment, roi_size=PATCH, pre_transforms=pre, post_transforms=post, app_context=AppContext({}),
        overlap=OVERLAP, sw_batch_size=SW_BATCH, mode="gaussian", model_path=model_dir / "model.ts",
        name="monai_seg_inference"))
    clock.phase("preprocess_inference_postprocess", lambda: operator.compute_impl(image, None))
    return clock.seconds


def _peak_gpu_mib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None


def run(size: int, slices: int, repeats: int = 2) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    best: dict[str, dict[str, float]] = {"radnode": {}, "stock_sdk": {}}
    peak: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        write_ct_series(make_ct_phantom(slices, size), tmp_path / "ct")
        (tmp_path / "model").mkdir()
        make_model_folder(tmp_path / "model")
        paths: dict[str, Callable[[], dict]] = {
            "radnode": lambda: radnode_path(tmp_path / "ct", tmp_path / "model", device, tmp_path / "seg.dcm")[0],
            "stock_sdk": lambda: stock_sdk_path(tmp_path / "ct", tmp_path / "model", device)}
        for repeat in range(repeats):
            for name in (list(paths) if repeat % 2 == 0 else list(paths)[::-1]):
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                seconds = paths[name]()
                peak[name] = max(peak.get(name) or 0.0, _peak_gpu_mib(device) or 0.0) if device.type == "cuda" else None
                for phase, value in seconds.items():
                    best[name][phase] = min(best[name].get(phase, float("inf")), value)
        backend = array_backend(prefer_gpu=device.type == "cuda").name
    ours, stock = best["radnode"], best["stock_sdk"]
    ours_compute = ours["preprocess"] + ours["inference"] + ours["postprocess"]
    stock_compute = stock["preprocess_inference_postprocess"]
    return {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else
        f"CPU ({platform.processor() or 'unknown'}, {torch.get_num_threads()} threads)",
        "preprocess_backend": backend,
        "input_shape": [slices, size, size],
        "model": f"SegResNet (random weights), patch {list(PATCH)}, spacing {list(SPACING)} mm, overlap {OVERLAP}",
        "repeats": repeats,
        "seconds": {name: {k: round(v, 3) for k, v in phases.items()} for name, phases in best.items()},
        "peak_gpu_memory_mib": peak,
        "stock_over_radnode": {
            "load_dicom": round(stock["load_dicom"] / ours["load_dicom"], 2),
            "preprocess_inference_postprocess": round(stock_compute / ours_compute, 2),
            "load_dicom_to_label_map": round((stock["load_dicom"] + stock_compute)
                                             / (ours["load_dicom"] + ours_compute), 2)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = run(args.size, args.slices, args.repeats)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
