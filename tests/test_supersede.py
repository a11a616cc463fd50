"""A study processed whole, or the earlier result withdrawn: late instances re-run the whole study and the new
results supersede the old ones, which an IHE IOCM rejection note withdraws at the PACS that received them.

The PACS is DCMTK storescp; the rejection note is read back from what it received and checked with dciodvfy.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom
import pytest

from factories import (
    deliver_results_and_a_pdf,
    PATIENT_BUNDLE,
    egress_test_config,
    rejected_uids,
    selected_uids,
    study_version_job,
    write_chest_phantom,
    write_results,
    write_study,
)
from radnode.node.egress import Egress, outbox_dir
from radnode.node.service import Node
from radnode.node.store import JobState, JobStore
from radnode.peers import FhirServer, StoreSCP, free_port
from support.dicom_tools import dciodvfy_errors, storescu
from support.node import ServeProcess, final_job, node_config
from support.waiting import wait_until

PAUSES = (1, 2, 5, 12)
"""Seconds between a study's two associations in the split-study test."""


def test_late_instances_rerun_the_whole_study_and_the_earlier_result_is_withdrawn(
        tmp_path: Path, stand_in: list[str], pacs: StoreSCP) -> None:
    """Half a study, processed and delivered; the other half 0.5 s later than the quiet time: a second job runs on
    all of it, its result reaches the PACS, then a rejection note (Rejected for Quality Reasons) naming exactly
    what the first job sent there. Both jobs' histories say so, and the first cannot be re-sent any more."""
    first = write_study(tmp_path / "first", n=3)
    write_study(tmp_path / "rest", n=2, study_uid=pydicom.dcmread(first[0]).StudyInstanceUID)
    config = node_config(tmp_path, egress={"destinations": {"pacs": pacs.destination}})
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        assert storescu(node.port, tmp_path / "first").returncode == 0
        partial = final_job(node, 1)
        assert partial.state is JobState.DONE
        (first_result,) = [d.sent_uid for d in node.deliveries(1) if d.object == "result.dcm"]
        assert storescu(node.port, tmp_path / "rest").returncode == 0
        wait_until(lambda: len(node.jobs()) == 2, timeout=30)
        whole = final_job(node, 2)
        deliveries = {d.object: d for d in node.deliveries(2)}
        old_events, new_events = node.events(1), node.events(2)
        with pytest.raises(ValueError, match="superseded by job 2"):
            node.egress.resend(1, user="test", reason="an operator's mistake")  # type: ignore[union-attr]
    assert whole.state is JobState.DONE and whole.instances == 2
    assert (config.data_dir / "outbox" / "2" / "manifest.json").read_text() == '{"inputs": 5}'
    assert set(deliveries) == {"result.dcm", "rejection-note.dcm"}
    assert all(d.state == "done" for d in deliveries.values())
    assert deliveries["rejection-note.dcm"].id > deliveries["result.dcm"].id  # the new result goes first

    received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in pacs.received()}
    assert first_result in received and deliveries["result.dcm"].sent_uid in received
    note = pydicom.dcmread(received[deliveries["rejection-note.dcm"].sent_uid])
    assert note.Modality == "KO" and note.ConceptNameCodeSequence[0].CodeValue == "113001"
    assert rejected_uids(note) == {first_result}
    assert dciodvfy_errors(received[deliveries["rejection-note.dcm"].sent_uid]) == []

    assert "superseded" in [e.kind for e in old_events]
    assert "superseded by job 2 (version 2" in next(e.message for e in old_events if e.kind == "superseded")
    kinds = [e.kind for e in new_events]
    assert kinds.index("supersedes") < kinds.index("withdraw") < kinds.index("done")


def test_a_first_version_withdraws_nothing(tmp_path: Path, stand_in: list[str], pacs: StoreSCP) -> None:
    write_study(tmp_path / "study", n=3)
    config = node_config(tmp_path, egress={"destinations": {"pacs": pacs.destination}})
    with Node(config, job_command=stand_in, poll_seconds=0.05) as node:
        assert storescu(node.port, tmp_path / "study").returncode == 0
        job = final_job(node, 1)
        assert [d.object for d in node.deliveries(1)] == ["result.dcm"]
        assert not {"superseded", "supersedes", "withdraw"} & {e.kind for e in node.events(1)}
    assert job.state is JobState.DONE


