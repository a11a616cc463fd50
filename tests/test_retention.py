"""Retention and the disk guard on a real node: studies in over DICOM, jobs run, then their files purged.

Ages are passed as ``now`` (days ahead) instead of waiting; one test lets the node's own loop purge with a
retention of seconds. The disk guard is tripped by a minimum larger than the disk, never by filling one.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from pynetdicom import AE
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, KeyObjectSelectionDocumentStorage

from factories import (
    RELEASE_0_1_SCHEMA, egress_test_config, open_store_made_by, rejected_uids, study_version_job, write_results,
    write_study,
)
from radnode.config import Config
from radnode.node.egress import Egress, outbox_dir
from radnode.node.retention import DAY, Retention, purge_data_dir
from radnode.node.scp import Ingest, Spool
from radnode.node.service import Node
from radnode.node.store import ActionRefused, Instance, InstanceBeingPurged, JobState, JobStore
from radnode.pipelines.routing import Completeness, LateInstances, SeriesDecision
from radnode.peers import StoreSCP, free_port
from support.dicom_tools import ECHOSCU, storescu
from support.node import final_job, jobs_by_patient, node_config
from support.waiting import wait_until


def files_under(*folders: Path) -> dict[str, int]:
    """Every file under the folders with its size (a snapshot to compare)."""
    return {str(p): p.stat().st_size for folder in folders if folder.exists()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def database_dump(config: Config) -> list[str]:
    db = sqlite3.connect(config.data_dir / "radnode.db")
    try:
        return list(db.iterdump())
    finally:
        db.close()


def run_study(config: Config, command: list[str], folder: Path, patient_id: str = "P1", n: int = 3) -> int:
    """One study through a node to a final state; returns the job id (the node is stopped after)."""
    write_study(folder, n=n, patient_id=patient_id)
    with Node(config, job_command=command, poll_seconds=0.05) as node:
        assert storescu(node.port, folder).returncode == 0
        (job,) = jobs_by_patient(node, 1).values()
        return final_job(node, job.id).id


def test_a_done_job_is_purged_after_its_age_its_row_and_log_kept(tmp_path: Path, stand_in: list[str]) -> None:
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = node_config(tmp_path, ingress={"late_instances": "ignore"},
                             egress={"destinations": {"pacs": pacs.destination}})
        job_id = run_study(config, stand_in, tmp_path / "study")
    data = config.data_dir
    store = JobStore(data / "radnode.db")
    job = store.job(job_id)
    assert job is not None and job.state is JobState.DONE and job.purged_at is None
    study_dir = data / "spool" / job.study_instance_uid
    job_dir, outbox = data / "jobs" / str(job_id), data / "outbox" / str(job_id)
    spool_bytes = sum(p.stat().st_size for p in study_dir.rglob("*.dcm"))
    expected = spool_bytes + sum(files_under(outbox).values()) + sum(
        size for path, size in files_under(job_dir).items() if "/in/" not in path)  # in/: links to the spool
    events = store.events(job_id)

    retention = Retention(config, store)
    assert retention.purge(now=job.updated_at + 6.9 * DAY).results == []  # not due yet

    files, dump = files_under(data), database_dump(config)
    dry = purge_data_dir(config, dry_run=True, now=job.updated_at + 7.1 * DAY)  # what `radnode purge --dry-run` does
    assert [(r.job_id, r.instances, r.bytes_freed, r.finished) for r in dry.results] == [(job_id, 3, expected, False)]
    assert "would purge 1 job(s), 3 spool instance(s)" in dry.summary()
    assert files_under(data) == files and database_dump(config) == dump  # a dry run changes nothing

    report = retention.purge(now=job.updated_at + 7.1 * DAY)
    (result,) = report.results
    assert (result.job_id, result.instances, result.bytes_freed, result.finished) == (job_id, 3, expected, True)
    assert not study_dir.exists() and not job_dir.exists() and not outbox.exists()
    assert list((data / "spool").iterdir()) == [data / "spool" / ".incoming"]
    purged = store.job(job_id)
    assert purged is not None and purged.state is JobState.DONE and purged.instances == 3 and purged.purged_at
    after = store.events(job_id)
    assert after[:-1] == events and after[-1].kind == "purged"
    assert f"removed 3 spool instance(s), jobs/{job_id}" in after[-1].message
    assert f"({expected} bytes)" in after[-1].message and "done 0.0 days ago" in after[-1].message
    assert retention.purge(now=job.updated_at + 7.1 * DAY).results == []  # nothing left: a repeat does nothing
    assert store.job_inputs(job_id) == []
    store.close()

    # The study sent again: its instances are received anew (not taken for duplicates of the purged copies)
    # and, late for a finished job under late_instances: ignore, purged in turn once old enough.
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        assert storescu(node.port, tmp_path / "study").returncode == 0
        assert len(list(study_dir.glob("*/*.dcm"))) == 3
        kinds = [e.kind for e in node.events(job_id)]
        assert kinds.count("re-received") == 3 and kinds.count("late") == 3
        report = Retention(node.config, node.store).purge(now=time.time() + 7.1 * DAY)
        assert [(r.job_id, r.instances) for r in report.results] == [(job_id, 3)]
        assert [e.kind for e in node.events(job_id)].count("purged") == 2
    assert not study_dir.exists()


def test_an_undelivered_job_and_what_it_needs_are_kept(tmp_path: Path, stand_in: list[str]) -> None:
    """A finished study re-run for a late instance (whole study) whose results cannot be delivered: the
    first job is purged but its instances stay for the second; all goes once the second has delivered."""
    port = free_port()
    config = node_config(tmp_path, ingress={"late_instances": "rerun"},
                         egress={"destinations": {"pacs": f"PACS@127.0.0.1:{port}"}})
    first = write_study(tmp_path / "study", n=3)
    write_study(tmp_path / "late", n=1, study_uid=pydicom.dcmread(first[0]).StudyInstanceUID)
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        with StoreSCP(tmp_path / "pacs", port=port):
            assert storescu(node.port, tmp_path / "study").returncode == 0
            assert final_job(node, 1).state is JobState.DONE
        assert storescu(node.port, tmp_path / "late").returncode == 0  # the PACS is down now
        wait_until(lambda: len(node.jobs()) == 2 and node.jobs()[1].state is JobState.DELIVERING
                   and all(d.attempts >= 2 for d in node.deliveries(2)))
        spool = sorted(config.data_dir.glob("spool/*/*/*.dcm"))
        assert len(spool) == 4

        retention = Retention(node.config, node.store)
        (result,) = retention.purge(now=time.time() + 1000 * DAY).results
        assert (result.job_id, result.instances, result.kept_for) == (1, 0, ((2, 3),))
        assert sorted(config.data_dir.glob("spool/*/*/*.dcm")) == spool  # job 2 reads job 1's instances
        assert not (config.data_dir / "jobs" / "1").exists() and (config.data_dir / "jobs" / "2" / "in").is_dir()
        assert "kept 3 instance(s) job 2 still needs" in node.events(1)[-1].message
        assert retention.purge(now=time.time() + 1000 * DAY).results == []  # job 2 still delivering
        assert node.job(2).state is JobState.DELIVERING  # type: ignore[union-attr]

        with StoreSCP(tmp_path / "pacs", port=port):
            assert final_job(node, 2).state is JobState.DONE
        report = retention.purge(now=time.time() + 1000 * DAY)
        assert sorted((r.job_id, r.instances) for r in report.results) == [(1, 3), (2, 1)]
        assert list(config.data_dir.glob("spool/*/*/*.dcm")) == []
        assert [e.kind for e in node.events(1)].count("purged") == 2


def test_a_failed_job_is_kept_for_failed_days(tmp_path: Path, stand_in: list[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAND_IN_FAIL_BAD", "no image series in the input")
    config = node_config(tmp_path, retention={"done_days": 7, "failed_days": 30})
    write_study(tmp_path / "good", n=2, patient_id="GOOD")
    write_study(tmp_path / "bad", n=1, patient_id="BAD")
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        for folder in ("good", "bad"):
            assert storescu(node.port, tmp_path / folder).returncode == 0
        jobs = jobs_by_patient(node, 2)
        good, bad = final_job(node, jobs["GOOD"].id), final_job(node, jobs["BAD"].id)
        assert (good.state, bad.state) == (JobState.DONE, JobState.FAILED)
        bad_files = files_under(config.data_dir / "spool" / bad.study_instance_uid,
                                config.data_dir / "jobs" / str(bad.id))
        assert len(bad_files) == 2 + 3  # the instance; its input link, stdout.log, stderr.log

        report = Retention(node.config, node.store).purge(now=time.time() + 8 * DAY)
        assert [r.job_id for r in report.results] == [good.id]
        assert files_under(config.data_dir / "spool" / bad.study_instance_uid,
                           config.data_dir / "jobs" / str(bad.id)) == bad_files

        forever = node_config(tmp_path, retention={"failed_days": 0})
        assert Retention(forever, node.store).purge(now=time.time() + 10_000 * DAY).results == []

        report = Retention(node.config, node.store).purge(now=time.time() + 31 * DAY)
        assert [(r.job_id, r.instances) for r in report.results] == [(bad.id, 1)]
        assert files_under(config.data_dir / "spool", config.data_dir / "jobs") == {}
        assert "failed 0.0 days ago" in node.events(bad.id)[-1].message
        assert node.job(bad.id).reason == "no image series in the input"  # type: ignore[union-attr]


class Interrupted(BaseException):
    """Stands for the process dying (SIGKILL, power) at that point of the purge."""


@pytest.mark.parametrize("crash", ["after recording", "halfway through the files", "before finishing"])
def test_a_purge_interrupted_between_its_steps_is_finished_by_the_next(
        tmp_path: Path, stand_in: list[str], monkeypatch: pytest.MonkeyPatch, crash: str) -> None:
    config = node_config(tmp_path, retention={"done_days": 1})
    job_id = run_study(config, stand_in, tmp_path / "study", n=4)
    data = config.data_dir
    spool_files = sorted(data.glob("spool/*/*/*.dcm"))
    real_delete = Retention._delete

    def delete(self: Retention, files: list[Path], folders: list[Path]) -> str | None:
        if crash == "halfway through the files":
            for path in files[:2]:
                path.unlink()
        if crash == "before finishing":
            return real_delete(self, files, folders)
        raise Interrupted

    def finish(self: JobStore, *args: object) -> bool:
        raise Interrupted

    store = JobStore(data / "radnode.db")
    with monkeypatch.context() as patch:
        patch.setattr(Retention, "_delete", delete)
        patch.setattr(JobStore, "finish_purge", finish)
        with pytest.raises(Interrupted):
            Retention(config, store).purge(now=time.time() + 2 * DAY)
    store.close()

    # What the crash left: the purge recorded, not finished. The files still there are never indexed again,
    # no job takes them as input, and the same instance sent again is refused for now (A700), not lost.
    store = JobStore(data / "radnode.db")
    job = store.job(job_id)
    assert job is not None and job.purged_at is None and "purged" not in [e.kind for e in store.events(job_id)]
    assert store.job_inputs(job_id) == []
    left = [p for p in spool_files if p.exists()]
    assert len(left) == {"after recording": 4, "halfway through the files": 2, "before finishing": 0}[crash]
    if left:
        uid = pydicom.dcmread(left[0]).SOPInstanceUID
        assert store.being_purged(uid) and not store.has_instance(uid)
        with pytest.raises(InstanceBeingPurged, match="being removed by retention"):
            Ingest(Spool(data / "spool"), store).receive(left[0].read_bytes(), b"", _origin())
    store.close()

    # The restarted node indexes none of them again, and its start-up purge finishes the job.
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        wait_until(lambda: node.job(job_id).purged_at is not None)  # type: ignore[union-attr]
        assert len(node.jobs()) == 1 and node.job(job_id).instances == 4  # type: ignore[union-attr]
        (purged,) = [e for e in node.events(job_id) if e.kind == "purged"]
        assert purged.message.startswith("finished the purge interrupted since ")
        assert "removed 4 spool instance(s)" in purged.message  # the instances the purge recorded
        folders = ", jobs/1 (10 files), outbox/1 (3 files)" if crash != "before finishing" else ""
        assert f"removed 4 spool instance(s){folders}: {len(left) + (13 if folders else 0)} file(s)" in purged.message
    assert not any(p.exists() for p in spool_files)
    assert not (data / "jobs" / str(job_id)).exists() and not (data / "outbox" / str(job_id)).exists()



def test_a_resend_keeping_its_earlier_copy_that_retention_removes_meanwhile_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance sent again while its first copy is kept writes no file (the first copy stands for it); a
    purge of its job that runs between that look and the record would leave it acknowledged and indexed with no
    file. The ingest then writes the copy it received, so the instance is on disk."""
    store = JobStore(tmp_path / "radnode.db")
    ingest = Ingest(Spool(tmp_path / "spool"), store)
    files = write_study(tmp_path / "study", n=2)
    for file in files:
        ingest.receive(file.read_bytes(), b"", _origin())
    (job,) = store.jobs()
    store.queue_job(job.id, "idle")
    assert store.start_job(job.id, "run") and store.begin_delivery(job.id, "done", [])
    look = store.prior

    def look_then_purge(sop: str):  # type: ignore[no-untyped-def]
        prior = look(sop)
        plan = store.begin_purge(job.id, time.time() + 1, None)
        for path in plan.paths:
            Path(path).unlink()
        store.finish_purge(job.id, plan.marker, "purged")
        return prior

    monkeypatch.setattr(store, "prior", look_then_purge)
    ingest.receive(files[0].read_bytes(), b"", _origin())
    sop = pydicom.dcmread(files[0]).SOPInstanceUID
    (kept,) = [i for j in store.jobs() for i in store.instances(j.id) if i.sop_instance_uid == sop]
    assert Path(kept.path).read_bytes() == files[0].read_bytes() and store.has_instance(sop)
    store.close()


