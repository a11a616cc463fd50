"""A reviewed study's results go out again, as deliveries like any other: a verified report SR, an IOCM
rejection note, and the FHIR report's new status.

The run's report went out preliminary: the report SR (``report-sr.dcm``, series 903) with Completion Flag
PARTIAL and Verification Flag UNVERIFIED, the FHIR DiagnosticReport ``preliminary``. A reviewer's decision
(``POST /api/jobs/{id}/review``) is written into the job's outbox as a folder of its own,
``review-<review id>/`` (:func:`write_reissue`), and egress delivers its files with the destinations' retries
(:meth:`radnode.node.egress.Egress.decide`):

- ``accepted`` / ``corrected``: ``report-sr.dcm``, a new SOP Instance in the report's series: Completion Flag
  COMPLETE, Verification Flag VERIFIED with the reviewer as Verifying Observer (organisation from the config),
  Preliminary Flag FINAL, and a Predecessor Documents Sequence naming the version it replaces;
- ``rejected``: IHE IOCM rejection notes (KOS, Rejected for Quality Reasons), each destination's withdrawing
  the DICOM objects the job delivered to it: ``rejection-note.dcm``, and ``rejection-<n>/rejection-note.dcm``
  for destinations that received other objects (the Encapsulated PDF only some take, say);
- each: ``fhir-reissue.json`` (:data:`REPORT_REISSUE`), which a FHIR destination applies to the report it holds
  (:func:`reissue`): ``final``, ``amended`` or ``entered-in-error``, the reviewer as ``resultsInterpreter``.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from radnode.destinations.base import FHIR_BUNDLE
from radnode.destinations.credentials import http_session
from radnode.outputs.algorithm import new_uid
from radnode.outputs.layout import RunOutput, review_folder
from radnode.outputs.rejection import write_rejection_note

REISSUED_STATUS = {"accepted": "final", "corrected": "amended", "rejected": "entered-in-error"}
"""The FHIR status a decision gives the DiagnosticReport and its Observations."""

REPORT_SR = RunOutput.REPORT_SR.file
REPORT_REISSUE = RunOutput.REPORT_REISSUE.file


class ReissueError(RuntimeError):
    """The report could not be re-issued on a server (the message says where and why)."""


def report_identifier(outbox: Path) -> dict[str, str] | None:
    """The identifier of the run's DiagnosticReport in its outbox Bundle (None: the run wrote no report)."""
    try:
        bundle = json.loads((outbox / FHIR_BUNDLE).read_text())
    except (OSError, ValueError):
        return None
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "DiagnosticReport" and resource.get("identifier"):
            return resource["identifier"][0]
    return None


def verified_report(previous: Dataset, *, reviewer: str, organization: str, uid_root: str,
                    instance_number: int, at: datetime.datetime) -> Dataset:
    """The report SR ``previous`` verified by ``reviewer``: the same content as a new SOP Instance of its series,
    complete, verified, final, with ``previous`` as its predecessor (PS3.3 C.17.2, SR Document General)."""
    report = copy.deepcopy(previous)
    uid = new_uid(uid_root)
    report.SOPInstanceUID = uid
    report.file_meta.MediaStorageSOPInstanceUID = uid
    report.InstanceNumber = instance_number
    date, time = at.strftime("%Y%m%d"), at.strftime("%H%M%S")
    report.InstanceCreationDate, report.InstanceCreationTime = date, time
    report.ContentDate, report.ContentTime = date, time
    report.CompletionFlag = "COMPLETE"
    report.VerificationFlag = "VERIFIED"
    report.PreliminaryFlag = "FINAL"
    observer = Dataset()
    observer.VerifyingObserverName = reviewer
    observer.VerifyingObserverIdentificationCodeSequence = DicomSequence()
    observer.VerifyingOrganization = organization
    observer.VerificationDateTime = at.strftime("%Y%m%d%H%M%S")
    report.VerifyingObserverSequence = DicomSequence([observer])
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = previous.SOPClassUID
    referenced.ReferencedSOPInstanceUID = previous.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = previous.SeriesInstanceUID
    series.ReferencedSOPSequence = DicomSequence([referenced])
    predecessor = Dataset()
    predecessor.StudyInstanceUID = previous.StudyInstanceUID
    predecessor.ReferencedSeriesSequence = DicomSequence([series])
    report.PredecessorDocumentsSequence = DicomSequence([predecessor])
    return report


