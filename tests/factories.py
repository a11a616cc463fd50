"""Builders of the data tests share: studies on disk, CT series, FHIR bundles, models, stores.

Plain functions, no fixtures (those are in ``conftest.py``). Every synthetic image series is written by
``radnode.imaging.synthetic``, the project's one writer of synthetic series.

- ``write_study``: a small CT study (16×16 pixels), what the node tests send over DICOM.
- ``write_chest_phantom``: a geometric chest CT phantom with its true masks (``phantom_masks``) and a
  ``PipelineResult`` computed from it (``phantom_result``). Slices are numbered head to feet
  (InstanceNumber 1 is the most superior slice), the opposite of the volume's array order, as many scanners do.
- ``lesion_ct`` / ``write_lesion_case``: soft tissue with one lesion, what the tiny model is trained on;
  ``train_tiny_unet`` and ``write_bundle`` make that model and its MONAI bundle.
- ``restore_totalseg_dicom``: the real TotalSegmentator CT with the UIDs its distribution stripped put back.
- ``PATIENT_BUNDLE``: a FHIR transaction that can be counted.
- ``seg_masks_by_source``, ``write_correction``: a SEG's masks on its source slices read with numpy
  and a clinician's corrected SEG (segments eroded / dilated, another creator) written by highdicom.
- ``open_store_made_by``, ``RELEASE_0_1_SCHEMA``: a job store written by an older release (0.1's frozen
  SQLite schema in ``tests/data/job-store-0.1.sql``).
- ``job_ready_for_delivery``: a job in the store whose run just ended, for egress to stage.
- ``write_malformed_corpus``: at least 75 malformed instances (implausible headers, unsafe UIDs, unparseable
  files), each with the attribute its refusal must name.
"""

from __future__ import annotations

import json
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from highdicom.sr import CodedConcept
from scipy import ndimage
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

from radnode.config import Config
from radnode.imaging.series import CT_IMAGE_STORAGE
from radnode.imaging.synthetic import SeriesIdentity, write_image_series
from radnode.imaging.volume import Volume
from radnode.node.store import JobState, JobStore
from radnode.phantom import CTPhantom, write_ct_series
from radnode.results import Measurement, PipelineResult, Segment, Structure
from support.waiting import wait_until

if TYPE_CHECKING:
    import torch

    from radnode.node.egress import Egress
    from monai.networks.nets import UNet

PATIENT = {"PatientName": "Phantom^Chest", "PatientID": "PHANTOM001", "PatientBirthDate": "19600521",
           "PatientSex": "F"}
ACCESSION = "ACC20240001"
STUDY_DATE, STUDY_TIME = "20240312", "101500"
SLICE_SPACING_MM = 2.5
FIELD_OF_VIEW_MM = 448.0

_ANATOMY = CodedConcept.from_code(codes.SCT.AnatomicalStructure)
_TISSUE = CodedConcept.from_code(codes.SCT.Tissue)
STRUCTURES: dict[str, Structure] = {
    s.key: s for s in (
        Structure("body", "Body", _ANATOMY, CodedConcept.from_code(codes.SCT.EntireBody), None, (177, 122, 101)),
        Structure("lung_left", "Left lung", _ANATOMY, CodedConcept.from_code(codes.SCT.Lung),
                  CodedConcept.from_code(codes.SCT.Left), (128, 174, 128)),
        Structure("lung_right", "Right lung", _ANATOMY, CodedConcept.from_code(codes.SCT.Lung),
                  CodedConcept.from_code(codes.SCT.Right), (111, 184, 210)),
        Structure("adipose_tissue", "Subcutaneous fat", _TISSUE, CodedConcept.from_code(codes.SCT.AdiposeTissue),
                  None, (230, 220, 70)),
        Structure("bone", "Spine", _TISSUE, CodedConcept.from_code(codes.SCT.BoneTissue), None, (241, 214, 145)),
        Structure("skeletal_muscle", "Paraspinal muscle", _TISSUE, CodedConcept.from_code(codes.SCT.SkeletalMuscle),
                  None, (192, 104, 88)),
    )
}
"""The phantom's structures in SEG segment order (6 segments, overlapping: body contains the others)."""

VOLUME = CodedConcept.from_code(codes.SCT.Volume)
ATTENUATION = CodedConcept.from_code(codes.DCM.AttenuationCoefficient)
MEAN = CodedConcept.from_code(codes.SCT.Mean)
MILLILITER = CodedConcept("mL", "UCUM", "milliliter")
HOUNSFIELD = CodedConcept.from_code(codes.UCUM.HounsfieldUnit)
PERCENT = CodedConcept.from_code(codes.UCUM.Percent)
LAA950 = CodedConcept("LAA950", "99RADNODE", "Lung fraction below -950 HU")
"""A private-scheme (99*) concept, as pipelines use where no standard code exists."""


