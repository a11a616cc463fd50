"""Model folders: a MONAI bundle trained here on synthetic CT, its TorchScript + sidecar export, and the
start-up checks that refuse missing or mismatched weights. The bundle runs through the shipped ``model_seg``
pipeline (``radnode run --model``: series selection → preprocess → sliding window → postprocess →
SEG/SR/FHIR/Parametric Map), which must find the synthetic lesion and write valid objects."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
import yaml
from fhir.resources.R4B.bundle import Bundle
from monai.networks.nets import UNet

from factories import LESION_PATCH, LESION_SHAPE, LESION_SPACING, lesion_ct, write_lesion_case
from radnode.apps.model_seg.app import series_selection
from radnode.cli import main as cli_main
from radnode.execution import prepare_holoscan_process
from radnode.imaging.series import InputError, VolumeCriteria, load_volume, read_study_folder, select_volume_series
from radnode.models.errors import ModelError
from radnode.models.inference import InferenceOptions, array_backend, segment_with_model
from radnode.models.loading import check_model_folder, load_ensemble, load_model_folder, model_folders
from radnode.outputs.sr import read_measurements
from radnode.phantom import CTPhantom, write_ct_series
from radnode.uncertainty import dice
from support.dicom_tools import dciodvfy_report

@pytest.fixture(scope="module")
def trained(tiny_unet: UNet) -> UNet:
    return tiny_unet  # conftest: factories.train_tiny_unet(), once per session


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Path:
    return tiny_bundle  # conftest: write_bundle(…/tiny_bundle, trained), once per session


@pytest.fixture(scope="module")
def ct_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    hu, truth = lesion_ct(seed=100)
    folder = tmp_path_factory.mktemp("ct_case")
    write_ct_series(CTPhantom(np.rint(hu).astype(np.int16), LESION_SPACING, {"lesion": truth}), folder)
    return folder, truth


def test_bundle_loads_with_contract_from_its_configs(bundle: Path) -> None:
    assert check_model_folder(bundle) == []
    model = load_model_folder(bundle)
    assert model.kind == "bundle"
    assert [s.key for s in model.spec.labels.values()] == ["lesion"]
    assert model.spec.patch_size == LESION_PATCH and model.spec.spacing == LESION_SPACING
    assert (model.spec.normalisation.kind, model.spec.normalisation.low, model.spec.normalisation.high) == \
        ("window", -100.0, 300.0)
    assert model.has_dropout


@pytest.fixture(scope="module")
def shipped_run(bundle: Path, ct_case: tuple[Path, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``radnode run CASE --output OUT --model BUNDLE``: the shipped model_seg pipeline on the trained bundle."""
    out = tmp_path_factory.mktemp("model_seg")
    prepare_holoscan_process()
    assert cli_main(["run", str(ct_case[0]), "--output", str(out), "--model", str(bundle)]) == 0
    return out


def _lesion_mask(run: Path, case: Path) -> np.ndarray:
    volume, _ = load_volume(case, VolumeCriteria())
    seg = hd.seg.segread(run / "seg.dcm")
    return seg.get_pixels_by_source_instance([str(ds.SOPInstanceUID) for ds in volume.source], [1],
                                             assert_missing_frames_are_empty=True)[..., 0].astype(bool)


def test_the_shipped_pipeline_runs_the_bundle_and_finds_the_lesion(shipped_run: Path,
                                                                   ct_case: tuple[Path, np.ndarray]) -> None:
    folder, truth = ct_case
    manifest = json.loads((shipped_run / "manifest.json").read_text())
    assert manifest["pipeline"] == "model_seg"
    assert {o["file"] for o in manifest["outputs"]} == {"seg.dcm", "sr.dcm", "fhir-bundle.json",
                                                        "uncertainty-map.dcm", "report-sr.dcm", "report-pdf.dcm",
                                                        "report.txt", "report.pdf"}
    assert manifest["review"]["samples"] == 8  # 4 mirrors x 2 Monte Carlo dropout passes
    seg = pydicom.dcmread(shipped_run / "seg.dcm")
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["lesion"]
    assert str(seg.SegmentSequence[0].SegmentAlgorithmName) == "tiny lesion"
    assert dice(_lesion_mask(shipped_run, folder), truth) >= 0.8


