"""Ingress over real associations: DCMTK echoscu/storescu against the node's Storage SCP on loopback.

Also holds the helpers the node tests share: small CT series on disk and sending them with storescu.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from radnode.config import IngressConfig
from radnode.node.scp import Ingest, Spool, StorageSCP
from radnode.node.store import JobStore

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"


def ct_slice(study_uid: str, series_uid: str, number: int, patient_id: str = "P1") -> Dataset:
    """A small but complete CT image (16×16 pixels)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.PatientID, ds.PatientName, ds.Modality = patient_id, "Test^Patient", "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0, 0, 2.5 * number]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [1, 1], 2.5
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.PixelData = (np.arange(256, dtype=np.int16) * number).tobytes()
    return ds


def write_study(folder: Path, n: int = 3, patient_id: str = "P1", study_uid: str | None = None) -> list[Path]:
    """Write an ``n``-slice CT series of one (new) study into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = study_uid or generate_uid(), generate_uid()
    paths = []
    for number in range(1, n + 1):
        ds = ct_slice(study_uid, series_uid, number, patient_id)
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(port: int, *inputs: Path, calling_ae: str = "MODALITY", called_ae: str = "RADNODE",
             options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Send files or folders with DCMTK's storescu (verbose, so each response status is in the output)."""
    argv = [STORESCU, "-v", "-aet", calling_ae, "-aec", called_ae, *options, "+sd", "+r", "127.0.0.1", str(port),
            *map(str, inputs)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[tuple[StorageSCP, JobStore, Spool]]:
    """The node's Storage SCP alone, on a free port, over a fresh spool and store."""
    store = JobStore(tmp_path / "data" / "radnode.db")
    spool = Spool(tmp_path / "data" / "spool")
    server = StorageSCP(IngressConfig(host="127.0.0.1", port=0), Ingest(spool, store, "ct_tissue"))
    server.start()
    yield server, store, spool
    server.stop()
    store.close()


def test_echo(scp: tuple[StorageSCP, JobStore, Spool]) -> None:
    server, _, _ = scp
    result = subprocess.run([ECHOSCU, "-aec", "RADNODE", "127.0.0.1", str(server.port)], capture_output=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr


def test_store_spools_and_indexes_with_sender(scp: tuple[StorageSCP, JobStore, Spool], tmp_path: Path) -> None:
    server, store, spool = scp
    sent = write_study(tmp_path / "study", n=4)
    result = storescu(server.port, tmp_path / "study", calling_ae="CT_SCANNER")
    assert result.returncode == 0, result.stdout + result.stderr
    (job,) = store.jobs()
    assert job.instances == 4 and job.calling_ae == "CT_SCANNER" and job.peer_address.startswith("127.0.0.1:")
    for path in sent:
        original = pydicom.dcmread(path)
        stored = spool.path_for(original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
        copy = pydicom.dcmread(stored)
        assert copy == original
        assert copy.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    (first,) = [i for i in store.instances(job.id) if i.sop_instance_uid == pydicom.dcmread(sent[0]).SOPInstanceUID]
    assert first.association_id and first.modality == "CT" and first.patient_id == "P1"
    assert not list(spool.incoming.iterdir())


def test_compressed_instances_are_kept_as_sent(scp: tuple[StorageSCP, JobStore, Spool], real_ct_folder: Path) -> None:
    """The real JPEG 2000 series arrives and is spooled still compressed, fragments byte for byte."""
    server, store, spool = scp
    result = storescu(server.port, real_ct_folder, options=("-xv",))
    assert result.returncode == 0, result.stdout + result.stderr
    sent = sorted(real_ct_folder.iterdir())
    (job,) = store.jobs()
    assert job.instances == len(sent) == 20
    for path in sent:
        original = pydicom.dcmread(path)
        stored = pydicom.dcmread(spool.path_for(original.StudyInstanceUID, original.SeriesInstanceUID,
                                                original.SOPInstanceUID))
        assert stored.file_meta.TransferSyntaxUID == JPEG2000Lossless
        assert stored.PixelData == original.PixelData


def test_instance_without_uids_is_refused_others_kept(scp: tuple[StorageSCP, JobStore, Spool],
                                                      tmp_path: Path) -> None:
    server, store, spool = scp
    good = write_study(tmp_path / "study", n=2)
    bad = pydicom.dcmread(good[0])
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del bad.StudyInstanceUID
    bad.save_as(tmp_path / "study" / "no-study-uid.dcm")
    # --no-halt: storescu would otherwise stop at the refusal, and which file comes first varies
    result = storescu(server.port, tmp_path / "study", options=("--no-halt",))
    assert "Received Store Response (Error: CannotUnderstand)" in result.stderr, result.stderr
    (job,) = store.jobs()
    assert job.instances == 2, result.stderr
    assert len(list(spool.files())) == 2
    assert not store.has_instance(bad.SOPInstanceUID)


def test_duplicate_instance_is_kept_once_and_recorded(scp: tuple[StorageSCP, JobStore, Spool],
                                                      tmp_path: Path) -> None:
    server, store, spool = scp
    write_study(tmp_path / "study", n=2)
    for _ in range(2):
        result = storescu(server.port, tmp_path / "study")
        assert result.returncode == 0, result.stdout + result.stderr
    (job,) = store.jobs()
    assert job.instances == 2
    assert len(list(spool.files())) == 2
    assert [e.kind for e in store.events(job.id)].count("duplicate") == 2


def test_reindex_finds_spool_files_missing_from_the_store(tmp_path: Path) -> None:
    """A file renamed into the spool just before a crash (never indexed) is indexed at the next start."""
    store = JobStore(tmp_path / "radnode.db")
    spool = Spool(tmp_path / "spool")
    (path,) = write_study(tmp_path / "study", n=1)
    ds = pydicom.dcmread(path)
    target = spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    target.parent.mkdir(parents=True)
    shutil.copyfile(path, target)
    (spool.incoming / "interrupted.part").write_bytes(b"half a file")
    ingest = Ingest(spool, store, "ct_tissue")
    assert spool.discard_partial() == 1
    assert ingest.reindex() == 1
    assert ingest.reindex() == 0
    assert store.has_instance(ds.SOPInstanceUID)
    store.close()