def phantom_masks(n_slices: int, rows: int, columns: int) -> dict[str, np.ndarray]:
    """True masks of every structure, ``[slice, row, column]`` with slice 0 the most inferior."""
    v, u = np.meshgrid(np.linspace(-1, 1, rows), np.linspace(-1, 1, columns), indexing="ij")
    z = np.linspace(0, 1, n_slices)[:, None, None]
    every_slice = np.ones((n_slices, 1, 1), dtype=bool)
    body = every_slice & ((u / 0.8) ** 2 + (v / 0.6) ** 2 <= 1)
    inner = every_slice & ((u / 0.7) ** 2 + (v / 0.5) ** 2 <= 1)
    in_chest = z >= 0.25  # lungs start a quarter up: the lower slices have no lung frames
    lung_right = in_chest & (((u + 0.35) / 0.25) ** 2 + ((v + 0.05) / 0.35) ** 2 <= 1)  # patient right = −x
    lung_left = in_chest & (((u - 0.35) / 0.25) ** 2 + ((v + 0.05) / 0.35) ** 2 <= 1)
    bone = every_slice & (u ** 2 + (v - 0.32) ** 2 <= 0.1 ** 2)
    muscle = every_slice & (u ** 2 + (v - 0.32) ** 2 <= 0.2 ** 2) & ~bone
    return {"body": body, "lung_left": lung_left, "lung_right": lung_right, "adipose_tissue": body & ~inner,
            "bone": bone, "skeletal_muscle": muscle}