def _origin():  # type: ignore[no-untyped-def]
    from radnode.node.scp import Origin

    return Origin("MODALITY", "127.0.0.1:4000", "test")


def test_the_node_purges_by_itself_in_its_loop(tmp_path: Path, stand_in: list[str]) -> None:
    config = node_config(tmp_path, retention={"done_days": 1 / DAY, "interval_minutes": 0.5 / 60})
    write_study(tmp_path / "study", n=2)
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        assert storescu(node.port, tmp_path / "study").returncode == 0
        assert final_job(node, 1).state is JobState.DONE
        wait_until(lambda: node.job(1).purged_at is not None, timeout=10)  # type: ignore[union-attr]
        assert list(config.data_dir.glob("spool/*/*/*.dcm")) == []
        assert not (config.data_dir / "outbox" / "1").exists()


def test_purge_leaves_files_outside_the_data_folder_alone(tmp_path: Path, stand_in: list[str]) -> None:
    """A spool path in the store that points elsewhere (a data folder moved by hand) is never removed."""
    config = node_config(tmp_path)
    job_id = run_study(config, stand_in, tmp_path / "study", n=1)
    elsewhere = tmp_path / "elsewhere.dcm"
    elsewhere.write_bytes(b"not ours")
    db = sqlite3.connect(config.data_dir / "radnode.db")
    db.execute("UPDATE instances SET path = ?", (str(elsewhere),))
    db.commit()
    db.close()
    report = purge_data_dir(config, now=time.time() + 8 * DAY)
    assert [(r.job_id, r.instances, r.finished) for r in report.results] == [(job_id, 0, True)]
    assert elsewhere.read_bytes() == b"not ours"
    store = JobStore(config.data_dir / "radnode.db")
    assert "1 instance file(s) outside" in store.events(job_id)[-1].message
    store.close()


