"""Shared fixtures: real reference data (fetched from PyPI packages, never from elsewhere), the tiny model,
the job command stand-in and the real peers (DCMTK storescp as the PACS, a sekmet FHIR R4 server as the EHR).

Data builders are in ``factories.py``, other shared utilities in ``support/``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from factories import restore_totalseg_dicom, train_tiny_unet, write_bundle
from radnode.peers import FhirServer, StoreSCP
from support.node import STAND_IN
from support.once import one_process_at_a_time

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "testdata"
TOTALSEG_VERSION = "2.18.0"


def _totalseg_reference_dir() -> Path:
    """Unpack tests/reference_files of the TotalSegmentator sdist (real CT + ground truth) once."""
    with one_process_at_a_time("totalsegmentator"):
        return _unpack_totalseg_reference()


def _unpack_totalseg_reference() -> Path:
    target = CACHE / f"totalsegmentator-{TOTALSEG_VERSION}" / "reference_files"
    if target.is_dir():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"totalsegmentator-{TOTALSEG_VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             f"totalsegmentator=={TOTALSEG_VERSION}", "-d", str(CACHE)],
            check=True,
        )
    prefix = f"totalsegmentator-{TOTALSEG_VERSION}/tests/reference_files/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(f"totalsegmentator-{TOTALSEG_VERSION}/tests/"):]
        tar.extractall(CACHE / f"totalsegmentator-{TOTALSEG_VERSION}", members=members, filter="data")
    return target


@pytest.fixture(scope="session")
def totalseg_reference() -> Path:
    """Folder with example_ct_dicom/, example_ct_sm.nii.gz, example_seg.nii.gz, … (real CT, real labels)."""
    return _totalseg_reference_dir()


@pytest.fixture
def real_ct_folder(totalseg_reference: Path, tmp_path: Path) -> Path:
    """A folder holding the real 20-slice CT series (JPEG 2000 lossless) with its UIDs restored."""
    folder = tmp_path / "real_ct"
    restore_totalseg_dicom(totalseg_reference, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_unet():
    """The small UNet of ``factories.train_tiny_unet`` trained briefly on synthetic CT (about 7 s, once per session)."""
    return train_tiny_unet()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_unet) -> Path:
    """That network as a MONAI bundle folder (metadata, inference config, state dict), as a site would have it."""
    return write_bundle(tmp_path_factory.mktemp("models") / "tiny_bundle", tiny_unet)


LONGEST_MODULES = ("test_engine.py", "test_containers.py", "test_mri_brain.py", "test_map.py", "test_bench.py",
                   "test_console.py", "test_feedback.py", "test_clinical_outputs.py", "test_execution.py")
"""The modules that take longest (``--durations`` of a full run on 2 cores, longest first)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``--dist loadfile``: a module runs whole on one worker) the longest modules are handed
    out first, so that no long one is left to start when the other worker has nothing more to do."""
    if getattr(config.option, "numprocesses", None) in (None, 0):
        return

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)
    items.sort(key=rank)  # stable: each module's own order is kept


def pytest_configure(config: pytest.Config) -> None:
    """In a pytest-xdist worker, torch's own thread pool gets this worker's share of the cores. Each worker's
    torch would otherwise start a thread per core, and two workers' brain extractions side by side on 2 cores
    took 38 s each against 27 s with one thread each (CPU time 37 s against 28 s: the rest was threads waiting
    on each other). Only torch in the test processes is set: the node's job processes keep their defaults, and
    ``OMP_NUM_THREADS`` (the slab and child-process paths follow it) is left as it is."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 1:
        import torch
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


PLAYWRIGHT_DIR = REPO / ".cache" / "playwright"
PLAYWRIGHT_VERSION = "1.65.1"


@pytest.fixture(scope="session")
def playwright_core() -> Path:
    """npm's playwright-core (no browser download: it drives Debian's /usr/bin/chromium), installed once."""
    module = PLAYWRIGHT_DIR / "node_modules" / "playwright-core"
    with one_process_at_a_time("playwright"):
        if not module.is_dir():
            PLAYWRIGHT_DIR.mkdir(parents=True, exist_ok=True)
            subprocess.run(["npm", "install", "--no-save", "--no-audit", "--no-fund", "--silent",
                            f"playwright-core@{PLAYWRIGHT_VERSION}"], cwd=PLAYWRIGHT_DIR, check=True, timeout=300)
    assert Path("/usr/bin/chromium").exists(), "Debian chromium is needed (deploy/ohif/install.sh installs it)"
    return module


@pytest.fixture
def stand_in(tmp_path: Path) -> list[str]:
    """The job command: the stand-in script (``support.node.STAND_IN``) run by this Python."""
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    return [sys.executable, str(script)]


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    """DCMTK storescp as the PACS, on a free port, receiving into ``tmp_path/pacs``."""
    with StoreSCP(tmp_path / "pacs") as receiver:
        yield receiver


@pytest.fixture
def fhir(tmp_path: Path) -> Iterator[FhirServer]:
    """A sekmet FHIR R4 server as the EHR, on a free port, its data in ``tmp_path/fhir``."""
    with FhirServer(tmp_path / "fhir") as server:
        yield server


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[StoreSCP, FhirServer]]:
    """The PACS and the EHR together, for ``radnode serve`` runs (``support.node.ServeProcess``)."""
    with StoreSCP(tmp_path / "pacs") as pacs, FhirServer(tmp_path / "ehr") as fhir:
        yield pacs, fhir


# --- PostgreSQL (Debian's 15, a shared system service: this session's own role and database) ----------

