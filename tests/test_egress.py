"""Egress against real peers: DCMTK storescp as the PACS, a sekmet FHIR R4 server as the EHR."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom

from factories import PATIENT_BUNDLE, write_study
from radnode.config import Config, DicomPeer
from radnode.node.egress import Egress, outbox_dir
from radnode.node.store import Instance, JobState, JobStore
from radnode.pipelines.routing import SeriesDecision
from radnode.peers import FhirServer, StoreSCP, free_port
from support.node import patients
from support.waiting import wait_until


def finished_job(store: JobStore, tmp_path: Path, calling_ae: str = "SCANNER") -> tuple[int, Path, list[str]]:
    """A job whose run just ended, with two DICOM outputs, a FHIR Bundle and a manifest in ``out/``."""
    _, job_id = store.record_instance(
        Instance("1.2.3.1", "1.2.3", "1.2.3.4", "P1", "CT", "1.2.840.10008.5.1.4.1.1.2", "/spool/x.dcm",
                 calling_ae, "127.0.0.1:5000", "a1", 0.0), SeriesDecision(("ct_tissue",)))
    store.queue_complete_studies(idle_seconds=1)
    store.start_job(job_id, "run")
    out = tmp_path / "out"
    results = write_study(out, n=2)
    (out / "fhir-bundle.json").write_text(json.dumps(PATIENT_BUNDLE))
    (out / "manifest.json").write_text("{}")
    return job_id, out, [pydicom.dcmread(p).SOPInstanceUID for p in results]


def egress_config(tmp_path: Path, **egress: object) -> Config:
    settings = {"retry_initial_seconds": 0.1, "retry_max_seconds": 0.4, "max_attempts": 30, "timeout_seconds": 5}
    return Config.model_validate({"data_dir": str(tmp_path / "data"), "egress": {**settings, **egress}})


def deliver_until_settled(egress: Egress, store: JobStore, job_id: int, timeout: float = 20.0) -> JobState:
    """Drive egress the way the node's egress thread does, until the job is final."""
    def settled() -> bool:
        egress.deliver_due()
        job = store.job(job_id)
        return job is not None and job.state in (JobState.DONE, JobState.FAILED)

    wait_until(settled, timeout, step=0.05)
    job = store.job(job_id)
    assert job is not None
    return job.state


def test_results_reach_pacs_fhir_and_outbox(tmp_path: Path, pacs: StoreSCP, fhir: FhirServer) -> None:
    config = egress_config(tmp_path, destinations=[pacs.peer.model_dump()], fhir_url=fhir.base_url)
    store = JobStore(tmp_path / "data" / "radnode.db")
    job_id, out, uids = finished_job(store, tmp_path)
    egress = Egress(config, store)
    egress.stage(job_id, out)
    assert sorted(p.name for p in outbox_dir(config, job_id).iterdir()) == sorted(p.name for p in out.iterdir())
    assert deliver_until_settled(egress, store, job_id) is JobState.DONE
    assert sorted(pacs.received_uids()) == sorted(uids)
    assert patients(fhir) == 1
    assert all(d.state == "done" and d.attempts == 1 for d in store.deliveries(job_id))
    store.close()


def test_destination_down_then_up_gets_results_after_retries(tmp_path: Path) -> None:
    port = free_port()
    config = egress_config(tmp_path, destinations=[DicomPeer(ae_title="PACS", host="127.0.0.1", port=port).model_dump()])
    store = JobStore(tmp_path / "data" / "radnode.db")
    job_id, out, uids = finished_job(store, tmp_path)
    egress = Egress(config, store)
    egress.stage(job_id, out)
    wait_until(lambda: egress.deliver_due() or all(d.attempts >= 3 for d in store.deliveries(job_id)))
    job = store.job(job_id)
    assert job is not None and job.state is JobState.DELIVERING
    assert all("association with PACS@127.0.0.1" in (d.last_error or "") for d in store.deliveries(job_id))
    with StoreSCP(tmp_path / "pacs", port=port) as pacs:
        assert deliver_until_settled(egress, store, job_id) is JobState.DONE
        assert sorted(pacs.received_uids()) == sorted(uids)
    assert all(d.attempts >= 4 and d.last_error is None for d in store.deliveries(job_id))
    store.close()


def test_attempts_exhausted_fail_the_job_results_stay_in_outbox(tmp_path: Path, fhir: FhirServer) -> None:
    down = DicomPeer(ae_title="PACS", host="127.0.0.1", port=free_port())
    config = egress_config(tmp_path, destinations=[down.model_dump()], fhir_url=fhir.base_url, max_attempts=2)
    store = JobStore(tmp_path / "data" / "radnode.db")
    job_id, out, _ = finished_job(store, tmp_path)
    egress = Egress(config, store)
    egress.stage(job_id, out)
    assert deliver_until_settled(egress, store, job_id) is JobState.FAILED
    job = store.job(job_id)
    assert job is not None and job.reason is not None
    assert f"to dicom:{down} failed after 2 attempts: association with {down}" in job.reason
    assert patients(fhir) == 1  # the destination that worked got its delivery
    shutil.rmtree(out)
    assert (outbox_dir(config, job_id) / "fhir-bundle.json").is_file()
    assert len(list(outbox_dir(config, job_id).glob("*.dcm"))) == 2
    store.close()


def test_return_to_sender_uses_the_known_address_of_the_calling_ae(tmp_path: Path, pacs: StoreSCP) -> None:
    with StoreSCP(tmp_path / "scanner", ae_title="SCANNER") as sender:
        config = egress_config(tmp_path, destinations=[pacs.peer.model_dump()], known_peers=[sender.peer.model_dump()])
        store = JobStore(tmp_path / "data" / "radnode.db")
        job_id, out, uids = finished_job(store, tmp_path, calling_ae="SCANNER")
        egress = Egress(config, store)
        egress.stage(job_id, out)
        assert deliver_until_settled(egress, store, job_id) is JobState.DONE
        assert sorted(sender.received_uids()) == sorted(pacs.received_uids()) == sorted(uids)
        store.close()