def _send(port: int, ds: pydicom.Dataset) -> pydicom.Dataset:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADNODE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def test_under_the_free_space_minimum_c_store_is_refused_a700_and_nothing_written(
        tmp_path: Path, stand_in: list[str], caplog: pytest.LogCaptureFixture) -> None:
    config = node_config(tmp_path, retention={"min_free_disk_gb": 10**9})  # an exabyte: more than any disk
    caplog.set_level(logging.ERROR, logger="radnode.node.scp")
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        ds = pydicom.dcmread(write_study(tmp_path / "one", n=1)[0])
        status = _send(node.port, ds)
        assert status.Status == 0xA700 and status.ErrorComment.startswith("disk low: ")
        write_study(tmp_path / "study", n=2)
        sent = storescu(node.port, tmp_path / "study")
        assert "Received Store Response (Refused: OutOfResources)" in sent.stderr, sent.stderr
        echo = subprocess.run([ECHOSCU, "-aec", "RADNODE", "127.0.0.1", str(node.port)], capture_output=True)
        assert echo.returncode == 0  # C-ECHO still answers
        assert [p for p in (config.data_dir / "spool").rglob("*") if p.is_file()] == []  # not even a .part
        assert node.jobs() == []
        (line,) = [r.getMessage() for r in caplog.records if "refusing C-STORE" in r.getMessage()]
        assert " GB free on the file system of " in line and "under the minimum of 1000000000.00 GB" in line

        assert node.disk_guard is not None
        node.disk_guard.min_free_bytes = 0  # space is back
        assert _send(node.port, ds).Status == 0x0000
        assert storescu(node.port, tmp_path / "study").returncode == 0
        assert len(list((config.data_dir / "spool").glob("*/*/*.dcm"))) == 3
        assert sorted(j.instances for j in node.jobs()) == [1, 2]