class PostgresServer:
    """The local PostgreSQL 15 cluster, started if it is not running, with a role and a database made for
    this test session (unique names, dropped at the end)."""

    VERSION, CLUSTER = "15", "main"

    def __init__(self) -> None:
        import secrets
        import shutil

        if shutil.which("pg_lsclusters") is None:
            pytest.fail("PostgreSQL 15 is not installed: run scripts/bootstrap.sh")
        with one_process_at_a_time("postgresql"):
            status = self._cluster()
            if status is None:
                subprocess.run(["pg_createcluster", self.VERSION, self.CLUSTER], check=True, capture_output=True)
                status = self._cluster()
            if status is None or status[1] != "online":
                subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", self.VERSION, self.CLUSTER, "start"],
                               check=True, capture_output=True)
        self.port = int(self._cluster()[0])  # type: ignore[index]
        suffix = secrets.token_hex(4)
        self.role, self.database = f"radnode_test_{suffix}", f"radnode_test_{suffix}"
        self.password = secrets.token_hex(12)
        self.psql(f"CREATE ROLE {self.role} LOGIN PASSWORD '{self.password}'")
        self.psql(f"CREATE DATABASE {self.database} OWNER {self.role}")

    def _cluster(self) -> tuple[str, str] | None:
        """(port, status) of the cluster as ``pg_lsclusters`` lists it, or None when it does not exist."""
        listing = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True).stdout
        for line in listing.splitlines():
            version, cluster, port, status, *_ = line.split()
            if (version, cluster) == (self.VERSION, self.CLUSTER):
                return port, status
        return None

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the ``postgres`` superuser (over the local socket, as Debian sets it up)."""
        result = subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-p", str(self.port), "-d", database,
                                 "-v", "ON_ERROR_STOP=1", "-qAtc", sql], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"psql {sql!r}: {result.stderr.strip()}")
        return result.stdout

    def url(self, schema: str | None = None) -> str:
        """This session's database as a ``store.url`` (``schema``: the first schema on the search path)."""
        url = f"postgresql://{self.role}:{self.password}@127.0.0.1:{self.port}/{self.database}"
        return f"{url}?options=-csearch_path%3D{schema}" if schema else url

    def close(self) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)")
        self.psql(f"DROP ROLE IF EXISTS {self.role}")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The PostgreSQL server for the session (started if not running) with this session's role and database."""
    server = PostgresServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> Iterator[str]:
    """A ``store.url`` to an empty schema of its own in the session's database (dropped afterwards)."""
    import secrets

    schema = f"t_{secrets.token_hex(6)}"
    postgres.psql(f"CREATE SCHEMA {schema} AUTHORIZATION {postgres.role}", postgres.database)
    try:
        yield postgres.url(schema)
    finally:
        postgres.psql(f"DROP SCHEMA {schema} CASCADE", postgres.database)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a job store under test lives: a SQLite file, then (the same test again) a PostgreSQL schema."""
    if request.param == "sqlite":
        return tmp_path / "radnode.db"
    return request.getfixturevalue("postgres_url")


# --- Real head CT (dicom2stl sdist) ----------------------------------------------------------------------

DICOM2STL_VERSION = "0.5.0"


@pytest.fixture(scope="session")
def head_ct_nifti() -> Path:
    """A real head CT (190×240×95, 1.01×1.01×2.5 mm, Hounsfield units, vertex to the upper neck, dental
    streaks): ``examples/Data/ct_head.nii.gz`` of the dicom2stl source distribution on PyPI (Apache-2.0;
    the package's tutorial uses it as its "CT Head"). Unpacked once into .cache/testdata."""
    with one_process_at_a_time("dicom2stl"):
        return _unpack_head_ct()


def _unpack_head_ct() -> Path:
    target = CACHE / f"dicom2stl-{DICOM2STL_VERSION}" / "ct_head.nii.gz"
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"dicom2stl-{DICOM2STL_VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"dicom2stl=={DICOM2STL_VERSION}", "-d", str(CACHE)], check=True)
    with tarfile.open(sdist) as tar:
        member = tar.getmember(f"dicom2stl-{DICOM2STL_VERSION}/examples/Data/ct_head.nii.gz")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(tar.extractfile(member).read())
    return target


# --- RabbitMQ (Debian's 3.10): a private node for the session, so a test may stop it ---------------------

@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator["RabbitNode"]:
    """A RabbitMQ node of this session's own (own name, port, data and vhost), stopped at the end."""
    from radnode.benchmarks.cluster import RabbitNode

    node = RabbitNode(tmp_path_factory.mktemp("rabbitmq"))
    try:
        yield node
    finally:
        node.close()


@pytest.fixture(scope="module")
def shared_store_url(postgres: PostgresServer) -> Iterator[str]:
    """A PostgreSQL schema shared by the node and workers of one test module (dropped afterwards)."""
    import secrets

    schema = f"m_{secrets.token_hex(6)}"
    postgres.psql(f"CREATE SCHEMA {schema} AUTHORIZATION {postgres.role}", postgres.database)
    try:
        yield postgres.url(schema)
    finally:
        postgres.psql(f"DROP SCHEMA {schema} CASCADE", postgres.database)


# --- S3: moto's real HTTP server (ThreadedMotoServer), one per session -----------------------------------

@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of a moto S3 server on loopback; AWS credentials for it in the environment (moto takes any)."""
    import os

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID="radnode-test", AWS_SECRET_ACCESS_KEY="radnode-test")
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A new, empty bucket on the moto server."""
    import secrets

    import boto3

    name = f"radnode-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name
