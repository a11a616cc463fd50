"""Ingress over real associations: DCMTK echoscu/storescu against the node's Storage SCP on loopback."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from factories import write_study
from radnode.config import IngressConfig
from radnode.node.scp import Ingest, Spool, StorageSCP
from radnode.node.store import JobStore
from support.dicom_tools import ECHOSCU, storescu

@pytest.fixture
def scp(tmp_path: Path) -> Iterator[tuple[StorageSCP, JobStore, Spool]]:
    """The node's Storage SCP alone, on a free port, over a fresh spool and store."""
    store = JobStore(tmp_path / "data" / "radnode.db")
    spool = Spool(tmp_path / "data" / "spool")
    server = StorageSCP(IngressConfig(host="127.0.0.1", port=0), Ingest(spool, store))
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
    ingest = Ingest(spool, store)
    assert spool.discard_partial() == 1
    assert ingest.reindex() == 1
    assert ingest.reindex() == 0
    assert store.has_instance(ds.SOPInstanceUID)
    store.close()
