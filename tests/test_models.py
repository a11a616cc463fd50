"""Model folders: a MONAI bundle trained here on synthetic CT, its TorchScript + sidecar export, and the
start-up checks that refuse missing or mismatched weights. The bundle runs through the same operators as
a pipeline (preprocess → sliding window → postprocess → SEG/SR/FHIR/Parametric Map)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
import yaml
from holoscan.conditions import CountCondition
from monai.deploy.core import Application
from monai.networks.nets import UNet

from radnode.cli import main as cli_main
from radnode.execution import prepare_holoscan_process
from radnode.imaging.series import load_volume
from radnode.models.errors import ModelError
from radnode.models.inference import InferenceOptions, array_backend, segment_with_model
from radnode.models.loading import check_model_folder, load_ensemble, load_model_folder
from radnode.operators.dicom_input import SeriesToVolumeOperator, StudyFolderLoaderOperator, VolumeSeriesSelectorOperator
from radnode.operators.inference import (
    ModelPostprocessOperator,
    SegmentVolumeMeasurementOperator,
    SlidingWindowInferenceOperator,
)
from radnode.operators.preprocess import ModelPreprocessOperator
from radnode.operators.result_writers import (
    FhirReportWriterOperator,
    MeasurementReportWriterOperator,
    SegmentationWriterOperator,
)
from radnode.operators.uncertainty import UncertaintyMapWriterOperator
from radnode.outputs.algorithm import AlgorithmInfo
from radnode.outputs.sr import read_measurements
from radnode.phantom import CTPhantom, write_ct_series
from radnode.imaging.series import VolumeCriteria
from radnode.uncertainty import dice

SHAPE, SPACING, PATCH = (24, 48, 48), (3.0, 2.0, 2.0), (16, 32, 32)
NETWORK = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
           "channels": [8, 16], "strides": [2], "num_res_units": 1, "dropout": 0.1}


def synthetic_ct(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft tissue (40 HU) with one brighter ellipsoid 'lesion' (120 HU) at a random place, noise 25 HU."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij")
    centre = rng.uniform([8, 16, 16], [16, 32, 32])
    radii = rng.uniform([3, 6, 6], [5, 10, 10])
    truth = (((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
             + ((x - centre[2]) / radii[2]) ** 2) <= 1
    hu = np.where(truth, 120.0, 40.0) + rng.normal(0, 25, SHAPE)
    return hu.astype(np.float32), truth


def _window(hu: np.ndarray) -> np.ndarray:
    return np.clip((hu + 100.0) / 400.0, 0, 1).astype(np.float32)  # the bundle's ScaleIntensityRanged


def train_tiny_unet(steps: int = 30) -> UNet:
    """A small UNet trained for a few seconds on synthetic CT patches: good enough to segment them."""
    torch.manual_seed(0)
    network = UNet(**{k: v for k, v in NETWORK.items() if k != "_target_"})
    optimiser = torch.optim.Adam(network.parameters(), lr=2e-2)
    cases = [synthetic_ct(seed) for seed in range(8)]
    for step in range(steps):
        hu, truth = cases[step % len(cases)]
        image = torch.from_numpy(_window(hu))[None, None]
        target = torch.from_numpy(truth.astype(np.int64))[None]
        loss = torch.nn.functional.cross_entropy(network(image), target, weight=torch.tensor([1.0, 3.0]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return network.eval()


def write_bundle(folder: Path, network: torch.nn.Module) -> Path:
    """A MONAI bundle as the Model Zoo lays them out: metadata, inference config, state dict."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    metadata = {
        "name": "tiny lesion", "version": "0.1.0",
        "network_data_format": {"inputs": {"image": {"type": "image", "num_channels": 1}},
                                "outputs": {"pred": {"type": "image", "num_channels": 2,
                                                     "channel_def": {"0": "background", "1": "lesion"}}}},
    }
    inference = {
        "network_def": NETWORK,
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [SPACING[2], SPACING[1], SPACING[0]]},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -100, "a_max": 300, "b_min": 0,
             "b_max": 1, "clip": True}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(PATCH), "sw_batch_size": 2},
    }
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    torch.save(network.state_dict(), folder / "models" / "model.pt")
    return folder


@pytest.fixture(scope="module")
def trained() -> UNet:
    return train_tiny_unet()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, trained: UNet) -> Path:
    return write_bundle(tmp_path_factory.mktemp("models") / "tiny_bundle", trained)


@pytest.fixture(scope="module")
def ct_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    hu, truth = synthetic_ct(seed=100)
    folder = tmp_path_factory.mktemp("ct_case")
    write_ct_series(CTPhantom(np.rint(hu).astype(np.int16), SPACING, {"lesion": truth}), folder)
    return folder, truth