def test_the_purge_command(tmp_path: Path, stand_in: list[str]) -> None:
    """``radnode purge [--dry-run]`` as an operator runs it, on a job done for longer than a second."""
    config = node_config(tmp_path, retention={"done_days": 1 / DAY})
    run_study(config, stand_in, tmp_path / "study", n=2)
    config_file = tmp_path / "node.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    time.sleep(1.1)

    def purge(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "radnode", "purge", "--config", str(config_file), *flags],
                              capture_output=True, text=True, timeout=60)

    spool = files_under(config.data_dir / "spool")
    dry = purge("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("job 1 (done): would remove 2 spool instance(s), jobs/1 (")
    assert "retention: would purge 1 job(s), 2 spool instance(s)" in dry.stdout
    assert files_under(config.data_dir / "spool") == spool
    done = purge()
    assert done.returncode == 0 and "job 1 (done): removed 2 spool instance(s)" in done.stdout, done.stderr
    assert list(config.data_dir.glob("spool/*/*/*.dcm")) == []
    assert purge().stdout == "retention: nothing due\n"
    config_file.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "nowhere")}))
    missing = purge()
    assert missing.returncode == 2 and "no job store at" in missing.stderr


def test_a_store_from_before_retention_gets_its_columns_on_open(tmp_path: Path) -> None:
    old_schema = (RELEASE_0_1_SCHEMA.replace(",\n    purge_started_at REAL,\n    purged_at REAL\n", "\n")
                  .replace(",\n    purged_at REAL\n", "\n"))
    assert "purge" not in old_schema
    store = open_store_made_by(old_schema, tmp_path / "radnode.db")
    (job,) = store.jobs()
    assert job.purged_at is None and store.purge_due(time.time(), None) == [job.id]
    store.close()