def _emphysema(masks: dict[str, np.ndarray]) -> np.ndarray:
    """A low-attenuation patch in the upper half of the left lung."""
    upper = np.zeros_like(masks["lung_left"])
    upper[upper.shape[0] * 2 // 3:] = True
    rows = masks["lung_left"].shape[1]
    upper[:, : rows // 2] = False
    return masks["lung_left"] & upper


def phantom_hounsfield(masks: dict[str, np.ndarray], seed: int = 0, noise_hu: float = 10.0) -> np.ndarray:
    """CT numbers of the phantom with scanner-like Gaussian noise (σ ``noise_hu``, 10 HU by default), int16."""
    hu = np.full(masks["body"].shape, -1000.0)
    for key, value in (("body", 40), ("adipose_tissue", -100), ("skeletal_muscle", 55), ("bone", 700),
                       ("lung_left", -850), ("lung_right", -850)):
        hu[masks[key]] = value
    hu[_emphysema(masks)] = -975
    hu += np.random.default_rng(seed).normal(0, noise_hu, hu.shape)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def write_chest_phantom(folder: Path, n_slices: int = 40, rows: int = 64, columns: int = 64, *,
                        seed: int = 0, slice_mm: float = SLICE_SPACING_MM, noise_hu: float = 10.0) -> list[Path]:
    """The phantom as single-frame CT Image Storage files in ``folder``, returned in InstanceNumber order
    (``slice_mm``: slice thickness and spacing; ``noise_hu``: σ of the image noise)."""
    masks = phantom_masks(n_slices, rows, columns)
    stored = (phantom_hounsfield(masks, seed, noise_hu) + 1024).astype(np.uint16)  # Rescale Intercept −1024
    column_mm, row_mm = FIELD_OF_VIEW_MM / columns, FIELD_OF_VIEW_MM / rows
    z0 = -300.0
    head_first = list(reversed(range(n_slices)))  # InstanceNumber 1 is the most superior slice
    positions = np.array([[-FIELD_OF_VIEW_MM / 2 + column_mm / 2, -FIELD_OF_VIEW_MM / 2 + row_mm / 2,
                           z0 + k * slice_mm] for k in head_first])
    identity = SeriesIdentity(
        patient_id=PATIENT["PatientID"], patient_name=PATIENT["PatientName"], accession=ACCESSION,
        study_uid=generate_uid(), series_uid=generate_uid(), frame_of_reference_uid=generate_uid(),
        study_description="CT CHEST WITHOUT CONTRAST", series_description=f"Chest {slice_mm:g}mm", series_number=3,
        body_part="CHEST", model_name="Geometric CT")
    dates = {f"{kind}{part}": value for kind in ("Study", "Series", "Acquisition", "Content")
             for part, value in (("Date", STUDY_DATE), ("Time", STUDY_TIME))}
    scanner = {**dates, "PatientBirthDate": PATIENT["PatientBirthDate"], "PatientSex": PATIENT["PatientSex"],
               "Manufacturer": "Phantom Scanners", "InstitutionName": "Radnode Test Hospital",
               "ReferringPhysicianName": "Referrer^Rita", "SliceThickness": slice_mm, "KVP": 120,
               "RescaleIntercept": -1024, "RescaleSlope": 1, "RescaleType": "HU",
               "WindowCenter": -600, "WindowWidth": 1500}
    return write_image_series(stored[head_first], positions, (1, 0, 0, 0, 1, 0), (row_mm, column_mm), folder,
                              sop_class_uid=CT_IMAGE_STORAGE, modality="CT", image_type=["ORIGINAL", "PRIMARY", "AXIAL"],
                              identity=identity, modality_attributes=scanner, uid_root=PYDICOM_ROOT_UID,
                              file_name=lambda _, sop_uid: f"{sop_uid}.dcm")


def phantom_result(volume: Volume, algorithm_name: str = "radnode test phantom",
                   algorithm_version: str = "1.0") -> PipelineResult:
    """Segments (the true masks) and measurements computed from ``volume`` the way a pipeline would.

    Every structure gets its volume (mL) and mean attenuation (HU); lungs also the percentage of
    voxels below −950 HU.
    """
    masks = phantom_masks(*volume.shape)
    segments = [Segment(STRUCTURES[key], masks[key]) for key in STRUCTURES]
    measurements = []
    for segment in segments:
        key, mask = segment.structure.key, segment.mask
        values = volume.array[mask]
        measurements.append(Measurement(key, VOLUME, float(mask.sum()) * volume.voxel_volume_ml, MILLILITER))
        measurements.append(Measurement(key, ATTENUATION, float(values.mean()), HOUNSFIELD, MEAN))
        if key.startswith("lung_"):
            measurements.append(Measurement(key, LAA950, 100.0 * float((values < -950).mean()), PERCENT))
    return PipelineResult(segments, measurements, algorithm_name, algorithm_version)


def write_study(folder: Path, n: int = 3, patient_id: str = "P1", study_uid: str | None = None) -> list[Path]:
    """Write an ``n``-slice CT series (16×16 pixels, 2.5 mm apart) of one (new) study into ``folder``."""
    numbers = range(1, n + 1)
    pixels = np.stack([(np.arange(256, dtype=np.int16) * number).reshape(16, 16) for number in numbers])
    positions = np.array([[0.0, 0.0, 2.5 * number] for number in numbers])
    identity = SeriesIdentity(
        patient_id=patient_id, patient_name="Test^Patient", accession="", study_uid=study_uid or generate_uid(),
        series_uid=generate_uid(), frame_of_reference_uid=generate_uid(), study_description="CT test study",
        series_description="Axial 2.5mm", series_number=1, body_part="", model_name="Test CT")
    return write_image_series(pixels, positions, (1, 0, 0, 0, 1, 0), (1.0, 1.0), folder,
                              sop_class_uid=CT_IMAGE_STORAGE, modality="CT", image_type=["ORIGINAL", "PRIMARY", "AXIAL"],
                              identity=identity, modality_attributes={"SliceThickness": 2.5, "RescaleIntercept": 0,
                                                                      "RescaleSlope": 1},
                              uid_root=PYDICOM_ROOT_UID, file_name=lambda _, sop_uid: f"{sop_uid}.dcm")


PATIENT_BUNDLE = {"resourceType": "Bundle", "type": "transaction", "entry": [
    {"fullUrl": "urn:uuid:3f2504e0-4f89-11d3-9a0c-0305e82c3301",
     "resource": {"resourceType": "Patient", "identifier": [{"system": "urn:radnode:test", "value": "P1"}]},
     "request": {"method": "POST", "url": "Patient"}}]}
"""A small real transaction: the FHIR server stores one Patient per delivery, so deliveries can be counted."""


# --- job stores made by an earlier release -------------------------------------------------------

RELEASE_0_1_SCHEMA = (Path(__file__).parent / "data" / "job-store-0.1.sql").read_text()
"""The SQLite schema radnode 0.1 created (before schema revisions); frozen."""
RELEASE_0_1_INDEXES = """
CREATE INDEX IF NOT EXISTS instances_kept ON instances (job_id) WHERE purged_at IS NULL;
CREATE INDEX IF NOT EXISTS jobs_purging ON jobs (purge_started_at) WHERE purge_started_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_siblings ON jobs (sibling_of) WHERE sibling_of IS NOT NULL;
"""
"""The indexes 0.1 added on opening a store, after its added columns."""


def open_store_made_by(old_schema: str, path: Path, *statements: str) -> JobStore:
    """A job store written by an older schema, holding one done job (and whatever ``statements`` add), opened
    (and so migrated) by this version."""
    db = sqlite3.connect(path)
    db.executescript(old_schema)
    db.execute("INSERT INTO jobs (study_instance_uid, pipeline, state, created_at, last_instance_at, updated_at)"
               " VALUES ('1.2.3', 'ct_tissue', 'done', 0, 0, 0)")
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()
    return JobStore(path)


def restore_totalseg_dicom(reference: Path, target: Path, *, patient_id: str = "TS0001",
                           accession: str = "TSACC1") -> list[Path]:
    """Write the real TotalSegmentator CT series with the UIDs its distribution stripped put back.

    Study/Series/SOP Instance UIDs and SOP Class UID are empty in the shipped files (only the file
    meta keeps the SOP UIDs); a PACS would refuse them, so they are restored as a sender would have them.
    Every call makes a new study: fresh Study, Series and SOP Instance UIDs.
    """
    target.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    written = []
    for src in sorted((reference / "example_ct_dicom").iterdir()):
        ds = pydicom.dcmread(src)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientID, ds.PatientName, ds.AccessionNumber = patient_id, "Totalseg^Example", accession
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 2, ds.get("InstanceNumber") or len(written) + 1
        out = target / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(out, enforce_file_format=True)
        written.append(out)
    return written


LESION_SHAPE, LESION_SPACING, LESION_PATCH = (24, 48, 48), (3.0, 2.0, 2.0), (16, 32, 32)
"""The lesion CT's voxels ``[slice, row, column]``, its spacing (mm) and the tiny model's patch."""
TINY_NETWORK = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                "channels": [8, 16], "strides": [2], "num_res_units": 1, "dropout": 0.1}


def lesion_ct(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft tissue (40 HU) with one brighter ellipsoid 'lesion' (120 HU) at a random place, noise 25 HU."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in LESION_SHAPE], indexing="ij")
    centre = rng.uniform([8, 16, 16], [16, 32, 32])
    radii = rng.uniform([3, 6, 6], [5, 10, 10])
    truth = (((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
             + ((x - centre[2]) / radii[2]) ** 2) <= 1
    hu = np.where(truth, 120.0, 40.0) + rng.normal(0, 25, LESION_SHAPE)
    return hu.astype(np.float32), truth


def write_lesion_case(folder: Path, seed: int) -> Path:
    """``lesion_ct(seed)`` written as a CT series into ``folder``."""
    hu, truth = lesion_ct(seed)
    write_ct_series(CTPhantom(np.rint(hu).astype(np.int16), LESION_SPACING, {"lesion": truth}), folder)
    return folder


def _window(hu: np.ndarray) -> np.ndarray:
    return np.clip((hu + 100.0) / 400.0, 0, 1).astype(np.float32)  # the bundle's ScaleIntensityRanged


def train_tiny_unet(steps: int = 30) -> "UNet":
    """A small UNet trained for a few seconds on synthetic CT patches: good enough to segment them."""
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    network = UNet(**{k: v for k, v in TINY_NETWORK.items() if k != "_target_"})
    optimiser = torch.optim.Adam(network.parameters(), lr=2e-2)
    cases = [lesion_ct(seed) for seed in range(8)]
    for step in range(steps):
        hu, truth = cases[step % len(cases)]
        image = torch.from_numpy(_window(hu))[None, None]
        target = torch.from_numpy(truth.astype(np.int64))[None]
        loss = torch.nn.functional.cross_entropy(network(image), target, weight=torch.tensor([1.0, 3.0]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return network.eval()


def write_bundle(folder: Path, network: "torch.nn.Module") -> Path:
    """A MONAI bundle as the Model Zoo lays them out: metadata, inference config, state dict."""
    import torch

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    metadata = {
        "name": "tiny lesion", "version": "0.1.0",
        "network_data_format": {"inputs": {"image": {"type": "image", "num_channels": 1}},
                                "outputs": {"pred": {"type": "image", "num_channels": 2,
                                                     "channel_def": {"0": "background", "1": "lesion"}}}},
    }
    inference = {
        "network_def": TINY_NETWORK,
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "Spacingd", "keys": "image",
             "pixdim": [LESION_SPACING[2], LESION_SPACING[1], LESION_SPACING[0]]},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -100, "a_max": 300, "b_min": 0,
             "b_max": 1, "clip": True}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(LESION_PATCH), "sw_batch_size": 2},
    }
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    torch.save(network.state_dict(), folder / "models" / "model.pt")
    return folder


def job_ready_for_delivery(store: JobStore, calling_ae: str = "SCANNER", pipeline: str = "ct_tissue") -> int:
    """A job of a new one-instance study that has just finished its run (``running``): egress may stage it."""
    from radnode.node.store import Instance
    from radnode.pipelines.routing import SeriesDecision

    _, job_id = store.record_instance(
        Instance(generate_uid(), generate_uid(), generate_uid(), "P1", "CT", CT_IMAGE_STORAGE, "/spool/x.dcm",
                 calling_ae, "127.0.0.1:5000", "a1", 0.0), SeriesDecision((pipeline,)))
    store.queue_complete_studies(idle_seconds=1)
    store.start_job(job_id, "run")
    return job_id


def write_head_ct_study(nifti: Path, folder: Path, *, patient_id: str = "HEADCT01", patient_name: str = "Head^Real",
                        birth_date: str = "19580704", sex: str = "M", accession: str = "ACCHEAD01",
                        study_date: str = "20240611") -> list[Path]:
    """The real head CT of the dicom2stl distribution (conftest ``head_ct_nifti``) written as an axial CT Image
    Storage series, HU stored as signed 16-bit, with the patient's birth date and sex and the study date."""
    from pydicom.uid import CTImageStorage

    from radnode.imaging.mri import nifti_to_axial_volume

    volume = nifti_to_axial_volume(nifti, "CT")
    identity = SeriesIdentity(patient_id=patient_id, patient_name=patient_name, accession=accession,
                              study_uid=generate_uid(), series_uid=generate_uid(), frame_of_reference_uid=generate_uid(),
                              study_description="CT HEAD WITHOUT CONTRAST", series_description="Head 2.5 mm",
                              series_number=2, body_part="HEAD", model_name="dicom2stl example data")
    dates = {f"{kind}Date": study_date for kind in ("Study", "Series", "Acquisition", "Content")}
    return write_image_series(
        np.clip(np.rint(volume.array), -1024, 3071).astype(np.int16), volume.positions, volume.orientation,
        (volume.spacing[1], volume.spacing[2]), folder, sop_class_uid=CTImageStorage, modality="CT",
        image_type=["ORIGINAL", "PRIMARY", "AXIAL"], identity=identity, uid_root=PYDICOM_ROOT_UID,
        modality_attributes={**dates, "PatientBirthDate": birth_date, "PatientSex": sex,
                             "SliceThickness": f"{volume.spacing[0]:g}", "KVP": "120", "RescaleIntercept": "0",
                             "RescaleSlope": "1", "RescaleType": "HU"},
        file_name=lambda index, sop_uid: f"CT{index + 1:04d}.dcm")


# --- certificates for TLS tests (made fresh by each session; no key or certificate is committed) -----------

@dataclass(frozen=True)
class Pki:
    """A test CA with a server certificate (127.0.0.1/localhost), a client certificate it signed, and a client
    certificate from another CA (PEM files in ``folder``)."""

    folder: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _key_and_cert(folder: Path, name: str, subject: str, issuer: tuple | None, *, ca: bool = False,
                  server: bool = False, days: float = 2) -> tuple[Path, Path, object, object]:
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name_ = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name_)
               .issuer_name(issuer_cert.subject if issuer_cert else name_).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path, cert, key


def make_pki(folder: Path, days: float = 2) -> Pki:
    """A fresh test PKI in ``folder`` (see :class:`Pki`); the CA and server certificates valid for ``days``
    (``config check`` warns for one expiring within 30)."""
    folder.mkdir(parents=True, exist_ok=True)
    _, ca_path, ca_cert, ca_key = _key_and_cert(folder, "ca", "radnode test CA", None, ca=True, days=days)
    server_key, server_cert, _, _ = _key_and_cert(folder, "server", "radnode", (ca_cert, ca_key), server=True,
                                                  days=days)
    client_key, client_cert, _, _ = _key_and_cert(folder, "client", "CT01", (ca_cert, ca_key))
    _, _, other_cert, other_key = _key_and_cert(folder, "other-ca", "some other CA", None, ca=True)
    rogue_key, rogue_cert, _, _ = _key_and_cert(folder, "rogue", "STRANGER", (other_cert, other_key))
    return Pki(folder, ca_path, server_cert, server_key, client_cert, client_key, rogue_cert, rogue_key)
def _source_in_order(source: list[Path]) -> list[pydicom.Dataset]:
    """A single-frame series' datasets sorted along the slice normal (the array order of its volume)."""
    datasets = [pydicom.dcmread(p) for p in source]
    normal = np.cross(*np.reshape(np.asarray(datasets[0].ImageOrientationPatient, float), (2, 3)))
    return sorted(datasets, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))


def seg_masks_by_source(seg_path: Path, source: list[Path]) -> dict[int, np.ndarray]:
    """Each segment of a BINARY SEG as a boolean (slices, rows, columns) mask on its source series, slices in
    order along the normal: read frame by frame with pydicom and numpy (each frame's referenced segment and
    source instance), not with highdicom's reader, so a test can check the node's reading."""
    seg = pydicom.dcmread(seg_path)
    order = {str(ds.SOPInstanceUID): k for k, ds in enumerate(_source_in_order(source))}
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns)).astype(bool)
    masks = {int(item.SegmentNumber): np.zeros((len(order), int(seg.Rows), int(seg.Columns)), bool)
             for item in seg.SegmentSequence}
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        masks[number][order[uid]] |= frame
    return masks