def test_a_superseded_job_with_its_fhir_bundle_still_pending_is_withdrawn_where_its_dicom_objects_went(
        tmp_path: Path, pacs: StoreSCP) -> None:
    """The first job's DICOM results reached the PACS, its FHIR Bundle is still queued (the EHR is down) when the
    re-run's results come: the re-run is staged, and its rejection note withdraws the first job's DICOM objects at
    the PACS, nothing at the EHR (a Bundle has no SOP Instance to reject; the re-run re-issues the report)."""
    config = egress_test_config(tmp_path, {"pacs": pacs.destination, "ehr": f"fhir:http://127.0.0.1:{free_port()}"})
    store = JobStore(tmp_path / "data" / "radnode.db")
    egress = Egress(config, store)
    first = study_version_job(store, "1.1")
    first_uids = write_results(tmp_path / "first", bundle=PATIENT_BUNDLE)
    egress.stage(first, tmp_path / "first")
    wait_until(lambda: egress.deliver_due() or all(d.state == "done" for d in store.deliveries(first)
                                                   if d.destination == "pacs"))
    assert store.job(first).state is JobState.DELIVERING  # the Bundle still pending
    rerun = study_version_job(store, "1.2")
    write_results(tmp_path / "rerun", bundle=PATIENT_BUNDLE)
    egress.stage(rerun, tmp_path / "rerun")
    assert store.job(rerun).state is JobState.DELIVERING
    planned = {(d.destination, d.object) for d in store.deliveries(rerun)}
    assert ("pacs", "rejection-note.dcm") in planned and ("ehr", "rejection-note.dcm") not in planned
    assert ("ehr", "fhir-bundle.json") in planned
    assert rejected_uids(pydicom.dcmread(outbox_dir(config, rerun) / "rejection-note.dcm")) == set(first_uids)
    store.close()


def test_a_rejection_note_that_cannot_be_written_is_logged_and_the_new_results_still_go_out(
        tmp_path: Path, pacs: StoreSCP) -> None:
    """The first job's delivered objects are no longer readable DICOM in its outbox (damaged): the re-run's note
    cannot be written; the re-run's log says so and its results are delivered all the same."""
    config = egress_test_config(tmp_path, {"pacs": pacs.destination})
    store = JobStore(tmp_path / "data" / "radnode.db")
    egress = Egress(config, store)
    first = study_version_job(store, "1.1")
    write_results(tmp_path / "first")
    egress.stage(first, tmp_path / "first")
    wait_until(lambda: egress.deliver_due() or store.job(first).state is JobState.DONE)
    for delivered in outbox_dir(config, first).glob("*.dcm"):
        delivered.write_bytes(b"not DICOM any more")
    rerun = study_version_job(store, "1.2")
    rerun_uids = write_results(tmp_path / "rerun")
    egress.stage(rerun, tmp_path / "rerun")
    assert [d.object for d in store.deliveries(rerun) if d.object == "rejection-note.dcm"] == []
    assert not (outbox_dir(config, rerun) / "rejection-note.dcm").exists()
    (error,) = [e.message for e in store.events(rerun) if e.kind == "withdraw-error"]
    assert error.startswith(f"job {first}'s results cannot be withdrawn: rejection note not written (")
    wait_until(lambda: egress.deliver_due() or store.job(rerun).state is JobState.DONE)
    assert set(rerun_uids) <= set(pacs.received_uids())
    store.close()


def test_a_reviewers_rejection_note_is_never_withdrawn_by_the_next_versions_note(tmp_path: Path,
                                                                                  pacs: StoreSCP) -> None:
    """A reviewer rejected the first job's results (``review-1/rejection-note.dcm`` at the PACS), then a re-run
    superseded them: the re-run's note withdraws the first job's results, never the reviewer's note."""
    config = egress_test_config(tmp_path, {"pacs": pacs.destination})
    store = JobStore(tmp_path / "data" / "radnode.db")
    egress = Egress(config, store)
    first = study_version_job(store, "1.1")
    first_uids = write_results(tmp_path / "first")
    egress.stage(first, tmp_path / "first")
    wait_until(lambda: egress.deliver_due() or store.job(first).state is JobState.DONE)
    assert "rejection-note.dcm → pacs" in egress.decide(first, "dr-x", "", "rejected", "wrong-anatomy")
    (review,) = [r.id for r in store.review_rows()]
    wait_until(lambda: egress.deliver_due() or store.job(first).state is JobState.DONE)
    (reviewers,) = [d for d in store.deliveries(first) if d.object == f"review-{review}/rejection-note.dcm"]
    assert reviewers.state == "done" and reviewers.sent_uid
    rerun = study_version_job(store, "1.2")
    write_results(tmp_path / "rerun")
    egress.stage(rerun, tmp_path / "rerun")
    assert rejected_uids(pydicom.dcmread(outbox_dir(config, rerun) / "rejection-note.dcm")) == set(first_uids)
    store.close()