def test_the_shipped_pipeline_reports_volume_and_uncertainty_in_sr_and_fhir(shipped_run: Path,
                                                                            ct_case: tuple[Path, np.ndarray]) -> None:
    rows = read_measurements(pydicom.dcmread(shipped_run / "sr.dcm"))
    assert {r["concept"]["value"] for r in rows} == {"118565006", "UNC-MEAN", "UNC-BOUNDARY", "UNC-AGREEMENT"}
    by_code = {r["concept"]["value"]: r["value"] for r in rows}
    mask = _lesion_mask(shipped_run, ct_case[0])
    assert by_code["118565006"] == pytest.approx(mask.sum() * np.prod(LESION_SPACING) / 1000, abs=0.05)  # SR = SEG
    assert 0 <= by_code["UNC-MEAN"] <= 1 and 0 <= by_code["UNC-AGREEMENT"] <= 1
    bundle = Bundle.model_validate_json((shipped_run / "fhir-bundle.json").read_text())
    observations = {o.code.text: o for o in (e.resource for e in bundle.entry)
                    if o.get_resource_type() == "Observation" and o.valueQuantity is not None}
    assert float(observations["lesion Volume"].valueQuantity.value) == pytest.approx(by_code["118565006"])
    assert observations["lesion Volume"].valueQuantity.code == "mL"
    assert len([o for o in observations.values() if o.interpretation]) == 3  # the uncertainty scores
    report = next(e.resource for e in bundle.entry if e.resource.get_resource_type() == "DiagnosticReport")
    assert len(report.result) == len(observations) + 1 == len(rows) + 1  # + the lesion's measurement group
    assert report.conclusion  # the model pipeline writes its report too


@pytest.mark.parametrize("name, iod", [("seg.dcm", "Segmentation"), ("sr.dcm", "Comprehensive3DSR"),
                                       ("uncertainty-map.dcm", "ParametricMap")])
def test_the_shipped_pipelines_outputs_pass_dciodvfy(shipped_run: Path, name: str, iod: str) -> None:
    report, errors = dciodvfy_report(shipped_run / name)
    assert iod in report, f"dciodvfy did not recognise the {iod} IOD: {report[:5]}"
    assert errors == []


def test_nothing_found_is_reported_as_empty_segments_not_a_failure(bundle: Path, tmp_path: Path) -> None:
    """A study without a lesion: the SEG holds the empty segment, SR and FHIR say 0 mL."""
    rng = np.random.default_rng(5)
    hu = 40.0 + rng.normal(0, 25, LESION_SHAPE)
    write_ct_series(CTPhantom(np.rint(hu).astype(np.int16), LESION_SPACING, {}), tmp_path / "normal")
    prepare_holoscan_process()
    assert cli_main(["run", str(tmp_path / "normal"), "--output", str(tmp_path / "out"), "--model", str(bundle)]) == 0
    rows = read_measurements(pydicom.dcmread(tmp_path / "out" / "sr.dcm"))
    assert next(r["value"] for r in rows if r["concept"]["value"] == "118565006") == 0
    assert not pydicom.dcmread(tmp_path / "out" / "seg.dcm").pixel_array.any()