def write_correction(result_seg: Path, source: list[Path], target: Path, changes: dict[str, int], *,
                     manufacturer: str = "3D Slicer", frame_of_reference_uid: str | None = None) -> dict[int, np.ndarray]:
    """A radiologist's correction of ``result_seg`` as a new SEG from another creator (highdicom, MANUAL
    segments with the same coded categories, property types and modifiers), saved at ``target``.

    ``changes``: per Segment Label, voxels of 3-D erosion (negative) or dilation (positive); other segments
    are kept as they were. Returns the corrected masks by segment number, in source slice order."""
    import highdicom as hd

    result = pydicom.dcmread(result_seg)
    images = _source_in_order(source)
    masks = seg_masks_by_source(result_seg, source)
    descriptions, corrected = [], {}
    for item in result.SegmentSequence:
        number, label = int(item.SegmentNumber), str(item.SegmentLabel)
        mask, change = masks[number], changes.get(label, 0)
        if change < 0:
            mask = ndimage.binary_erosion(mask, iterations=-change)
        elif change > 0:
            mask = ndimage.binary_dilation(mask, iterations=change)
        corrected[number] = mask
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=CodedConcept.from_dataset(item.SegmentedPropertyCategoryCodeSequence[0]),
            segmented_property_type=CodedConcept.from_dataset(kind),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        if "SegmentedPropertyTypeModifierCodeSequence" in kind:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                CodedConcept.from_dataset(m) for m in kind.SegmentedPropertyTypeModifierCodeSequence]
        descriptions.append(description)
    if frame_of_reference_uid is not None:
        for image in images:
            image.FrameOfReferenceUID = frame_of_reference_uid
    seg = hd.seg.Segmentation(
        source_images=images, pixel_array=np.stack([corrected[d.SegmentNumber] for d in descriptions], axis=-1),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=generate_uid(), series_number=1001, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=manufacturer, manufacturer_model_name="Segment Editor", software_versions="5.6",
        device_serial_number="WS-07", series_description="corrected segmentation", omit_empty_frames=True)
    seg.save_as(target)
    return corrected