def test_a_main_jobs_instances_are_kept_while_its_sibling_job_needs_them(tmp_path: Path) -> None:
    """Rules selecting two pipelines: the sibling job reads the main job's instances; purging the main job
    first keeps them for it, and the next purge after the sibling's takes them."""
    store = JobStore(tmp_path / "radnode.db")
    route = SeriesDecision(("ct_tissue", "lung"))
    for n in range(2):
        _, main = store.record_instance(Instance(f"1.{n}", "1.2.3", "1.2.3.1", "P1", "CT", CTImageStorage,
                                                 f"/spool/1.{n}.dcm", received_at=n), route)
    assert store.queue_job(main, "idle") is JobState.QUEUED
    (sibling,) = [j.id for j in store.jobs() if j.sibling_of == main]
    for job_id in (main, sibling):
        assert store.start_job(job_id, "run")
    assert store.begin_delivery(main, "nothing", [])
    later = time.time() + 10
    assert store.purge_due(later, later) == [main]
    plan = store.begin_purge(main, later, later)
    assert plan is not None and plan.paths == () and plan.kept_for == ((sibling, 2),)
    assert store.finish_purge(main, plan.marker, "nothing removed")
    assert [i.sop_instance_uid for i in store.job_inputs(sibling)] == ["1.0", "1.1"]
    assert store.begin_delivery(sibling, "nothing", [])
    assert store.purge_due(later, later) == [main, sibling]
    plan = store.begin_purge(main, later, later)
    assert plan is not None and plan.paths == ("/spool/1.0.dcm", "/spool/1.1.dcm") and plan.kept_for == ()
    store.close()


