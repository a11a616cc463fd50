"""Study completeness: the policy on recorded arrivals, and the node on real associations (storescu).

The node tests run a stand-in job command (``support.node.STAND_IN``); timings here only bound what must not
happen (a half study queued) with wide margins; latency figures are measured in bench/.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from factories import write_study
from radnode.node.completeness import (
    CompletenessSettings, PeerCompleteness, SeriesProgress, expected_instances, study_expected_instances, study_verdict,
)
from radnode.node.service import Node
from radnode.node.store import JobState
from radnode.pipelines.routing import Completeness, SeriesDecision
from support.dicom_tools import storescu
from support.node import final_job, node_config
from support.waiting import wait_until

SETTINGS = CompletenessSettings(idle_seconds=10, series_grace_seconds=0.5, study_grace_seconds=1.0,
                                study_quiet_seconds=0.0)


def series(uid: str = "1", received: int = 3, expected: int | None = None, last: float = 100.0,
           released: float | None = None, stable: float | None = None, study_idle: float | None = None,
           calling_ae: str = "", study_expected: int | None = None) -> SeriesProgress:
    decision = SeriesDecision(pipelines=("ct_tissue",), completeness=Completeness(study_idle_seconds=study_idle))
    return SeriesProgress(uid, decision, received, expected, last, released, stable, calling_ae, study_expected)


def test_expected_count_comes_from_the_modality_signals() -> None:
    assert expected_instances({"ImagesInAcquisition": "120"}) == 120
    assert expected_instances({"NumberOfSlices": 47, "NumberOfTimeSlices": 3}) == 141
    assert expected_instances({"ImagesInAcquisition": "n/a"}) is None
    assert expected_instances({}) is None
    assert expected_instances({"NumberOfSeriesRelatedInstances": 24, "ImagesInAcquisition": 12}) == 24
    assert study_expected_instances({"NumberOfStudyRelatedInstances": "48"}) == 48
    assert study_expected_instances({"NumberOfStudyRelatedInstances": "0"}) is None


def test_a_multi_frame_instance_is_no_whole_series() -> None:
    """An enhanced series may be several multi-frame instances: Number of Frames declares no series count, so
    the first of them does not complete the series; release or idle does."""
    expected = expected_instances({"NumberOfFrames": "200"})
    assert expected is None
    first_stack = series(received=1, expected=expected)
    assert not study_verdict([first_stack], 103, SETTINGS).complete
    assert study_verdict([first_stack], 110.1, SETTINGS).complete
    assert study_verdict([series(received=1, expected=expected, released=100.1)], 100.6 + 0.5, SETTINGS).complete


def test_a_released_study_waits_the_quiet_time_the_sender_is_given() -> None:
    """A sender that sends a study in batches pauses between associations: the quiet time after the release
    (the node's, or the sending AE's own in ingress.peers) keeps the study open."""
    quiet = CompletenessSettings(idle_seconds=10, series_grace_seconds=0.5, study_quiet_seconds=3.0,
                                 peers={"BATCHER": PeerCompleteness(study_quiet_seconds=15.0)})
    assert not study_verdict([series(released=100.2)], 103.1, quiet).complete
    verdict = study_verdict([series(released=100.2)], 103.3, quiet)
    assert verdict.complete and "quiet time after release 3 s" in verdict.reason
    assert not study_verdict([series(released=100.2, calling_ae="BATCHER")], 115.1, quiet).complete
    assert study_verdict([series(released=100.2, calling_ae="BATCHER")], 115.3, quiet).complete


def test_the_study_count_the_sender_declares_decides() -> None:
    """Number of Study Related Instances reached: complete at once; short of it: not before the missing wait."""
    settings = CompletenessSettings(idle_seconds=10, study_quiet_seconds=3.0, missing_wait_seconds=60.0)
    whole = [series("a", received=3, study_expected=5), series("b", received=2, study_expected=5)]
    verdict = study_verdict(whole, 100.0, settings)
    assert verdict.complete and "5/5 instances of the study" in verdict.reason
    short = [series("a", received=3, released=100.5, study_expected=5)]
    assert not study_verdict(short, 150.0, settings).complete
    assert study_verdict(short, 160.5, settings).complete


def test_a_released_association_completes_the_study_after_the_grace_only() -> None:
    released = [series(released=100.2)]
    assert not study_verdict(released, 100.6, SETTINGS).complete
    verdict = study_verdict(released, 100.8, SETTINGS)
    assert verdict.complete and "association released" in verdict.reason


def test_an_open_association_waits_for_the_idle_timer_unless_the_count_is_reached() -> None:
    assert not study_verdict([series()], 105, SETTINGS).complete
    assert study_verdict([series()], 110, SETTINGS).complete
    counted = [series(received=3, expected=3)]
    assert not study_verdict(counted, 100.5, SETTINGS).complete  # another series may follow: study grace
    assert study_verdict(counted, 101.0, SETTINGS).complete
    assert not study_verdict([series(received=2, expected=3)], 105, SETTINGS).complete


def test_every_series_must_be_complete_and_the_route_study_wait_holds() -> None:
    done, open_ = series("a", released=100), series("b", last=101)
    assert not study_verdict([done, open_], 102, SETTINGS).complete
    assert study_verdict([series("a", released=100), series("b", last=101, released=101)], 101.6, SETTINGS).complete
    slow_sender = [series("a", released=100, study_idle=5)]
    assert not study_verdict(slow_sender, 104.9, SETTINGS).complete
    assert study_verdict(slow_sender, 105.1, SETTINGS).complete
    assert study_verdict([series(stable=101)], 101, SETTINGS).complete


def _rules(tmp_path: Path, completeness: str) -> str:
    path = tmp_path / "rules.yaml"
    path.write_text(f"rules:\n  - name: ct\n    when: {{Modality: CT}}\n    pipelines: [ct_tissue]\n"
                    f"    completeness: {completeness}\n")
    return str(path)


def test_one_association_is_queued_on_release_long_before_the_idle_timeout(tmp_path: Path,
                                                                         stand_in: list[str]) -> None:
    config = node_config(tmp_path, ingress={"study_idle_seconds": 60, "association_grace_seconds": 0.5})
    write_study(tmp_path / "study", n=5)
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        sent_at = time.time()
        assert storescu(node.port, tmp_path / "study").returncode == 0
        wait_until(lambda: node.jobs() and node.jobs()[0].state is not JobState.RECEIVED, timeout=30)
        job = final_job(node, node.jobs()[0].id)
        queued = next(e for e in node.events(job.id) if e.kind == "queued")
    assert job.state is JobState.DONE and job.instances == 5
    assert "association released" in queued.message
    assert queued.at - sent_at < 30  # far below the 60 s idle timeout


def test_series_sent_in_separate_associations_with_pauses_wait_for_the_route_study_idle(
        tmp_path: Path, stand_in: list[str]) -> None:
    """A sender pausing 2 s between series: the route's study_idle_seconds keeps the study together."""
    config = node_config(tmp_path, ingress={"study_idle_seconds": 60})
    config = config.model_copy(update={"rules": Path(_rules(tmp_path, "{study_idle_seconds: 6}"))})
    first = write_study(tmp_path / "s1", n=3)
    study_uid = pydicom.dcmread(first[0]).StudyInstanceUID
    write_study(tmp_path / "s2", n=2, study_uid=study_uid)
    write_study(tmp_path / "s3", n=2, study_uid=study_uid)
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        for folder in ("s1", "s2", "s3"):
            assert storescu(node.port, tmp_path / folder).returncode == 0
            time.sleep(2)
            assert [j.state for j in node.jobs()] == [JobState.RECEIVED]
        job = final_job(node, node.jobs()[0].id)
    assert job.state is JobState.DONE and (job.instances, job.late_instances) == (7, 0)
    assert (tmp_path / "data" / "outbox" / str(job.id) / "manifest.json").read_text() == '{"inputs": 7}'