@dataclass(frozen=True)
class Malformed:
    """One file of the malformed-input corpus: what it is and the word a refusal must name (the attribute)."""

    name: str
    path: Path
    names: str
    """What the refusal must mention: the attribute at fault, or what cannot be read ("nested", "data set");
    empty for a truncated file, whose refusal names whichever attribute the cut falls in."""


def _nested_sequences(depth: int) -> bytes:
    """(0040,0275) Request Attributes Sequence nested ``depth`` deep, undefined lengths, Explicit VR LE."""
    sq = b"\x40\x00\x75\x02SQ\x00\x00\xff\xff\xff\xff"
    item, item_end, seq_end = b"\xfe\xff\x00\xe0\xff\xff\xff\xff", b"\xfe\xff\x0d\xe0\x00\x00\x00\x00", \
        b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return (sq + item) * depth + (item_end + seq_end) * depth


def write_malformed_corpus(folder: Path) -> list[Malformed]:
    """At least 75 instances a careless or hostile sender could send, each built from a valid CT slice.

    Implausible headers (rescale, spacing, geometry, frame size), unsafe or ambiguous UIDs (a backslash, a
    newline, a path, too long), and files that cannot be parsed (truncated at many points, sequences nested
    3000 deep, a bad deflate stream, lengths past the end). Each is its own study.
    """
    folder.mkdir(parents=True, exist_ok=True)
    corpus: list[Malformed] = []

    def variant(name: str, names: str, change: Callable[[pydicom.Dataset], None]) -> None:
        (source,) = write_study(folder / ".source" / name, n=1)
        ds = pydicom.dcmread(source)
        change(ds)
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=False)
        corpus.append(Malformed(name, path, names))

    def setter(**values: object) -> Callable[[pydicom.Dataset], None]:
        def change(ds: pydicom.Dataset) -> None:
            for keyword, value in values.items():
                setattr(ds, keyword, value)
        return change

    for value in ("1e30", "-1e30", "0", "1e-12", "NaN", "inf", "-inf", "2e4", "1e5"):
        variant(f"slope-{value}", "RescaleSlope", setter(RescaleSlope=value))
    for value in ("1e9", "-1e9", "NaN", "inf", "5e5"):
        variant(f"intercept-{value}", "RescaleIntercept", setter(RescaleIntercept=value))
    for value in (["0", "0"], ["0", "1"], ["1", "0"], ["NaN", "1"], ["1", "NaN"], ["-1", "1"], ["inf", "1"],
                  ["1e6", "1"], ["1"], ["1", "1", "1"]):
        variant("spacing-" + "-".join(value), "PixelSpacing", setter(PixelSpacing=value))
    for value in ("NaN", "-5", "inf"):
        variant(f"thickness-{value}", "SliceThickness", setter(SliceThickness=value))
    for value in (["NaN", "0", "0"], ["0", "0"], ["inf", "0", "0"]):
        variant("position-" + "-".join(value), "ImagePositionPatient", setter(ImagePositionPatient=value))
    for value in (["0", "0", "0", "0", "0", "0"], ["NaN", "0", "0", "0", "1", "0"], ["1", "0", "0", "1", "0", "0"],
                  ["1", "0", "0", "0", "1"], ["2", "0", "0", "0", "2", "0"]):
        variant("orientation-" + "-".join(value), "ImageOrientationPatient", setter(ImageOrientationPatient=value))
    for rows, columns in ((65535, 65535), (65535, 16), (16, 65535), (0, 16), (16, 0), (4096, 4096)):
        variant(f"size-{rows}x{columns}", "Rows" if rows != 16 else "Columns", setter(Rows=rows, Columns=columns))
    variant("frames-0", "NumberOfFrames", setter(NumberOfFrames=0))
    variant("frames-huge", "NumberOfFrames", setter(NumberOfFrames=100000, Rows=512, Columns=512))
    variant("bits-12", "BitsAllocated", setter(BitsAllocated=12))
    variant("samples-2", "SamplesPerPixel", setter(SamplesPerPixel=2))

    def uid_change(keyword: str, value: str) -> Callable[[pydicom.Dataset], None]:
        def change(ds: pydicom.Dataset) -> None:
            setattr(ds, keyword, value)
            if keyword == "SOPInstanceUID" and "\n" in value:  # the C-STORE request carries it too
                ds.file_meta.MediaStorageSOPInstanceUID = value
        return change

    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        short = keyword.removesuffix("InstanceUID")
        variant(f"{short}-backslash", keyword, uid_change(keyword, "1.2.3\\4.5"))
        variant(f"{short}-newline", keyword, uid_change(keyword, "1.2.3\n2026-12-01 INFO radnode: forged"))
        variant(f"{short}-path", keyword, uid_change(keyword, "../../etc"))
        variant(f"{short}-long", keyword, uid_change(keyword, "1." + "2" * 80))
        variant(f"{short}-empty", keyword, uid_change(keyword, ""))
        variant(f"{short}-slash", keyword, uid_change(keyword, "1.2/3"))

    (source,) = write_study(folder / ".source" / "truncate", n=1)
    whole = source.read_bytes()
    # Cut in the file meta, in the header (before Rows: 1000) and in the pixel data; a cut between the header and
    # the pixel data leaves a header-only instance, which is parseable: ingest keeps it, the pipeline refuses it.
    for cut in (300, 350, 400, 500, 600, 700, 800, 1000, len(whole) - 400, len(whole) - 300, len(whole) - 100,
                len(whole) - 1):
        path = folder / f"truncated-{cut}.dcm"
        path.write_bytes(whole[:cut])
        corpus.append(Malformed(f"truncated-{cut}", path, ""))  # whichever attribute the cut falls in

    def raw(name: str, names: str, body: bytes, transfer_syntax: str = "1.2.840.10008.1.2.1") -> None:
        (source,) = write_study(folder / ".source" / name, n=1)
        ds = pydicom.dcmread(source)
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        meta = BytesIO()
        pydicom.filewriter.write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
        path = folder / f"{name}.dcm"
        path.write_bytes(b"\x00" * 128 + b"DICM" + meta.getvalue() + body)
        corpus.append(Malformed(name, path, names))

    (source,) = write_study(folder / ".source" / "nested", n=1)
    plain = pydicom.dcmread(source)
    del plain.PixelData
    dataset_bytes = BytesIO()
    pydicom.filewriter.write_dataset(pydicom.filebase.DicomFileLike(dataset_bytes), plain)
    raw("nested-3000", "nested", dataset_bytes.getvalue() + _nested_sequences(3000))
    raw("nested-100000", "nested", dataset_bytes.getvalue() + _nested_sequences(100000))
    raw("deflate-garbage", "data set", b"\x78\x9c" + bytes(range(256)) * 4, "1.2.840.10008.1.2.1.99")
    raw("deflate-truncated", "data set", zlib.compress(dataset_bytes.getvalue())[:-40], "1.2.840.10008.1.2.1.99")
    raw("length-past-end", "PixelData", dataset_bytes.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00\xff\xff\xff\x7f\x00")
    raw("garbage", "", bytes(range(256)) * 8)
    raw("pixel-data-short", "PixelData", dataset_bytes.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00\x64\x00\x00\x00"
        + b"\x00" * 100)
    raw("empty-body", "StudyInstanceUID", b"")
    return corpus


def queued_job(store: JobStore, pipeline: str = "ct_tissue") -> int:
    """A job of a new one-instance study, queued (its study complete), not yet started or dispatched."""
    from radnode.node.store import Instance
    from radnode.pipelines.routing import SeriesDecision

    _, job_id = store.record_instance(
        Instance(generate_uid(), generate_uid(), generate_uid(), "P1", "CT", CT_IMAGE_STORAGE, "/spool/x.dcm",
                 "SCANNER", "127.0.0.1:5000", "a1", 0.0), SeriesDecision((pipeline,)))
    store.queue_complete_studies(idle_seconds=1)
    return job_id


def study_version_job(store: JobStore, sop: str, study_uid: str = "1.2.3", pipeline: str = "ct_tissue") -> int:
    """A started (``running``) job of ``study_uid`` made by instance ``sop``, late instances re-running the whole
    study: called again once the first job's results are staged, it makes the re-run whose results supersede them."""
    from radnode.node.store import Instance
    from radnode.pipelines.routing import Completeness, LateInstances, SeriesDecision

    decision = SeriesDecision((pipeline,), completeness=Completeness(late_instances=LateInstances.RERUN))
    _, job_id = store.record_instance(Instance(sop, study_uid, f"{study_uid}.1", "P1", "CT", CT_IMAGE_STORAGE,
                                               f"/spool/{sop}", "SCANNER", "127.0.0.1:5000", "a1", time.time()),
                                      decision)
    store.queue_job(job_id, "idle")
    assert store.start_job(job_id, "run"), store.job(job_id)
    return job_id


def egress_test_config(tmp_path: Path, destinations: dict, **sections: object) -> Config:
    """A node configuration (data in ``tmp_path/data``) delivering to ``destinations``, retrying fast (0.1 to 0.4 s,
    30 attempts, 5 s timeouts) so a test never waits long; ``sections``: other top-level sections of it."""
    timeouts = {"connect_seconds": 5, "acse_seconds": 5, "dimse_seconds": 5, "network_seconds": 5}
    egress = {"retry_initial_seconds": 0.1, "retry_max_seconds": 0.4, "max_attempts": 30, "timeouts": timeouts,
              "destinations": destinations}
    return Config.model_validate({"data_dir": str(tmp_path / "data"), "egress": egress, **sections})


def write_results(folder: Path, bundle: dict | None = None, report_sr: bool = False) -> list[str]:
    """A run's output folder: two DICOM objects (the first named ``report-sr.dcm`` with ``report_sr``) and
    ``bundle`` as ``fhir-bundle.json``; returns the objects' SOP Instance UIDs."""
    files = write_study(folder, n=2)
    if report_sr:
        files[0] = files[0].rename(folder / "report-sr.dcm")
    if bundle is not None:
        (folder / "fhir-bundle.json").write_text(json.dumps(bundle))
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]


