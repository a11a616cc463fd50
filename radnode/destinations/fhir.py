"""A FHIR R4 server: the run's transaction Bundle is POSTed to the server's base URL as it is; a review
decision's re-issue (``fhir-reissue.json``) is applied to the report the server holds.

What the Bundle holds is the FHIR writer's business (:mod:`radnode.outputs.fhir`): every entry is conditional on
a business identifier stable across runs of the study (conditional update, or conditional create for the
Patient and the Devices), so a retried POST or a re-issued report updates what the server has and never
duplicates it. This type carries it as it is, with the destination's timeouts and optional authentication.
"""

from __future__ import annotations

from typing import Literal

from radnode.destinations.base import FHIR_BUNDLE, Check, Item, Outcome, SendContext
from radnode.outputs.layout import RunOutput
from radnode.destinations.credentials import HttpDestination, http_check, http_failure, http_session
from radnode.destinations.registry import destination_type
from radnode.security.secrets import SecretError


@destination_type
class FhirDestination(HttpDestination):
    """``{type: fhir, url: https://ehr.example.org/fhir, auth: {...}}``; one line: ``fhir:URL``."""

    kind = "fhir"
    type: Literal["fhir"] = "fhir"
    url: str
    """The server's base URL (the transaction endpoint)."""

    def describe(self) -> str:
        return self.url + self.authentication()

    def wants(self, name: str) -> bool:
        return name in (FHIR_BUNDLE, RunOutput.REPORT_REISSUE.file)

    def send(self, items: list[Item], context: SendContext) -> list[Outcome]:
        """POST each Bundle as ``application/fhir+json``; any 2xx answer delivers it. A re-issue is applied to
        the report the server holds (:func:`radnode.feedback.reissue.reissue`)."""
        import requests

        try:
            session = http_session(self.auth)
        except SecretError as e:
            return [Outcome(item, False, f"credentials for {self.url}: {e}") for item in items]
        outcomes: list[Outcome] = []
        timeout = (context.timeouts.connect_seconds, context.timeouts.network_seconds)
        with session:
            for item in items:  # in delivery order: a re-send's report goes before the decisions made on it
                if item.name == RunOutput.REPORT_REISSUE.file:
                    if any(not outcome.ok for outcome in outcomes):
                        outcomes.append(Outcome(item, False, f"re-issue on {self.url}: waits for the report sent "
                                                             "before it to be delivered"))
                    else:
                        outcomes.append(self._reissue(item, context))
                    continue
                try:
                    response = session.post(self.url, data=item.path.read_bytes(), timeout=timeout,
                                            headers={"Content-Type": "application/fhir+json",
                                                     "Accept": "application/fhir+json"})
                except requests.Timeout:
                    outcomes.append(Outcome(item, False, f"POST {self.url}: timed out after "
                                                         f"{context.timeouts.network_seconds:g} s"))
                    continue
                except (requests.RequestException, OSError) as e:
                    outcomes.append(Outcome(item, False, f"POST {self.url}: {http_failure(e)}"))
                    continue
                if 200 <= response.status_code < 300:
                    outcomes.append(Outcome(item, True, f"{item.name} → {self.url} (HTTP {response.status_code})"))
                else:
                    outcomes.append(Outcome(item, False, f"POST {self.url}: HTTP {response.status_code} "
                                                         f"{response.text[:200]}"))
        return outcomes

    def _reissue(self, item: Item, context: SendContext) -> Outcome:
        """Apply one review decision's re-issue to the report on this server."""
        import json

        from radnode.feedback.reissue import ReissueError, reissue

        try:
            document = json.loads(item.path.read_text())
            said = reissue(self.url, self.auth, document,
                           (context.timeouts.connect_seconds, context.timeouts.network_seconds))
        except (OSError, ValueError, KeyError, ReissueError, SecretError) as e:
            return Outcome(item, False, f"re-issue on {self.url}: {e}")
        return Outcome(item, True, said)

    def check(self, context: SendContext) -> Check:
        """``GET [base]/metadata`` with the destination's credentials: a FHIR server answers its
        CapabilityStatement (FHIR R4 RESTful API, "capabilities")."""
        answer = http_check(self, "metadata", "application/fhir+json", context)
        if isinstance(answer, Check):
            return answer
        try:
            document = answer.json()
        except ValueError:
            document = None
        if not isinstance(document, dict) or document.get("resourceType") != "CapabilityStatement":
            return Check(False, f"GET {answer.url}: HTTP {answer.status_code}, not a CapabilityStatement")
        return Check(True, f"GET {answer.url}: CapabilityStatement, FHIR {document.get('fhirVersion', '?')}")