def test_a_missing_or_wrong_model_folder_fails_at_start_up_with_the_check_message(
        ct_case: tuple[Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOLOSCAN_MODEL_PATH", raising=False)
    prepare_holoscan_process()
    (tmp_path / "empty").mkdir()
    (problem,) = check_model_folder(tmp_path / "empty")
    assert cli_main(["run", str(ct_case[0]), "--output", str(tmp_path / "out"), "--model", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip() == f"radnode: {problem}"
    assert cli_main(["run", str(ct_case[0]), "--output", str(tmp_path / "out"), "--pipeline", "model_seg"]) == 2
    assert "model_seg: no model folder; give --model DIR" in capsys.readouterr().err
    assert cli_main(["run", str(ct_case[0]), "--output", str(tmp_path / "out"), "--pipeline", "ct_tissue",
                     "--model", str(tmp_path / "empty")]) == 2
    assert "pipeline ct_tissue runs no model folder of yours" in capsys.readouterr().err
    assert not (tmp_path / "out" / "seg.dcm").exists()


def test_a_folder_of_model_folders_is_an_ensemble(bundle: Path, tmp_path: Path) -> None:
    """HOLOSCAN_MODEL_PATH as a MAP has it (/opt/holoscan/models/<name>/…): every sub-folder a member."""
    assert model_folders(bundle) == [bundle]
    for name in ("fold1", "fold0"):
        (tmp_path / "models" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "models" / name).symlink_to(bundle)
    assert [p.name for p in model_folders(tmp_path / "models")] == ["fold0", "fold1"]
    (tmp_path / "models" / "notes").mkdir()
    with pytest.raises(ModelError, match=r"models/notes: not a model folder"):
        model_folders(tmp_path / "models")
    with pytest.raises(ModelError, match=r"configs: not a model folder"):
        model_folders(bundle / "configs")  # a folder holding no model names itself, not its sub-folders


def _describe(folder: Path, description: str) -> Path:
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = description
        ds.save_as(path)
    return folder


def test_the_series_is_the_largest_volume_of_the_models_modality_unless_the_model_says_more(
        trained: UNet, tmp_path: Path) -> None:
    hu, truth = lesion_ct(seed=7)
    study_uid = pydicom.uid.generate_uid()
    write_ct_series(CTPhantom(np.rint(hu).astype(np.int16), LESION_SPACING, {"lesion": truth}), tmp_path / "study" / "a",
                    study_uid=study_uid)
    _describe(tmp_path / "study" / "a", "Lesion protocol")
    thicker = np.rint(np.concatenate([hu, hu[:8]])).astype(np.int16)
    write_ct_series(CTPhantom(thicker, LESION_SPACING, {}), tmp_path / "study" / "b", study_uid=study_uid)
    study = read_study_folder(tmp_path / "study")
    torch.jit.script(trained).save(str(tmp_path / "model.ts"))
    sidecar = {"name": "tiny lesion ts", "weights": "model.ts",
               "input": {"patch_size": list(LESION_PATCH), "spacing": list(LESION_SPACING)},
               "labels": {1: "lesion"}}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(sidecar))
    spec = load_model_folder(tmp_path).spec
    assert spec.modality == "CT" and spec.series is None
    chosen, skipped = select_volume_series(study, *series_selection(spec))
    assert len(chosen.datasets) == 32 and "has more or thinner slices" in skipped[0]

    sidecar["input"]["series"] = {"SeriesDescription": {"matches": "(?i)lesion"}}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(sidecar))
    spec = load_model_folder(tmp_path).spec
    chosen, skipped = select_volume_series(study, *series_selection(spec))
    assert str(chosen.first.SeriesDescription) == "Lesion protocol"
    assert skipped == ["series 1 'Phantom CT thorax-abdomen' (CT, 32 instances): not the series tiny lesion ts "
                       "reads (SeriesDescription matches '(?i)lesion' not matched: 'Phantom CT thorax-abdomen')"]

    sidecar["input"]["modality"] = "MR"
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(sidecar))
    with pytest.raises(InputError, match="no usable MR volume"):
        select_volume_series(study, *series_selection(load_model_folder(tmp_path).spec))


def test_modality_and_series_condition_are_checked_at_load(bundle: Path, tmp_path: Path) -> None:
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    metadata["network_data_format"]["inputs"]["image"]["modality"] = "MRI"  # as Model Zoo bundles write it
    copy = tmp_path / "mr_bundle"
    (copy / "configs").mkdir(parents=True)
    (copy / "models").mkdir()
    (copy / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (copy / "configs" / "inference.json").write_text((bundle / "configs" / "inference.json").read_text())
    (copy / "models" / "model.pt").write_bytes((bundle / "models" / "model.pt").read_bytes())
    assert load_model_folder(copy).spec.modality == "MR"
    sidecar = tmp_path / "sidecar"
    sidecar.mkdir()
    for series, message in (({"SeriesDescription": {"regex": "x"}}, "unknown operator 'regex'"),
                            ({"SeriesDescriptoin": "x"}, "did you mean 'SeriesDescription'")):
        (sidecar / "model.yaml").write_text(yaml.safe_dump({"input": {"patch_size": list(LESION_PATCH), "series": series},
                                                            "labels": {1: "x"}}))
        problems = check_model_folder(sidecar)
        assert len(problems) == 1 and problems[0].startswith(f"{sidecar / 'model.yaml'}: input.series: ")
        assert message in problems[0]
    (sidecar / "model.yaml").write_text(yaml.safe_dump({"input": {"patch_size": list(LESION_PATCH), "modality": "US"},
                                                        "labels": {1: "x"}}))
    assert check_model_folder(sidecar) == [f"{sidecar / 'model.yaml'}: input.modality 'US'; expected one of CT, MR"]


def test_torchscript_with_sidecar_matches_the_bundle(trained: UNet, bundle: Path, tmp_path: Path) -> None:
    torch.jit.script(trained).save(str(tmp_path / "model.ts"))
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({
        "name": "tiny lesion ts", "version": "0.1.0", "weights": "model.ts",
        "input": {"spacing": list(LESION_SPACING), "patch_size": list(LESION_PATCH),
                  "normalisation": {"kind": "window", "low": -100, "high": 300}},
        "labels": {1: {"key": "lesion", "name": "Lesion", "code": ["52988006", "SCT", "Lesion"],
                       "category": ["49755003", "SCT", "Morphologically Altered Structure"]}},
    }))
    model = load_model_folder(tmp_path)
    assert model.kind == "torchscript" and model.spec.labels[1].property_type.value == "52988006"
    volume, _ = load_volume(write_lesion_case(tmp_path / "case", seed=101), VolumeCriteria())
    options = InferenceOptions(mirror_tta=False)
    from_script = segment_with_model(volume, model, options).segments[0].mask
    from_bundle = segment_with_model(volume, load_model_folder(bundle), options).segments[0].mask
    assert dice(from_script, from_bundle) > 0.99


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
        "input": {"patch_size": list(LESION_PATCH)}, "labels": {1: "liver", 2: "spleen"}}))
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