def deliver_results_and_a_pdf(egress: "Egress", store: JobStore, job_id: int, folder: Path) -> tuple[set[str], str]:
    """Stage and deliver job ``job_id``'s results: two DICOM objects (``report-sr.dcm`` among them) for every
    destination and an Encapsulated PDF of the same study (``report-pdf.dcm``, taken only by the destinations set
    to ``encapsulated_pdf``); returns the two objects' SOP Instance UIDs and the PDF's."""
    both = set(write_results(folder, report_sr=True))
    study = pydicom.dcmread(folder / "report-sr.dcm", stop_before_pixels=True).StudyInstanceUID
    (pdf,) = write_study(folder.with_name(folder.name + "-pdf"), n=1, study_uid=study)
    pdf_uid = str(pydicom.dcmread(pdf, stop_before_pixels=True).SOPInstanceUID)
    pdf.rename(folder / "report-pdf.dcm")
    egress.stage(job_id, folder)
    wait_until(lambda: egress.deliver_due() or store.job(job_id).state is JobState.DONE)
    return both, pdf_uid


def rejected_uids(note: pydicom.Dataset) -> set[str]:
    """The SOP Instance UIDs an IOCM rejection note (a KOS) references in its Current Requested Procedure Evidence."""
    return {str(instance.ReferencedSOPInstanceUID) for study in note.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for instance in series.ReferencedSOPSequence}


