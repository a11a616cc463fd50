"""FHIR delivery under faults: ``radnode serve`` with the real ct_tissue pipeline, a sekmet FHIR R4 server as
the EHR behind a proxy that takes 5 s to pass each POST on, and the node SIGKILLed while a POST is in flight."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from pathlib import Path

import pydicom
import pytest

from factories import write_chest_phantom
from radnode.node.store import JobState, JobStore
from radnode.peers import FhirServer, StoreSCP
from radnode.security.privacy import IdentitySeal, SiteKey
from support.node import ServeProcess
from support.slow_http import DelayingProxy
from support.waiting import wait_until

EHR_DELAY_SECONDS = 5.0
"""How long the EHR takes to answer each POST (the issue's kill scenario)."""
TRIALS = 5
"""Studies, each of whose first Bundle POST is cut short by a SIGKILL of the node."""


def _all(fhir: FhirServer, resource_type: str) -> list[dict]:
    """Every resource of this type on the server, following the search's ``next`` pages."""
    page = fhir.search(resource_type, "_count=200")
    resources = []
    while True:
        resources += [entry["resource"] for entry in page.get("entry", [])]
        following = [link["url"] for link in page.get("link", []) if link.get("relation") == "next"]
        if not following:
            return resources
        with urllib.request.urlopen(following[0], timeout=10) as answer:
            page = json.loads(answer.read())


def _identifier(resource: dict) -> str:
    """The business identifier the Bundle's conditional update or create is on: the resource's first one."""
    identifier = resource["identifier"][0]
    return f"{identifier['system']}|{identifier['value']}"


@pytest.mark.slow
def test_a_node_killed_while_the_ehr_answers_files_one_report_per_study(
        tmp_path: Path, peers: tuple[StoreSCP, FhirServer]) -> None:
    """Five chest phantoms to ``radnode serve``; each time the EHR has received a study's Bundle POST and is still
    taking its 5 s to answer, the node is SIGKILLed and started again on the same data folder (5 kills, one per
    study). The EHR files each POST it got, the killed one included, yet it ends with exactly one
    DiagnosticReport per study and each Observation once (counted by identifier), and every job is done."""
    pacs, fhir = peers
    study_uids = []
    for trial in range(TRIALS):
        files = write_chest_phantom(tmp_path / f"study-{trial}", n_slices=12, seed=trial)
        study_uids.append(str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID))
    with DelayingProxy(fhir.port, delay=EHR_DELAY_SECONDS) as proxy:
        def start() -> ServeProcess:
            return ServeProcess(tmp_path / "node", pacs, fhir, idle=0.5, fhir_url=f"http://127.0.0.1:{proxy.port}/fhir")

        def posted_studies() -> list[str]:
            return [uid for body in proxy.posted() for uid in study_uids if f"urn:oid:{uid}".encode() in body]

        node = start()
        try:
            for trial in range(TRIALS):
                node.send(*sorted((tmp_path / f"study-{trial}").iterdir()), options=())
            killed: list[str] = []
            for _ in range(TRIALS):
                # a POST of a study not yet cut short has reached the EHR, which is still taking its time
                wait_until(lambda: _no_failed_job(node) and set(posted_studies()) - set(killed), timeout=300, step=0.02)
                killed += sorted(set(posted_studies()) - set(killed))[:1]
                node.kill()
                node = start()
            jobs = node.jobs_when_final(TRIALS, timeout=300)
            wait_until(lambda: all(d.state == "done" for job, _ in jobs for d in node_deliveries(node, job.id)),
                       timeout=60)
            posts = len(proxy.posted())
        finally:
            node.stop()
        wait_until(proxy.settled, timeout=60)  # every POST relayed, the killed ones included, has been filed
    assert sorted(killed) == sorted(study_uids)  # each study's delivery was cut short once
    assert posts > TRIALS  # the killed POSTs were sent again after each restart
    assert all(job.state is JobState.DONE for job, _ in jobs), [(job.id, job.reason) for job, _ in jobs]

    reports = _all(fhir, "DiagnosticReport")
    report_ids = Counter(map(_identifier, reports))
    assert len(reports) == TRIALS and len(report_ids) == TRIALS, report_ids
    studies = _all(fhir, "ImagingStudy")
    assert Counter(map(_identifier, studies)) == Counter(
        f"urn:dicom:uid|urn:oid:{uid}" for uid in study_uids)
    observations = _all(fhir, "Observation")
    observation_ids = Counter(map(_identifier, observations))
    assert observations and set(observation_ids.values()) == {1}, [i for i, n in observation_ids.items() if n > 1]


def _store(node: ServeProcess) -> JobStore:
    return JobStore(node.data_dir / "radnode.db", seal=IdentitySeal(SiteKey.load(None, node.data_dir)))


def node_deliveries(node: ServeProcess, job_id: int) -> list:
    """The job's deliveries as the node's store holds them."""
    store = _store(node)
    try:
        return store.deliveries(job_id)
    finally:
        store.close()


def _no_failed_job(node: ServeProcess) -> bool:
    """True while no job has failed (a failed one ends the wait at once, with its reason)."""
    if not (node.data_dir / "radnode.db").exists():
        return True
    store = _store(node)
    try:
        failed = [(job.id, job.reason) for job in store.jobs() if job.state is JobState.FAILED]
    finally:
        store.close()
    assert not failed, failed
    return True