def test_bundle_loads_with_contract_from_its_configs(bundle: Path) -> None:
    assert check_model_folder(bundle) == []
    model = load_model_folder(bundle)
    assert model.kind == "bundle"
    assert [s.key for s in model.spec.labels.values()] == ["lesion"]
    assert model.spec.patch_size == PATCH and model.spec.spacing == SPACING
    assert (model.spec.normalisation.kind, model.spec.normalisation.low, model.spec.normalisation.high) == \
        ("window", -100.0, 300.0)
    assert model.has_dropout


TINY_MODEL_FOLDER_ENV = "TINY_MODEL_FOLDER"
"""The model folder of :class:`TinyModelApp` run in a job process (``RADNODE_PIPELINES=tiny_model=test_models:…``)."""


class TinyModelApp(Application):
    """A pipeline composed of the model operators, as an app for a model folder would be; its review
    thresholds are the configuration's ``uncertainty`` settings."""

    name = "tiny_model"
    version = "0.1.0"
    model_folder: Path | None = None
    """Set by an in-process test; else ``$TINY_MODEL_FOLDER``."""

    def compose(self) -> None:
        context = Application.init_app_context([self.name, *self.argv])
        model = load_model_folder(self.model_folder or Path(os.environ[TINY_MODEL_FOLDER_ENV]))
        algorithm = AlgorithmInfo(name=model.spec.name, version=model.spec.version)
        writers = dict(output_folder=Path(context.output_path), algorithm=algorithm,
                       uid_root=pydicom.uid.PYDICOM_ROOT_UID)
        loader = StudyFolderLoaderOperator(self, CountCondition(self, 1), input_folder=Path(context.input_path),
                                           name="loader")
        selector = VolumeSeriesSelectorOperator(self, criteria=VolumeCriteria(), name="selector")
        to_volume = SeriesToVolumeOperator(self, name="to_volume")
        prepare = ModelPreprocessOperator(self, model_spec=model.spec, name="preprocess")
        infer = SlidingWindowInferenceOperator(self, model=model, options=InferenceOptions(mc_dropout_passes=2),
                                               name="inference")
        post = ModelPostprocessOperator(self, model=model, name="postprocess")
        measure = SegmentVolumeMeasurementOperator(self, algorithm_name=algorithm.name,
                                                   algorithm_version=algorithm.version, name="measure")
        seg = SegmentationWriterOperator(self, name="seg", **writers)
        sr = MeasurementReportWriterOperator(self, name="sr", **writers)
        fhir = FhirReportWriterOperator(self, name="fhir", **writers)
        pmap = UncertaintyMapWriterOperator(self, name="pmap", **writers)
        self.add_flow(loader, selector, {("study", "study")})
        self.add_flow(selector, to_volume, {("series", "series")})
        self.add_flow(to_volume, prepare, {("volume", "volume")})
        self.add_flow(prepare, infer, {("prepared", "prepared")})
        self.add_flow(infer, post, {("prepared_out", "prepared"), ("samples", "samples")})
        self.add_flow(to_volume, measure, {("volume", "volume")})
        self.add_flow(post, measure, {("extraction", "extraction")})
        for writer in (seg, sr, fhir, pmap):
            self.add_flow(to_volume, writer, {("volume", "volume")})
            self.add_flow(measure, writer, {("result", "result")})
        self.add_flow(seg, sr, {("seg", "seg")})
        self.add_flow(sr, fhir, {("sr", "sr")})


def test_bundle_runs_through_the_pipeline_operators(bundle: Path, ct_case: tuple[Path, np.ndarray],
                                                    tmp_path: Path) -> None:
    folder, truth = ct_case
    prepare_holoscan_process()
    TinyModelApp.model_folder = bundle
    TinyModelApp(argv=["tiny_model", "--input", str(folder), "--output", str(tmp_path)]).run()
    assert {p.name for p in tmp_path.iterdir()} >= {"seg.dcm", "sr.dcm", "fhir-bundle.json", "uncertainty-map.dcm"}
    volume, _ = load_volume(folder, VolumeCriteria())
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    mask = seg.get_pixels_by_source_instance([str(ds.SOPInstanceUID) for ds in volume.source], [1],
                                             assert_missing_frames_are_empty=True)[..., 0].astype(bool)
    assert dice(mask, truth) >= 0.8
    rows = read_measurements(pydicom.dcmread(tmp_path / "sr.dcm"))
    assert {r["concept"]["value"] for r in rows} == {"118565006", "UNC-MEAN", "UNC-BOUNDARY", "UNC-AGREEMENT"}
    lesion_ml = next(r["value"] for r in rows if r["concept"]["value"] == "118565006")
    assert lesion_ml == pytest.approx(mask.sum() * np.prod(SPACING) / 1000, abs=0.05)  # SR agrees with SEG


