"""Where a distributed job's inputs and outputs live, so that every host reaches them (``storage:``).

``shared_dir``: a folder every host mounts (NFS in production); ``s3``: an S3-compatible object store (boto3),
so a worker host needs no shared file system. The layout is the same in both::

    jobs/<job_id>/in-<dispatch>/<file>        the job's input as it was dispatched (message <dispatch>)
    jobs/<job_id>/attempt-<n>/out/<file>       what attempt n wrote

The input is uploaded once per dispatch, not per job: a job dispatched again after its study got late
instances (or an operator's retry) runs on its input as it is then, never on the first upload.

Nothing half-written is ever taken for whole: a folder is written under a temporary name and renamed
(``shared_dir``), or its files are listed in a completion marker written last (``s3``); the reader takes only
what the marker (or the renamed folder) holds, and a set without one does not exist for it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Protocol

from radnode.config import Config

COMPLETE = "complete.json"
"""The marker written last under a set of files in S3: the list of the set's files and their sizes."""


class StorageError(RuntimeError):
    """The storage cannot be used (not writable, unreachable, a set incomplete); ``str()`` is one line."""


class Storage(Protocol):
    """Inputs and outputs of distributed jobs (see the module docstring)."""

    label: str

    def check(self) -> None:
        """Write, read and remove a probe; StorageError with one line when the storage is not usable."""

    def has_inputs(self, job_id: int, dispatch: int) -> bool: ...

    def put_inputs(self, job_id: int, dispatch: int, folder: Path) -> None:
        """Upload a job's input folder for its dispatch ``dispatch`` (once: a later call keeps the first)."""

    def get_inputs(self, job_id: int, dispatch: int, target: Path) -> None:
        """The job's input as dispatch ``dispatch`` has it into ``target`` (an empty folder)."""

    def put_outputs(self, job_id: int, attempt: int, folder: Path) -> None:
        """An attempt's output folder, whole or not at all."""

    def get_outputs(self, job_id: int, attempt: int, target: Path) -> None:
        """An attempt's outputs into ``target``; StorageError when they are not (completely) there."""


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed there
        shutil.copyfile(source, target)


class SharedDirStorage:
    """A folder every host mounts (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.label = f"shared folder {root}"

    def check(self) -> None:
        probe = self.root / f".probe-{uuid.uuid4().hex}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"radnode")
            probe.unlink()
        except OSError as e:
            raise StorageError(f"storage {self.label} is not writable: {e.strerror or e}") from None

    def _inputs(self, job_id: int, dispatch: int) -> Path:
        return self.root / "jobs" / str(job_id) / f"in-{dispatch}"

    def _outputs(self, job_id: int, attempt: int) -> Path:
        return self.root / "jobs" / str(job_id) / f"attempt-{attempt}" / "out"

    def has_inputs(self, job_id: int, dispatch: int) -> bool:
        return self._inputs(job_id, dispatch).is_dir()

    def _publish(self, folder: Path, target: Path) -> None:
        """Copy ``folder`` to ``target`` under a temporary name, fsync'd, then rename it into place."""
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
        for file in _files(folder):
            copy = staging / file.relative_to(folder)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, copy)
            with open(copy, "rb") as f:
                os.fsync(f.fileno())
        staging.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, target)
        except OSError:  # another host (or attempt) put it there first: theirs stands
            shutil.rmtree(staging, ignore_errors=True)
            if not target.is_dir():
                raise

    def put_inputs(self, job_id: int, dispatch: int, folder: Path) -> None:
        if not self.has_inputs(job_id, dispatch):
            self._inputs(job_id, dispatch).parent.mkdir(parents=True, exist_ok=True)
            self._publish(folder, self._inputs(job_id, dispatch))

    def get_inputs(self, job_id: int, dispatch: int, target: Path) -> None:
        source = self._inputs(job_id, dispatch)
        if not source.is_dir():
            raise StorageError(f"storage {self.label}: job {job_id}'s input of dispatch {dispatch} is missing")
        for file in _files(source):
            _link_or_copy(file, target / file.relative_to(source))

    def put_outputs(self, job_id: int, attempt: int, folder: Path) -> None:
        target = self._outputs(job_id, attempt)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)  # a previous try of this very attempt that did not report
        self._publish(folder, target)

    def get_outputs(self, job_id: int, attempt: int, target: Path) -> None:
        source = self._outputs(job_id, attempt)
        if not source.is_dir():
            raise StorageError(f"storage {self.label}: job {job_id} attempt {attempt} has no complete outputs")
        for file in _files(source):
            copy = target / file.relative_to(source)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, copy)