@dataclass(frozen=True)
class Decision:
    """A reviewer's decision on a job's results, as it is re-issued."""

    review_id: int
    decision: str
    """``accepted``, ``corrected`` or ``rejected``."""
    reviewer: str
    at: datetime.datetime


def _write_durably(target: Path, write) -> None:  # type: ignore[no-untyped-def]
    """``write(path)`` into a partial file, fsync'd, then renamed into place (an existing one is kept: the
    decision was written before, and the same SOP Instance UID goes out)."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    write(partial)
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    os.replace(partial, target)


def write_reissue(outbox: Path, decision: Decision, *, previous_report: Path | None, instance_number: int,
                  withdrawn: dict[str, list[Path]], fhir: bool, organization: str, uid_root: str,
                  institution_name: str | None) -> list[str]:
    """Write a decision's objects into ``outbox/review-<id>/``: the verified report SR (from
    ``previous_report``, the latest version that went out) when accepted or corrected, the rejection notes
    ``withdrawn`` names when rejected (note file in the folder → the objects it withdraws: one per set of objects
    destinations received, :func:`radnode.node.egress.rejection_notes`), and the FHIR re-issue when ``fhir``;
    returns their delivery objects (paths relative to ``outbox``). Written once: a repeated call keeps what is
    there."""
    folder = outbox / review_folder(decision.review_id)
    written = []
    if decision.decision == "rejected":
        for note, objects in withdrawn.items():
            _write_durably(folder / note, functools.partial(
                write_rejection_note, objects, uid_root=uid_root, institution_name=institution_name,
                description=f"Rejected for Quality Reasons (rejected by {decision.reviewer})"))
            written.append(note)
    elif previous_report is not None:
        report = verified_report(pydicom.dcmread(previous_report), reviewer=decision.reviewer,
                                 organization=organization, uid_root=uid_root, instance_number=instance_number,
                                 at=decision.at)
        _write_durably(folder / REPORT_SR, lambda path: report.save_as(path, enforce_file_format=True))
        written.append(REPORT_SR)
    if fhir:
        identifier = report_identifier(outbox)
        if identifier is not None:
            document = {"identifier": identifier, "decision": decision.decision,
                        "status": REISSUED_STATUS[decision.decision], "reviewer": decision.reviewer}
            _write_durably(folder / REPORT_REISSUE, lambda path: path.write_text(json.dumps(document, indent=1)))
            written.append(REPORT_REISSUE)
    return [f"{folder.name}/{name}" for name in written]


def reissue(url: str, auth, document: dict, timeout: tuple[float, float] = (10.0, 60.0)) -> str:  # type: ignore[no-untyped-def]
    """Apply a re-issue (``fhir-reissue.json``'s ``document``) on the FHIR server at ``url``: read the report by
    its identifier, set its ``status`` and ``resultsInterpreter``, update it in place (``PUT`` by id), then its
    Observations' status likewise: read, change, update, so nothing else the server holds is lost and a repeated
    re-issue changes nothing twice. What was done, in words; ReissueError when the server cannot be read or
    updated or does not hold the report."""
    import requests

    identifier, status, reviewer = document["identifier"], document["status"], document["reviewer"]
    base = url.rstrip("/")
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}

    def call(method: str, path: str, body: dict | None = None, params: dict | None = None) -> dict:
        try:
            answer = session.request(method, f"{base}/{path}", params=params, headers=headers, timeout=timeout,
                                     data=None if body is None else json.dumps(body))
        except (requests.RequestException, OSError) as e:
            raise ReissueError(f"{method} {base}/{path}: {e}") from None
        if not 200 <= answer.status_code < 300:
            raise ReissueError(f"{method} {base}/{path}: HTTP {answer.status_code} {answer.text[:200]}")
        return answer.json()

    with http_session(auth) as session:
        found = call("GET", "DiagnosticReport",
                     params={"identifier": f"{identifier['system']}|{identifier['value']}"}).get("entry") or []
        if len(found) != 1:
            raise ReissueError(f"{base} holds {len(found)} DiagnosticReport(s) with identifier {identifier['value']}")
        report = found[0]["resource"]
        report["status"] = status
        report["resultsInterpreter"] = [{"display": reviewer}]
        call("PUT", f"DiagnosticReport/{report['id']}", report)
        results = [r["reference"] for r in report.get("result") or [] if r.get("reference")]
        for reference in results:
            observation = call("GET", reference)
            observation["status"] = status
            call("PUT", reference, observation)
    return f"DiagnosticReport/{report['id']} and {len(results)} Observation(s) {status} on {base}, by {reviewer}"
