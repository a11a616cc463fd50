"""The MRI brain pipeline end to end on a real T1 brain: Colin27 (mricron-data) written as a DICOM MR study.

The study has the 3D T1 plus series the selector must skip (2D T2, 3D FLAIR, localizer). The node's
brain mask must match the template's own brain extraction (ch2bet) with Dice ≥ 0.9, and the SR, FHIR
and uncertainty Parametric Map must carry the intracranial and brain volumes and uncertainty scores.
The uncertainty must mean something on the real model: Colin27 made harder in known ways scores higher
than the clean scan, and the score ranks the degraded cases by the error the degradation caused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from fhir.resources.R4B.bundle import Bundle

from radnode.execution import run_app
from radnode.imaging.brain import (
    AUGMENTATIONS,
    Augmentation,
    Reorientation,
    _unwarped_output,
    _warped_fine_input,
    field_of_view_contact,
)
from radnode.imaging.mri import nifti_to_axial_volume, select_t1_series, write_mr_series
from radnode.imaging.series import InputError, read_study_folder
from radnode.imaging.volume import Volume
from radnode.models.deepbet import MODEL_DIR_ENV, load_deepbet
from radnode.models.errors import ModelError
from radnode.outputs.sr import read_measurements
from radnode.node.store import JobState
from radnode.peers import FhirServer, StoreSCP
from radnode.pipelines.rules import DEFAULT_RULES
from radnode.uncertainty import dice, spearman
from support.bench_scripts import load_bench_script
from support.dicom_tools import dciodvfy_report
from support.node import ServeProcess

TEMPLATES = Path("/usr/share/mricron/templates")
T1, REFERENCE = TEMPLATES / "ch2.nii.gz", TEMPLATES / "ch2bet.nii.gz"


def _every_other_slice(volume: Volume) -> Volume:
    """A 2 mm copy of a 1 mm volume (same frame of reference), standing in for another acquisition."""
    return Volume(volume.array[::2].copy(), (volume.spacing[0] * 2, *volume.spacing[1:]), volume.positions[::2],
                  volume.orientation, modality="MR")


@pytest.fixture(scope="module")
def t1_volume() -> Volume:
    return nifti_to_axial_volume(T1)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, t1_volume: Volume) -> Path:
    folder = tmp_path_factory.mktemp("mr_study")
    common = dict(study_uid=pydicom.uid.generate_uid(), frame_of_reference_uid=pydicom.uid.generate_uid())
    thick = _every_other_slice(t1_volume)
    write_mr_series(thick, folder / "t2", series_description="T2 TSE axial", series_number=2, echo_time_ms=90,
                    repetition_time_ms=5000, inversion_time_ms=None, acquisition_type="2D",
                    scanning_sequence=("SE",), **common)
    write_mr_series(thick, folder / "flair", series_description="3D FLAIR", series_number=4, echo_time_ms=120,
                    repetition_time_ms=5000, inversion_time_ms=1800, scanning_sequence=("SE", "IR"), **common)
    localizer = Volume(t1_volume.array[88:91].copy(), t1_volume.spacing, t1_volume.positions[88:91],
                       t1_volume.orientation, modality="MR")
    write_mr_series(localizer, folder / "localizer", series_description="Localizer", series_number=1, **common)
    write_mr_series(t1_volume, folder / "t1", series_description="T1 MPRAGE 3D sag", series_number=3, **common)
    return folder


@pytest.fixture(scope="module")
def outputs(study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mri_brain_out")
    run_app("mri_brain", study, out)
    return out


def test_selector_picks_the_3d_t1_and_says_why_others_were_skipped(study: Path) -> None:
    chosen, skipped = select_t1_series(read_study_folder(study))
    assert str(chosen.first.SeriesDescription) == "T1 MPRAGE 3D sag"
    reasons = " | ".join(skipped)
    assert len(skipped) == 3
    assert "'T2 TSE axial'" in reasons and "MR Acquisition Type 2D" in reasons
    assert "'3D FLAIR'" in reasons and "Echo Time 120 ms" in reasons
    assert "'Localizer'" in reasons and "3 slices" in reasons


def test_selector_refuses_a_study_without_a_3d_t1(study: Path, tmp_path: Path) -> None:
    shutil.copytree(study / "t2", tmp_path / "t2")
    with pytest.raises(InputError, match="no usable 3D T1.*MR Acquisition Type 2D"):
        select_t1_series(read_study_folder(tmp_path))


def test_reorientation_round_trips_and_reaches_ras(t1_volume: Volume) -> None:
    orientation = Reorientation.to_ras(t1_volume)
    ras = orientation.apply(t1_volume.array)
    assert np.array_equal(orientation.invert(ras), t1_volume.array)
    # ch2 is stored RAS; the round trip through the DICOM layout must give the NIfTI array back.
    import nibabel as nib
    assert np.array_equal(ras, np.asarray(nib.load(str(T1)).dataobj, dtype=np.float32))


def _t1_uids_foot_to_head(study: Path) -> list[str]:
    """The T1 instances ordered foot to head, the slice order of the reference volume."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((study / "t1").iterdir())]
    return [str(ds.SOPInstanceUID) for ds in sorted(headers, key=lambda ds: float(ds.ImagePositionPatient[2]))]