class S3Storage:
    """An S3-compatible bucket (see the module docstring); credentials the standard AWS way."""

    def __init__(self, bucket: str, endpoint: str | None, region: str, prefix: str) -> None:
        import boto3
        from botocore.config import Config as BotoConfig

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.label = f"s3://{bucket}/{self.prefix}" + (f" at {endpoint}" if endpoint else "")
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name=region,
                                   config=BotoConfig(connect_timeout=5, read_timeout=60,
                                                     retries={"max_attempts": 3, "mode": "standard"}))

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _error(self, e: Exception) -> StorageError:
        return StorageError(f"storage {self.label}: {' '.join(str(e).split())}")

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        key = self._key(f".probe-{uuid.uuid4().hex}")
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=b"radnode")
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as e:
            raise StorageError(f"storage {self.label} is not writable: {' '.join(str(e).split())}") from None

    def _marker(self, base: str) -> dict[str, int] | None:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=f"{base}/{COMPLETE}")["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._error(e) from None
        return json.loads(body)["files"]

    def _put_set(self, folder: Path, base: str) -> None:
        """Upload every file, then the marker that lists them (the set exists from then on)."""
        from botocore.exceptions import BotoCoreError, ClientError

        files = {}
        try:
            for file in _files(folder):
                name = file.relative_to(folder).as_posix()
                self.client.upload_file(str(file), self.bucket, f"{base}/files/{name}")
                files[name] = file.stat().st_size
            self.client.put_object(Bucket=self.bucket, Key=f"{base}/{COMPLETE}",
                                   Body=json.dumps({"files": files}).encode())
        except (BotoCoreError, ClientError) as e:
            raise self._error(e) from None

    def _get_set(self, base: str, target: Path, what: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        files = self._marker(base)
        if files is None:
            raise StorageError(f"storage {self.label}: {what} is not complete there")
        try:
            for name, size in files.items():
                path = target / name
                path.parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(self.bucket, f"{base}/files/{name}", str(path))
                if path.stat().st_size != size:
                    raise StorageError(f"storage {self.label}: {what}: {name} has {path.stat().st_size} bytes, "
                                       f"the marker says {size}")
        except (BotoCoreError, ClientError) as e:
            raise self._error(e) from None

    def has_inputs(self, job_id: int, dispatch: int) -> bool:
        return self._marker(self._key("jobs", str(job_id), f"in-{dispatch}")) is not None

    def put_inputs(self, job_id: int, dispatch: int, folder: Path) -> None:
        if not self.has_inputs(job_id, dispatch):
            self._put_set(folder, self._key("jobs", str(job_id), f"in-{dispatch}"))

    def get_inputs(self, job_id: int, dispatch: int, target: Path) -> None:
        self._get_set(self._key("jobs", str(job_id), f"in-{dispatch}"), target,
                      f"job {job_id}'s input of dispatch {dispatch}")

    def put_outputs(self, job_id: int, attempt: int, folder: Path) -> None:
        self._put_set(folder, self._key("jobs", str(job_id), f"attempt-{attempt}", "out"))

    def get_outputs(self, job_id: int, attempt: int, target: Path) -> None:
        self._get_set(self._key("jobs", str(job_id), f"attempt-{attempt}", "out"), target,
                      f"job {job_id} attempt {attempt}'s outputs")


def open_storage(config: Config) -> Storage:
    """The configured storage (``storage.kind``); a shared folder defaults to ``data_dir/shared``."""
    settings = config.storage
    if settings.kind == "s3":
        assert settings.bucket is not None
        return S3Storage(settings.bucket, settings.endpoint, settings.region, settings.prefix)
    return SharedDirStorage((settings.path or config.data_dir / "shared").resolve())