def test_the_outbox_a_running_rerun_withdraws_is_kept_until_the_rerun_no_longer_needs_it(tmp_path: Path) -> None:
    """A done job's results went to the PACS; a late instance started a whole-study re-run, and the first job passes
    ``done_days`` while the re-run runs. Its instances are kept for the re-run, and so is its outbox: the re-run's
    IOCM rejection note is made of the objects there, and it still withdraws exactly them at the PACS. The purge
    after the re-run is purgeable too removes the first job's folders."""
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = egress_test_config(tmp_path, {"pacs": pacs.destination})
        store = JobStore(tmp_path / "data" / "radnode.db")
        egress = Egress(config, store)
        first = study_version_job(store, "1.1")
        first_uids = write_results(tmp_path / "first")
        egress.stage(first, tmp_path / "first")
        wait_until(lambda: egress.deliver_due() or store.job(first).state is JobState.DONE)
        rerun = study_version_job(store, "1.2")  # running on the whole study
        report = Retention(config, store).purge(now=time.time() + 8 * DAY)
        assert [(r.job_id, r.kept_for) for r in report.results] == [(first, ((rerun, 1),))]
        assert outbox_dir(config, first).is_dir()
        write_results(tmp_path / "rerun")
        egress.stage(rerun, tmp_path / "rerun")
        wait_until(lambda: egress.deliver_due() or store.job(rerun).state is JobState.DONE)
        received = [pydicom.dcmread(path) for path in pacs.received()]
        (note,) = [ds for ds in received if ds.SOPClassUID == KeyObjectSelectionDocumentStorage]
        assert rejected_uids(note) == set(first_uids)
        report = Retention(config, store).purge(now=time.time() + 8 * DAY)
        assert {r.job_id for r in report.results} == {first, rerun} and not outbox_dir(config, first).exists()
        store.close()

def test_a_failed_job_whose_input_retention_removed_is_not_retried_on_what_is_left(tmp_path: Path) -> None:
    """A failed job past ``failed_days`` is purged; one late instance (``late_instances: ignore``) came after the
    cutoff and is still there. A retry would run the pipeline on that one instance and deliver the result of a
    part of the study as done: it is refused, saying retention removed the input, and the job stays failed."""
    store = JobStore(tmp_path / "radnode.db")
    route = SeriesDecision(("ct_tissue",), completeness=Completeness(late_instances=LateInstances.IGNORE))
    for n in range(3):
        _, job = store.record_instance(Instance(f"1.{n}", "1.2.3", "1.2.3.1", "P1", "CT", CTImageStorage,
                                                f"/spool/1.{n}.dcm", received_at=n), route)
    assert store.queue_job(job, "idle") is JobState.QUEUED and store.start_job(job, "run")
    assert store.fail_job(job, "the pipeline crashed")
    later = time.time() + 10
    store.record_instance(Instance("1.3", "1.2.3", "1.2.3.1", "P1", "CT", CTImageStorage, "/spool/1.3.dcm",
                                   received_at=later + 5), route)
    plan = store.begin_purge(job, None, later)
    assert plan is not None and len(plan.paths) == 3
    assert store.finish_purge(job, plan.marker, "removed")
    with pytest.raises(ActionRefused, match=f"job {job}'s input was purged by retention: 3 instance"):
        store.retry_job(job, "dr-x")
    job_row = store.job(job)
    assert job_row is not None and job_row.state is JobState.FAILED
    store.close()

def test_a_purge_and_a_late_instance_rerunning_the_study_take_turns_on_postgresql(postgres_url: str) -> None:
    """Ingest holds the study's lock while it adopts a done study's instances for a re-run; a purge of that
    study's job takes the same lock first, so it waits for the arrival instead of removing files under it."""
    import threading

    from radnode.node.store.jobs import lock_study

    route = SeriesDecision(("ct_tissue",))
    ingest, retention = JobStore(postgres_url), JobStore(postgres_url)
    try:
        for n in range(2):
            _, main = ingest.record_instance(Instance(f"1.{n}", "1.2.3", "1.2.3.1", "P1", "CT", CTImageStorage,
                                                      f"/spool/1.{n}.dcm", received_at=n), route)
        assert ingest.queue_job(main, "idle") is JobState.QUEUED and ingest.start_job(main, "run")
        assert ingest.begin_delivery(main, "nothing", [])
        later = time.time() + 10
        plans: list = []
        purge = threading.Thread(target=lambda: plans.append(retention.begin_purge(main, later, later)))
        with ingest._db.write() as conn:  # an arrival of the study, inside its transaction
            lock_study(ingest._db, conn, "1.2.3", time.time())
            purge.start()
            purge.join(1.0)
            assert purge.is_alive(), "the purge went on while an arrival of its study held the study's lock"
        purge.join(10)
        assert not purge.is_alive() and plans[0] is not None
        assert plans[0].paths == ("/spool/1.0.dcm", "/spool/1.1.dcm")
    finally:
        ingest.close()
        retention.close()
