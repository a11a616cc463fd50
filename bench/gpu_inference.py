"""GPU inference benchmark: a CT of SIZE×SIZE×SLICES through a sliding-window MONAI SegResNet (random weights).

Times each phase of the radnode path (load model, preprocess on CuPy or NumPy, sliding-window inference
with mixed precision, postprocess back to the source grid, SEG write) and reports peak GPU memory.
Runs on an NVIDIA GPU when torch sees one, on the CPU otherwise; the JSON output records which.

    python bench/gpu_inference.py [--size 512] [--slices 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from monai.networks.nets import SegResNet

from radnode.models.inference import InferenceOptions, array_backend, postprocess, predict_samples, preprocess
from radnode.models.loading import load_model_folder
from radnode.outputs.algorithm import AlgorithmInfo
from radnode.outputs.seg import build_segmentation
from radnode.phantom import CTPhantom, write_ct_series
from radnode.imaging.series import VolumeCriteria, load_volume

PATCH = (96, 96, 96)
LABELS = 3


def make_model_folder(folder: Path) -> None:
    """A TorchScript SegResNet (random weights) with its sidecar, as a hospital would hand one over."""
    torch.manual_seed(0)
    network = SegResNet(spatial_dims=3, in_channels=1, out_channels=LABELS + 1, init_filters=16).eval()
    torch.jit.script(network).save(str(folder / "model.ts"))
    (folder / "model.yaml").write_text(yaml.safe_dump({
        "name": "segresnet-random", "version": "0", "weights": "model.ts",
        "input": {"spacing": [1.5, 1.5, 1.5], "patch_size": list(PATCH),
                  "normalisation": {"kind": "window", "low": -1000, "high": 1000}},
        "labels": {i: f"label {i}" for i in range(1, LABELS + 1)}}))


def run(size: int, slices: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        rng = np.random.default_rng(0)
        hu = rng.normal(0, 300, (slices, size, size)).astype(np.int16)
        write_ct_series(CTPhantom(hu, (1.0, 0.8, 0.8), {}), tmp_path / "ct")
        (tmp_path / "model").mkdir()
        make_model_folder(tmp_path / "model")

        start = time.perf_counter()
        volume, _ = load_volume(tmp_path / "ct", VolumeCriteria())
        timings["load_dicom"] = time.perf_counter() - start
        start = time.perf_counter()
        model = load_model_folder(tmp_path / "model", device)
        timings["load_model"] = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        backend = array_backend(prefer_gpu=device.type == "cuda")
        start = time.perf_counter()
        prepared = preprocess(volume, model.spec, backend)
        timings["preprocess"] = time.perf_counter() - start
        start = time.perf_counter()
        samples, method = predict_samples(model, prepared, InferenceOptions(mirror_tta=False))
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings["inference"] = time.perf_counter() - start
        start = time.perf_counter()
        segmentation = postprocess(samples, prepared, model.spec, method)
        timings["postprocess"] = time.perf_counter() - start
        start = time.perf_counter()
        segments = [s for s in segmentation.segments if s.mask.any()]
        seg = build_segmentation(volume, segments, AlgorithmInfo("bench", "0"), uid_root="1.2.826.0.1.3680043.8.498.")
        seg.save_as(tmp_path / "seg.dcm")
        timings["seg_write"] = time.perf_counter() - start
    return {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.processor() or 'unknown'}, "
                                                                           f"{torch.get_num_threads()} threads)",
        "preprocess_backend": backend.name,
        "input_shape": [slices, size, size],
        "model_grid": list(prepared.array.shape[1:]),
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = run(args.size, args.slices)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