def selected_uids(note: pydicom.Dataset) -> set[str]:
    """The SOP Instance UIDs a KOS's content tree selects (its IMAGE / COMPOSITE items' Referenced SOP Sequence)."""
    return {str(reference.ReferencedSOPInstanceUID) for item in note.ContentSequence
            for reference in item.get("ReferencedSOPSequence") or []}


def write_ct_studies(root: Path, patients: Iterable[str], n_slices: int = 16) -> dict[str, Path]:
    """One small chest phantom CT study per patient ID (own study, series and instance UIDs), each in its own
    folder under ``root``: patient ID → folder."""
    folders = {}
    for index, patient in enumerate(patients):
        folder = root / patient
        files = write_chest_phantom(folder, n_slices=n_slices, seed=index)
        for path in files:
            ds = pydicom.dcmread(path)
            ds.PatientID = patient
            ds.save_as(path)
        folders[patient] = folder
    return folders


def independent_agreement(result: np.ndarray, corrected: np.ndarray,
                          spacing: tuple[float, float, float]) -> dict[str, float]:
    """Dice, volumes (mL) and the symmetric 95th-percentile distance between the masks' surface voxels (a
    voxel of the mask with a background neighbour across a face), computed with numpy and scipy."""
    voxel_ml = float(np.prod(spacing)) / 1000

    def surface(mask: np.ndarray) -> np.ndarray:
        return mask & ~ndimage.binary_erosion(mask)

    def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return ndimage.distance_transform_edt(~surface(b), sampling=spacing)[surface(a)]

    both = np.count_nonzero(result & corrected)
    hd95 = max(np.percentile(distances(result, corrected), 95), np.percentile(distances(corrected, result), 95))
    return {"dice": 2 * both / (np.count_nonzero(result) + np.count_nonzero(corrected)),
            "result_volume_ml": np.count_nonzero(result) * voxel_ml,
            "corrected_volume_ml": np.count_nonzero(corrected) * voxel_ml, "hd95_mm": float(hd95)}


def spacing_of(source: list[Path]) -> tuple[float, float, float]:
    """(slice, row, column) spacing of a phantom series, from its headers."""
    first, *_ = (pydicom.dcmread(p, stop_before_pixels=True) for p in source)
    rows, columns = (float(v) for v in first.PixelSpacing)
    return float(first.SliceThickness), rows, columns


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of the ``/metrics`` sample ``name`` with ``labels``, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{name} {labels} not in /metrics")