def test_brain_mask_matches_the_reference_extraction(outputs: Path, study: Path) -> None:
    seg = hd.seg.segread(outputs / "seg.dcm")
    assert [str(item.TrackingID) for item in seg.SegmentSequence] == ["intracranial", "brain"]
    mask = seg.get_pixels_by_source_instance(source_sop_instance_uids=_t1_uids_foot_to_head(study),
                                             segment_numbers=[1], assert_missing_frames_are_empty=True)
    reference = nifti_to_axial_volume(REFERENCE).array > 0
    assert mask.shape[:3] == reference.shape
    assert dice(mask[..., 0].astype(bool), reference) >= 0.9



@pytest.mark.slow
def test_t1_study_sent_to_the_node_returns_the_brain_seg_and_volumes(
        study: Path, tmp_path: Path, peers: tuple[StoreSCP, FhirServer]) -> None:
    """The acceptance path: the multi-series MR study over storescu to ``radnode serve`` with the shipped
    rules; the PACS gets the brain SEG (Dice ≥ 0.9 vs ch2bet), the SR and the uncertainty map, the EHR the
    brain volumes the SR holds."""
    pacs, fhir = peers
    node = ServeProcess(tmp_path / "node", pacs, fhir, rules=DEFAULT_RULES)
    try:
        node.send(*sorted(study.rglob("*.dcm")), calling_ae="MR_SCANNER")
        ((job, events),) = node.jobs_when_final(1)
    finally:
        node.stop()
    assert (job.pipeline, job.state) == ("mri_brain", JobState.DONE), f"{job.reason}: {[e.message for e in events]}"
    received = {pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID.name: p for p in pacs.received()}
    assert set(received) == {"Segmentation Storage", "Comprehensive 3D SR Storage", "Parametric Map Storage",
                             "Comprehensive SR Storage"}  # + the report SR (the PDF only where asked for)
    seg = hd.seg.segread(received["Segmentation Storage"])
    mask = seg.get_pixels_by_source_instance(source_sop_instance_uids=_t1_uids_foot_to_head(study),
                                             segment_numbers=[1], assert_missing_frames_are_empty=True)
    assert dice(mask[..., 0].astype(bool), nifti_to_axial_volume(REFERENCE).array > 0) >= 0.9
    volumes = {m["structure"]: m["value"] for m in read_measurements(pydicom.dcmread(
        received["Comprehensive 3D SR Storage"])) if m["concept"]["meaning"] == "Volume"}
    assert set(volumes) == {"intracranial", "brain"} and 900 < volumes["brain"] < volumes["intracranial"]
    observations = Bundle.model_validate(fhir.search("Observation", "_count=200")).entry
    fhir_volumes = sorted(float(o.resource.valueQuantity.value) for o in observations
                          if o.resource.code.coding[0].code == "118565006")
    assert fhir_volumes == sorted(volumes.values())


@pytest.mark.parametrize("name, iod", [("seg.dcm", "Segmentation"), ("sr.dcm", "Comprehensive3DSR"),
                                       ("uncertainty-map.dcm", "ParametricMap"), ("report-sr.dcm", "ComprehensiveSR"),
                                       ("report-pdf.dcm", "EncapsulatedPDF")])
