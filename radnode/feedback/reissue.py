"""A reviewed report goes out again: the DiagnosticReport (and its Observations) on each FHIR destination get the
reviewer's status and name.

The run's report went out ``preliminary`` (``outputs/fhir.py``). After a decision (``POST
/api/jobs/{id}/review``) the node reads the report back from the FHIR server by its identifier (its first one,
stable per study and algorithm, as the run's Bundle in the outbox names it), sets ``status`` — ``final`` when accepted,
``amended`` when corrected, ``entered-in-error`` when rejected — and ``resultsInterpreter`` (the reviewer), and
updates it in place (``PUT`` by id), then its Observations' status likewise: read, change, update, so nothing
else the server holds is lost and a repeated decision changes nothing twice.
"""

from __future__ import annotations

import json
from pathlib import Path

from radnode.destinations.base import FHIR_BUNDLE
from radnode.destinations.credentials import http_session
from radnode.destinations.fhir import FhirDestination

REISSUED_STATUS = {"accepted": "final", "corrected": "amended", "rejected": "entered-in-error"}
"""The FHIR status a decision gives the DiagnosticReport and its Observations."""


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


def reissue(destination: FhirDestination, identifier: dict[str, str], decision: str, reviewer: str,
            timeout: tuple[float, float] = (10.0, 60.0)) -> str:
    """Give the report with ``identifier`` on ``destination`` the decision's status and the reviewer; what was
    done, in words; ``timeout``: (connect, read) seconds, the node's ``egress.timeouts``. Raises ReissueError when the server cannot be read or updated or does not hold the report."""
    import requests

    status = REISSUED_STATUS[decision]
    base = destination.url.rstrip("/")
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

    with http_session(destination.auth) as session:
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
