"""Talking to a running node's web service in tests: tokens per role, authenticated requests."""

from __future__ import annotations

import httpx

from radnode.console.accounts import Role
from radnode.node.service import Node


def token_for(node: Node, role: Role | str, name: str | None = None) -> str:
    """A new API token of ``role`` on the node (named after the role unless ``name``)."""
    role = Role(role)
    return node.accounts.create_token(name or f"test-{role.value}", role)


def api(node: Node, token: str | None = None, **options: object) -> httpx.Client:
    """An HTTP client for the node's web service, authenticated with ``token`` when given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=f"http://127.0.0.1:{node.api_port}", headers=headers, timeout=30, **options)


def api_json(node: Node, path: str, token: str) -> dict:
    """GET ``path`` with ``token``; the JSON answer (raises on an error status)."""
    with api(node, token) as client:
        answer = client.get(path)
        answer.raise_for_status()
        return answer.json()
