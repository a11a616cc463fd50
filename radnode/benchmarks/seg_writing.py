"""DICOM SEG writing: the node's writer (:func:`radnode.outputs.seg.build_segmentation`) against highdicom
called with its default settings, for several segment counts over one CT series.

Segments are synthetic and disjoint (z-slabs × angular sectors of an elliptical body, like organs each
spanning part of the scan). Each writer takes the input its API takes: the node's writer a list of
per-segment masks, highdicom a stacked (frames, rows, columns, segments) array, and, as a third row,
highdicom given one label map (the compact input it accepts for disjoint segments). Every write runs in
a fresh process: time covers building and saving the SEG, peak memory is the process's resident peak
during the write above its resident size with the inputs built (peak reset via /proc/self/clear_refs).
Every output is decoded back and compared with the input label map.
"""

from __future__ import annotations

import math
import multiprocessing
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

import radnode
from radnode.benchmarks import summary
from radnode.config import Config
from radnode.imaging.series import CT_IMAGE_STORAGE, VolumeCriteria, load_volume
from radnode.imaging.volume import Volume
from radnode.outputs.algorithm import AlgorithmInfo
from radnode.outputs.seg import build_segmentation
from radnode.results import Segment, Structure

WRITERS = ("node", "highdicom_default", "highdicom_labelmap")
ALGORITHM = AlgorithmInfo(name="radnode bench", version=radnode.__version__,
                          family=codes.cid7162.MorphologicalOperations)
TISSUE = hd.sr.CodedConcept(value="85756007", scheme_designator="SCT", meaning="Tissue")
CRITERIA = VolumeCriteria(modality="CT", sop_classes=(CT_IMAGE_STORAGE,), min_slices=1)


def label_map(shape: tuple[int, int, int], n_segments: int) -> np.ndarray:
    """Disjoint segments 1..n as a uint8 label map: z-slabs × angular sectors inside an ellipse."""
    slices, rows, cols = shape
    slabs = math.ceil(math.sqrt(n_segments))
    sectors = math.ceil(n_segments / slabs)
    y, x = np.mgrid[0:rows, 0:cols]
    dy, dx = (y - rows / 2) / (0.4 * rows), (x - cols / 2) / (0.45 * cols)
    sector = np.minimum((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * sectors, sectors - 1).astype(np.int32)
    slab = (np.arange(slices) * slabs // slices).astype(np.int32)
    labels = slab[:, None, None] * sectors + sector[None] + 1
    labels[:, dy**2 + dx**2 > 1] = 0
    labels[labels > n_segments] = 0
    return labels.astype(np.uint8)


def _descriptions(n_segments: int) -> list[hd.seg.SegmentDescription]:
    return [hd.seg.SegmentDescription(segment_number=i, segment_label=f"Segment {i}",
                                      segmented_property_category=TISSUE, segmented_property_type=TISSUE,
                                      algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                      algorithm_identification=ALGORITHM.identification())
            for i in range(1, n_segments + 1)]


def _highdicom_default(volume: Volume, pixel_array: np.ndarray, n_segments: int) -> hd.seg.Segmentation:
    """highdicom's Segmentation with only the required arguments."""
    return hd.seg.Segmentation(
        source_images=volume.source, pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=_descriptions(n_segments),
        series_instance_uid=hd.UID(), series_number=1, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=ALGORITHM.manufacturer, manufacturer_model_name=ALGORITHM.name,
        software_versions=ALGORITHM.version, device_serial_number="bench")


def _memory(field: str) -> int:
    """A /proc/self/status memory figure (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _writer(writer: str, volume: Volume, labels: np.ndarray) -> Callable[[], hd.seg.Segmentation]:
    """Build the writer's input from the label map; returns the call that writes the SEG."""
    n_segments = int(labels.max())
    numbers = range(1, n_segments + 1)
    if writer == "node":
        structures = [Structure(f"segment_{i}", f"Segment {i}", TISSUE, TISSUE) for i in numbers]
        segments = [Segment(s, labels == i) for s, i in zip(structures, numbers)]
        uid_root = Config().uid_root
        return lambda: build_segmentation(volume, segments, ALGORITHM, uid_root=uid_root)
    if writer == "highdicom_default":
        stacked = np.stack([labels == i for i in numbers], axis=-1)
        return lambda: _highdicom_default(volume, stacked, n_segments)
    return lambda: _highdicom_default(volume, labels, n_segments)


def write_once(writer: str, source: Path, n_segments: int, output: Path) -> dict:
    """In a fresh process: build the writer's input, then write the SEG; seconds and peak memory.

    A write of the first slice alone comes first, so one-time imports and caches count in neither figure.
    """
    volume, _ = load_volume(source, CRITERIA)
    labels = label_map(volume.shape, n_segments)
    first = Volume(volume.array[:1], volume.spacing, volume.positions[:1], volume.orientation, volume.source[:1])
    _writer(writer, first, labels[:1])()
    write = _writer(writer, volume, labels)
    baseline = _memory("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    started = time.perf_counter()
    seg = write()
    seg.save_as(output)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_extra_mb": (_memory("VmHWM") - baseline) / 1e6,
            "frames": int(seg.NumberOfFrames), "bytes": output.stat().st_size}


def _decodes_to(path: Path, volume: Volume, labels: np.ndarray) -> bool:
    """Whether the SEG file decodes to exactly ``labels`` on the source slices."""
    seg = hd.seg.segread(path)
    decoded = seg.get_pixels_by_source_instance([str(ds.SOPInstanceUID) for ds in volume.source],
                                                combine_segments=True)
    return bool(np.array_equal(decoded, labels))


def run(source: Path, segment_counts: tuple[int, ...] = (6, 50, 117), repeats: int = 2,
        writers: tuple[str, ...] = WRITERS) -> dict:
    """Median seconds and peak memory per writer and segment count; the node/highdicom ratios."""
    volume, _ = load_volume(source, CRITERIA)
    spawn = multiprocessing.get_context("spawn")
    results: dict = {"slices": volume.shape[0], "rows": volume.shape[1], "columns": volume.shape[2],
                     "repeats": repeats, "segments": {}}
    with tempfile.TemporaryDirectory(prefix="radnode-seg-") as tmp:
        for n in segment_counts:
            samples: dict[str, list[dict]] = {w: [] for w in writers}
            for round_ in range(repeats):
                for writer in writers[round_ % len(writers):] + writers[:round_ % len(writers)]:
                    output = Path(tmp) / f"{writer}-{n}.dcm"
                    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                        samples[writer].append(pool.submit(write_once, writer, source, n, output).result())
            labels = label_map(volume.shape, n)
            rows = {}
            for writer in writers:
                seconds = summary([s["seconds"] for s in samples[writer]])
                rows[writer] = {"seconds": round(seconds["median"], 3),
                                "peak_extra_mb": round(max(s["peak_extra_mb"] for s in samples[writer]), 1),
                                "frames": samples[writer][0]["frames"],
                                "file_mb": round(samples[writer][0]["bytes"] / 1e6, 1),
                                "decodes_to_input": _decodes_to(Path(tmp) / f"{writer}-{n}.dcm", volume, labels)}
            if "node" in rows and "highdicom_default" in rows:
                rows["node"]["time_ratio_vs_highdicom_default"] = round(
                    rows["node"]["seconds"] / rows["highdicom_default"]["seconds"], 2)
            results["segments"][str(n)] = rows
    return results
