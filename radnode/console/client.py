"""The CLI's side of the console: ``radnode jobs|queue|study …`` talk to a running node through its API.

The node's URL comes from ``--url`` or the configuration (``api.host``/``api.port``, https with ``api.tls``);
the token from ``--token``, ``$RADNODE_TOKEN`` or ``--token-file`` (never a command-line argument in a
script: it shows in the process list). An error answer ends the command with its reason.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from radnode.config import Config
from radnode.console.schemas import WITHHELD

TOKEN_ENV = "RADNODE_TOKEN"


class ApiError(RuntimeError):
    """The node refused or could not be reached; the message says which and why."""


@dataclass
class NodeClient:
    url: str
    token: str
    verify: bool | str = True
    timeout: float = 30.0

    @classmethod
    def from_options(cls, config: Config, url: str | None, token: str | None, token_file: str | None,
                     ca_bundle: str | None = None) -> "NodeClient":
        if url is None:
            host = "127.0.0.1" if config.api.host in ("0.0.0.0", "::") else config.api.host
            url = f"{'https' if config.api.tls else 'http'}://{host}:{config.api.port}"
        if token is None and token_file:
            token = Path(token_file).read_text().strip()
        token = token or os.environ.get(TOKEN_ENV)
        if not token:
            raise ApiError(f"no API token: pass --token-file FILE or set ${TOKEN_ENV} (radnode tokens create NAME --role operator)")
        return cls(url.rstrip("/"), token, ca_bundle or True)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             params: dict[str, Any] | None = None, text: bool = False) -> Any:
        try:
            answer = requests.request(method, self.url + path, json=body, params=params, timeout=self.timeout,
                                      headers={"Authorization": f"Bearer {self.token}"}, verify=self.verify)
        except requests.RequestException as e:
            raise ApiError(f"cannot reach the node at {self.url}: {e}") from None
        if answer.status_code >= 400:
            try:
                detail = answer.json().get("detail")
            except ValueError:
                detail = answer.text[:200]
            raise ApiError(f"{method} {path}: {answer.status_code} {detail if isinstance(detail, str) else json.dumps(detail)}")
        return answer.text if text else answer.json()


def _text(document: dict[str, Any], field: str) -> str:
    """A document's free-text field, or the marker when the node withheld it from this token's role."""
    return f"({WITHHELD})" if field in document.get("withheld", []) else document.get(field) or ""


def job_line(job: dict[str, Any]) -> str:
    """One job as ``radnode jobs list`` prints it."""
    review = {True: "flagged", False: "", None: ""}[job["needs_review"]]
    if review and job.get("reviewed_by"):
        review = f"reviewed by {job['reviewed_by']}"
    patient, reason = job.get("patient_id"), _text(job, "reason")
    return (f"{job['id']:>6}  {job['state']:<10} {job['pipeline'] or '-':<12} {job['priority']:<8} "
            f"{job['created_at'][:19]}Z  {','.join(job.get('modalities') or []) or '-':<6} "
            + (f"{patient:<14} " if patient is not None else "")
            + f"{job['study_instance_uid']}  {review}{'  ' + reason if reason else ''}")


def job_text(job: dict[str, Any]) -> str:
    """One job with its deliveries and events, as ``radnode jobs show`` prints it."""
    lines = [job_line(job), ""]
    for key in ("study_description", "accession_number", "calling_ae", "peer_address", "instances", "runs",
                "updated_at", "failure"):
        if job.get(key) not in (None, ""):
            lines.append(f"  {key.replace('_', ' ')}: {job[key]}")
    if job["deliveries"]:
        lines.append("deliveries:")
        for d in job["deliveries"]:
            lines.append(f"  {d['destination']}  {d['object']}  {d['state']}  attempts {d['attempts']}"
                         + (f"  last error: {error}" if (error := _text(d, "last_error")) else ""))
    lines.append("events:")
    lines += [f"  {e['at'][:19]}Z  {e['kind']:<14} {_text(e, 'message')}" for e in job["events"]]
    return "\n".join(lines)