def test_torchscript_with_sidecar_matches_the_bundle(trained: UNet, bundle: Path, tmp_path: Path) -> None:
    torch.jit.script(trained).save(str(tmp_path / "model.ts"))
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({
        "name": "tiny lesion ts", "version": "0.1.0", "weights": "model.ts",
        "input": {"spacing": list(SPACING), "patch_size": list(PATCH),
                  "normalisation": {"kind": "window", "low": -100, "high": 300}},
        "labels": {1: {"key": "lesion", "name": "Lesion", "code": ["52988006", "SCT", "Lesion"],
                       "category": ["49755003", "SCT", "Morphologically Altered Structure"]}},
    }))
    model = load_model_folder(tmp_path)
    assert model.kind == "torchscript" and model.spec.labels[1].property_type.value == "52988006"
    volume, _ = load_volume(_write_case(tmp_path / "case", seed=101), VolumeCriteria())
    options = InferenceOptions(mirror_tta=False)
    from_script = segment_with_model(volume, model, options).segments[0].mask
    from_bundle = segment_with_model(volume, load_model_folder(bundle), options).segments[0].mask
    assert dice(from_script, from_bundle) > 0.99


def _write_case(folder: Path, seed: int) -> Path:
    hu, truth = synthetic_ct(seed)
    write_ct_series(CTPhantom(np.rint(hu).astype(np.int16), SPACING, {"lesion": truth}), folder)
    return folder


def test_ensemble_of_two_folders_gives_more_samples(bundle: Path, ct_case: tuple[Path, np.ndarray]) -> None:
    volume, _ = load_volume(ct_case[0], VolumeCriteria())
    ensemble = load_ensemble([bundle, bundle])
    result = segment_with_model(volume, ensemble, InferenceOptions(mirror_tta=False))
    assert result.uncertainty.n_samples == 2 and result.uncertainty.method.startswith("ensemble of 2")


def test_state_dict_that_does_not_fit_fails_at_load(bundle: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    (broken / "configs").mkdir(parents=True)
    (broken / "models").mkdir()
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["network_def"]["channels"] = [4, 8]
    (broken / "configs" / "inference.json").write_text(json.dumps(config))
    (broken / "configs" / "metadata.json").write_text((bundle / "configs" / "metadata.json").read_text())
    (broken / "models" / "model.pt").write_bytes((bundle / "models" / "model.pt").read_bytes())
    problems = check_model_folder(broken)
    assert len(problems) == 1 and "weights do not fit network_def" in problems[0]


def test_labels_that_do_not_match_the_output_fail_at_load(trained: UNet, tmp_path: Path) -> None:
    torch.jit.script(trained).save(str(tmp_path / "model.ts"))
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({
        "input": {"patch_size": list(PATCH)}, "labels": {1: "liver", 2: "spleen"}}))
    with pytest.raises(ModelError, match=r"output of shape \(1, 2, 16, 32, 32\), expected \(1, 3,"):
        load_model_folder(tmp_path)


def test_missing_weights_and_unknown_folders_are_named(tmp_path: Path) -> None:
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"input": {"patch_size": [8, 8, 8]}, "labels": {1: "x"}}))
    assert check_model_folder(tmp_path) == [f"{tmp_path / 'model.ts'}: weights file missing"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a model folder" in check_model_folder(empty)[0]
    nnunet = tmp_path / "nnunet"
    nnunet.mkdir()
    (nnunet / "dataset.json").write_text("{}")
    (nnunet / "plans.json").write_text("{}")
    assert "nnU-Net results folder" in check_model_folder(nnunet)[0]


def test_models_check_command(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["models", "check", str(bundle)]) == 0
    assert "ok" in capsys.readouterr().out
    assert cli_main(["models", "check", str(tmp_path)]) == 2
    assert "not a model folder" in capsys.readouterr().out


@pytest.mark.skipif(array_backend().name != "cupy", reason="needs CuPy and a CUDA device")
def test_gpu_and_cpu_paths_give_the_same_segmentation(bundle: Path, ct_case: tuple[Path, np.ndarray]) -> None:
    volume, _ = load_volume(ct_case[0], VolumeCriteria())
    options = InferenceOptions(mirror_tta=False)
    gpu = segment_with_model(volume, load_model_folder(bundle, torch.device("cuda")), options, prefer_gpu=True)
    cpu = segment_with_model(volume, load_model_folder(bundle, torch.device("cpu")), options, prefer_gpu=False)
    assert dice(gpu.segments[0].mask, cpu.segments[0].mask) > 0.99