def test_each_destination_gets_a_rejection_note_of_only_what_it_received(tmp_path: Path, pacs: StoreSCP) -> None:
    """The first job's report SR and SEG went to the PACS and to the archive, its Encapsulated PDF to the archive
    alone (``encapsulated_pdf``); a re-run supersedes them. Each destination's rejection note (read back from its
    storescp) references exactly what that destination received: the PACS's never the PDF it was never sent."""
    with StoreSCP(tmp_path / "archive") as archive:
        config = egress_test_config(tmp_path, {"pacs": pacs.destination,
                                               "archive": {**archive.destination, "encapsulated_pdf": True}})
        store = JobStore(tmp_path / "data" / "radnode.db")
        egress = Egress(config, store)
        first = study_version_job(store, "1.1")
        both, pdf_uid = deliver_results_and_a_pdf(egress, store, first, tmp_path / "first")
        assert {(d.destination, d.object) for d in store.deliveries(first)} >= {("archive", "report-pdf.dcm")}
        assert ("pacs", "report-pdf.dcm") not in {(d.destination, d.object) for d in store.deliveries(first)}
        rerun = study_version_job(store, "1.2")
        write_results(tmp_path / "rerun", report_sr=True)
        egress.stage(rerun, tmp_path / "rerun")
        wait_until(lambda: egress.deliver_due() or store.job(rerun).state is JobState.DONE)
        assert {(d.destination, d.object) for d in store.deliveries(rerun) if d.object.endswith("rejection-note.dcm")} \
            == {("archive", "rejection-note.dcm"), ("pacs", "rejection-2/rejection-note.dcm")}
        notes = {name: [ds for ds in map(pydicom.dcmread, peer.received()) if ds.Modality == "KO"]
                 for name, peer in (("pacs", pacs), ("archive", archive))}
        store.close()
    (at_pacs,), (at_archive,) = notes["pacs"], notes["archive"]
    assert rejected_uids(at_pacs) == selected_uids(at_pacs) == both
    assert rejected_uids(at_archive) == selected_uids(at_archive) == both | {pdf_uid}
    assert dciodvfy_errors(Path(at_pacs.filename)) == [] and dciodvfy_errors(Path(at_archive.filename)) == []


@pytest.mark.slow
def test_a_study_sent_in_two_associations_ends_with_one_whole_seg_whatever_the_pause(
        tmp_path: Path, peers: tuple[StoreSCP, FhirServer]) -> None:
    """Four chest phantoms to ``radnode serve`` (the real ct_tissue pipeline), each in two associations with a
    pause of 1, 2, 5 or 12 s between them, all at once: every time the PACS ends with a SEG covering every
    slice, any SEG or SR made from half a study is named by a rejection note the PACS received, and the FHIR
    server holds one DiagnosticReport per study (a re-run re-issues the report in place). Which pauses end in a
    restart of the running job and which in a superseded delivery depends on the machine's speed; both end so."""
    pacs, fhir = peers
    studies: dict[str, list[Path]] = {}
    for pause in PAUSES:
        files = write_chest_phantom(tmp_path / f"study-{pause}", n_slices=24, seed=pause)
        studies[str(pydicom.dcmread(files[0]).StudyInstanceUID)] = files
    node = ServeProcess(tmp_path / "node", pacs, fhir, late_instances="rerun")

    def send_in_two(files: list[Path], pause: float) -> None:
        node.send(*files[: len(files) // 2], options=())
        time.sleep(pause)
        node.send(*files[len(files) // 2:], options=())

    try:
        senders = [threading.Thread(target=send_in_two, args=(files, pause))
                   for files, pause in zip(studies.values(), PAUSES)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        jobs = node.jobs_when_final(len(studies), timeout=900)  # every job exists once the senders are done
    finally:
        node.stop()
    assert fhir.search("DiagnosticReport", "_summary=count")["total"] == len(studies)  # one report per study
    store = JobStore(node.data_dir / "radnode.db")
    sent = {job.id: [d for d in store.deliveries(job.id) if d.sent_uid] for job, _ in jobs}
    store.close()
    received = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p, stop_before_pixels=True)
                                                      for p in pacs.received())}
    rejected = set().union(*(rejected_uids(ds) for ds in received.values() if ds.Modality == "KO"))
    for study_uid, files in studies.items():
        of_study = sorted((job for job, _ in jobs if job.study_instance_uid == study_uid), key=lambda j: j.id)
        for job in of_study:
            assert job.state is JobState.DONE, f"job {job.id}: {job.reason}"
        latest, earlier = of_study[-1], of_study[:-1]
        (seg,) = [received[d.sent_uid] for d in sent[latest.id] if d.object == "seg.dcm"]
        sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        covered = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert covered == sources, f"study {study_uid}: the last SEG covers {len(covered)} of {len(sources)} slices"
        for job in earlier:  # what a job on part of the study sent is withdrawn (the note itself excepted)
            withdrawn = {d.sent_uid for d in sent[job.id] if d.object != "rejection-note.dcm"}
            assert withdrawn <= rejected, f"job {job.id} of study {study_uid}: {withdrawn - rejected} not withdrawn"
