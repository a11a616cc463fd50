"""Where distributed jobs keep their inputs and outputs: a shared folder, or S3 (moto's real HTTP server).
Both kinds pass the same tests: input once per job, outputs whole or not at all."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from radnode.config import parse_config
from radnode.node.engine.storage import COMPLETE, S3Storage, SharedDirStorage, Storage, StorageError, open_storage


@pytest.fixture(params=["shared_dir", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "shared_dir":
        return SharedDirStorage(tmp_path / "shared")
    endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
    return S3Storage(bucket, endpoint, "us-east-1", "site")


def _folder(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def test_inputs_go_up_once_and_come_back_whole(storage: Storage, tmp_path: Path) -> None:
    storage.check()
    assert not storage.has_inputs(7)
    storage.put_inputs(7, _folder(tmp_path / "a", {"1.dcm": b"one", "2.dcm": b"two"}))
    storage.put_inputs(7, _folder(tmp_path / "b", {"other.dcm": b"later"}))  # a second upload keeps the first
    assert storage.has_inputs(7)
    storage.get_inputs(7, tmp_path / "got")
    assert {p.name: p.read_bytes() for p in (tmp_path / "got").iterdir()} == {"1.dcm": b"one", "2.dcm": b"two"}


def test_outputs_are_per_attempt_and_missing_ones_are_refused(storage: Storage, tmp_path: Path) -> None:
    storage.put_outputs(3, 1, _folder(tmp_path / "o1", {"seg.dcm": b"S1", "manifest.json": b"{}"}))
    storage.put_outputs(3, 2, _folder(tmp_path / "o2", {"seg.dcm": b"S2"}))
    storage.get_outputs(3, 2, tmp_path / "got")
    assert {p.name: p.read_bytes() for p in (tmp_path / "got").iterdir()} == {"seg.dcm": b"S2"}
    with pytest.raises(StorageError, match="job 3 attempt 5"):
        storage.get_outputs(3, 5, tmp_path / "none")


def test_s3_outputs_without_their_marker_are_never_taken(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    """An upload cut off before its completion marker (the worker died between files) does not exist for the
    reader, however many of its files are there."""
    storage = S3Storage(s3_bucket, s3_endpoint, "us-east-1", "site")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.put_object(Bucket=s3_bucket, Key="site/jobs/9/attempt-1/out/files/seg.dcm", Body=b"half")
    with pytest.raises(StorageError, match="not complete"):
        storage.get_outputs(9, 1, tmp_path / "got")
    storage.put_outputs(9, 1, _folder(tmp_path / "o", {"seg.dcm": b"whole"}))
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="site/jobs/9/")["Contents"]}
    assert f"site/jobs/9/attempt-1/out/{COMPLETE}" in keys
    storage.get_outputs(9, 1, tmp_path / "got")
    assert (tmp_path / "got" / "seg.dcm").read_bytes() == b"whole"


def test_a_shared_folder_that_is_not_writable_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    config = parse_config({"data_dir": str(tmp_path), "storage": {"path": str(tmp_path / "a-file" / "shared")}})
    with pytest.raises(StorageError) as refused:
        open_storage(config).check()
    assert "is not writable" in str(refused.value) and "\n" not in str(refused.value)


def test_a_bucket_that_does_not_exist_is_refused_in_one_line(s3_endpoint: str) -> None:
    with pytest.raises(StorageError) as refused:
        S3Storage("no-such-bucket", s3_endpoint, "us-east-1", "site").check()
    assert "s3://no-such-bucket" in str(refused.value) and "NoSuchBucket" in str(refused.value)
