"""A FHIR R4 server: the run's transaction Bundle is POSTed to the server's base URL as it is.

What the Bundle holds is the FHIR writer's business (:mod:`radnode.outputs.fhir`): every entry is conditional on
a business identifier stable across runs of the study (conditional update, or conditional create for the
Patient and the Devices), so a retried POST or a re-issued report updates what the server has and never
duplicates it. This type carries it as it is, with the destination's timeouts and optional authentication.
"""

from __future__ import annotations

from typing import Literal

from radnode.destinations.base import FHIR_BUNDLE, Check, Item, Outcome, SendContext
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
        return name == FHIR_BUNDLE

    def send(self, items: list[Item], context: SendContext) -> list[Outcome]:
        """POST each Bundle as ``application/fhir+json``; any 2xx answer delivers it."""
        import requests

        try:
            session = http_session(self.auth)
        except SecretError as e:
            return [Outcome(item, False, f"credentials for {self.url}: {e}") for item in items]
        outcomes = []
        timeout = (context.timeouts.connect_seconds, context.timeouts.network_seconds)
        with session:
            for item in items:
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