@pytest.mark.parametrize("policy", ["rerun", "new-job", "ignore"])
def test_a_late_series_after_the_job_started_follows_the_rule(tmp_path: Path, stand_in: list[str], policy: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    gate = tmp_path / "job-may-end"
    monkeypatch.setenv("STAND_IN_GATE_P1", str(gate))  # the job runs until the late series is in
    config = node_config(tmp_path).model_copy(
        update={"rules": Path(_rules(tmp_path, f"{{late_instances: {policy}}}"))})
    first = write_study(tmp_path / "first", n=3)
    write_study(tmp_path / "late", n=2, study_uid=pydicom.dcmread(first[0]).StudyInstanceUID)
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        assert storescu(node.port, tmp_path / "first").returncode == 0
        wait_until(lambda: node.jobs() and node.jobs()[0].state is JobState.RUNNING)
        assert storescu(node.port, tmp_path / "late").returncode == 0
        gate.touch()
        wait_until(lambda: all(j.state in (JobState.DONE, JobState.FAILED) for j in node.jobs()), timeout=60)
        jobs = node.jobs()
    inputs = [(tmp_path / "data" / "outbox" / str(j.id) / "manifest.json").read_text() for j in jobs]
    assert all(j.state is JobState.DONE for j in jobs)
    if policy == "rerun":  # the running job was stopped and ran again on the whole study
        assert len(jobs) == 1 and jobs[0].runs == 2 and inputs == ['{"inputs": 5}']
    elif policy == "new-job":
        assert len(jobs) == 2 and inputs == ['{"inputs": 3}', '{"inputs": 2}']
    else:
        assert len(jobs) == 1 and (jobs[0].instances, jobs[0].late_instances) == (3, 2) and inputs == ['{"inputs": 3}']
    assert len(list((tmp_path / "data" / "spool").glob("*/*/*.dcm"))) == 5  # no instance lost