def test_outputs_pass_dciodvfy(outputs: Path, name: str, iod: str) -> None:
    assert shutil.which("dciodvfy"), "dciodvfy (dicom3tools) is needed to verify the written objects"
    report, errors = dciodvfy_report(outputs / name)
    assert iod in report, f"dciodvfy did not recognise the {iod} IOD: {report[:5]}"
    assert errors == []


def test_sr_reports_intracranial_and_brain_volume_and_uncertainty(outputs: Path) -> None:
    rows = read_measurements(pydicom.dcmread(outputs / "sr.dcm"))
    volumes = {r["structure"]: r["value"] for r in rows if r["concept"]["value"] == "118565006"}
    assert volumes.keys() == {"intracranial", "brain"}
    assert 1000 < volumes["brain"] < volumes["intracranial"] < 2300  # Colin27's intracranial volume is large
    uncertainty = {r["concept"]["value"]: r["value"] for r in rows if r["structure"] == "intracranial"
                   and r["concept"]["scheme_designator"] == "99RADNODE"}
    assert set(uncertainty) == {"UNC-MEAN", "UNC-BOUNDARY", "UNC-AGREEMENT"}
    assert 0 <= uncertainty["UNC-MEAN"] < uncertainty["UNC-BOUNDARY"] <= 1
    assert 0.9 < uncertainty["UNC-AGREEMENT"] <= 1
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(outputs / "sr.dcm"))
    group = next(g for g in sr.content.get_volumetric_roi_measurement_groups() if g.tracking_identifier == "intracranial")
    review = [e for e in group.get_qualitative_evaluations() if e.name.value == "REVIEW"]
    assert [e.value.value for e in review] == ["REVIEW-NOT-REQUIRED"]  # a clean research-grade T1


def test_fhir_bundle_validates_and_carries_the_volumes(outputs: Path) -> None:
    bundle = Bundle.model_validate_json((outputs / "fhir-bundle.json").read_text())
    resources = [e.resource for e in bundle.entry]
    observations = [r for r in resources if r.get_resource_type() == "Observation"]
    by_text = {o.code.text: o for o in observations}
    assert "Intracranial contents (brain mask) Volume" in by_text and "Brain parenchyma Volume" in by_text
    assert by_text["Brain parenchyma Volume"].valueQuantity.code == "mL"
    scored = [o for o in observations if o.note]  # the uncertainty scores: quality checks, never "Normal"
    assert len(scored) == 3
    assert {o.interpretation[0].coding[0].code for o in scored} == {"REVIEW-NOT-REQUIRED"}
    report = next(r for r in resources if r.get_resource_type() == "DiagnosticReport")
    assert len(report.result) == len(observations)
    assert report.conclusion  # the Impression
    assert not [c for c in report.conclusionCode or [] if c.coding[0].code == "REVIEW-REQUIRED"]  # not flagged


def test_uncertainty_map_is_registered_to_the_t1(outputs: Path, study: Path) -> None:
    pmap = pydicom.dcmread(outputs / "uncertainty-map.dcm")
    t1 = pydicom.dcmread(next((study / "t1").iterdir()), stop_before_pixels=True)
    assert pmap.FrameOfReferenceUID == t1.FrameOfReferenceUID
    assert int(pmap.NumberOfFrames) == len(list((study / "t1").iterdir()))
    assert (int(pmap.Rows), int(pmap.Columns)) == (int(t1.Rows), int(t1.Columns))
    values = pmap.pixel_array
    assert values.dtype == np.float32 and 0 <= values.min() and values.max() <= 1 and values.max() > 0.5


def test_manifest_lists_every_output(outputs: Path) -> None:
    manifest = json.loads((outputs / "manifest.json").read_text())
    assert manifest["pipeline"] == "mri_brain"
    assert {o["file"] for o in manifest["outputs"]} == {"seg.dcm", "sr.dcm", "fhir-bundle.json",
                                                        "uncertainty-map.dcm", "report-sr.dcm", "report-pdf.dcm",
                                                        "report.txt", "report.pdf"}


def test_missing_weights_fail_at_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODEL_DIR_ENV, str(tmp_path))
    with pytest.raises(ModelError, match="bbox_model.pt: deepbet weights missing"):
        load_deepbet()
    (tmp_path / "bbox_model.pt").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a loadable TorchScript model"):
        load_deepbet()


def test_default_routing_sends_the_t1_study_to_the_brain_pipeline(study: Path, real_ct_folder: Path) -> None:
    from radnode.cli import _routed_pipeline
    from radnode.config import Config

    assert _routed_pipeline(Config(), study) == "mri_brain"
    assert _routed_pipeline(Config(), real_ct_folder) == "ct_tissue"


def test_test_time_augmentations_are_fixed_and_undone_on_the_output() -> None:
    """The TTA set is the same for every study, and each spatial augmentation's output warp inverts its input
    warp (millimetres on an anisotropic grid): a smooth image warped in and back comes out as it went in."""
    assert AUGMENTATIONS[:2] == (Augmentation(), Augmentation(mirror=True)) and len(AUGMENTATIONS) == 6
    assert all(a.spatial and 0.8 <= a.gamma <= 1.25 for a in AUGMENTATIONS[2:])
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (60, 70, 50)), indexing="ij")
    image = torch.from_numpy((100 * np.exp(-3 * (x ** 2 + (y - 0.1) ** 2 + 2 * z ** 2)) + 20 * x).astype(np.float32))
    box = (slice(5, 55), slice(5, 65), slice(4, 46))
    inside = (slice(10, -10),) * 3
    for augmentation in (*AUGMENTATIONS[2:], Augmentation(rotation_deg=(0.0, 0.0, 30.0), shift_mm=(4.0, 0.0, 0.0))):
        fine = _warped_fine_input(image, box, augmentation, (1.0, 1.0, 1.5), torch.tensor(0.0))
        back = _unwarped_output(fine, box, augmentation, (1.0, 1.0, 1.5))[0, 0]
        error = (back - image[box]).abs()[inside]
        assert float(error.mean()) < 1.0, augmentation  # of a 100-unit peak
        assert float((fine - image[box].mean()).abs().mean()) > 1.0  # the input did move


def test_a_mask_cut_by_the_field_of_view_is_marked_where_it_is_cut() -> None:
    shape = (40, 40, 40)
    z, y, x = np.indices(shape)
    head = (z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 17 ** 2
    brain = (z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 13 ** 2
    image = np.where(head, 50.0, 0.0) + np.where(brain, 100.0, 0.0)
    assert not field_of_view_contact(brain, image).any()  # enclosed by the head: nothing cut
    cut = image[:28]  # the top of the head not acquired
    contact = field_of_view_contact(brain[:28], cut)
    assert contact.any() and set(np.unique(np.nonzero(contact)[0])) == {27}
    blanked = image.copy()
    blanked[28:] = 0  # the top of the head blanked to zero
    seen = brain.copy()
    seen[28:] = False
    contact = field_of_view_contact(seen, blanked)
    assert set(np.unique(np.nonzero(contact)[0])) == {27, 28}  # both sides of the cut


@pytest.mark.slow
def test_degraded_colin27_scores_higher_and_the_score_ranks_the_damage() -> None:
    """The clean scan and the strongest level of each degradation (bench/uncertainty_eval.py). Every degraded
    case must score above the clean one, and Spearman(score, change) > 0 and the map must point at the changed
    voxels, where the change is 1 − Dice against the model's mask of the clean scan: the error the degradation
    caused. Against ch2bet the ranking does not hold (printed, not asserted): BET's mask leaves out a 1–3 mm shell
    that deepbet keeps, so the clean scan already has a Dice error of 0.065 and blur, which shrinks the mask
    towards BET's convention, lowers it."""
    evaluation = load_bench_script("uncertainty_eval")
    cases = [("clean", 0.0), ("noise", 0.3), ("blur", 6.0), ("shift", 0.8), ("crop", 0.3), ("fov", 0.3)]
    summary = evaluation.run(cases)
    rows = {r["case"]: r for r in summary["cases"]}
    print({k: v for k, v in summary.items() if k != "cases"})
    clean = rows["clean 0"]
    assert not clean["flagged"] and clean["change"] == 0.0
    for name, row in rows.items():
        if name != "clean 0":
            assert row["score"] > clean["score"], f"{name} scored {row['score']} <= clean {clean['score']}"
    scores = [r["score"] for r in rows.values()]
    assert spearman(scores, [r["change"] for r in rows.values()]) > 0
    assert summary["voxel_auroc_map_for_changes"] > 0.75
    assert summary["ece"] < 0.05
