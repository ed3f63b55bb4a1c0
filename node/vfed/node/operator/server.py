"""The few server calls the operator tool makes, with the node's own API key (docs/api.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import requests

from vfed.node.config import NodeSettings
from vfed.node.operator.common import OperatorError

TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Session:
    """A node login: the bearer token and who the server says we are."""

    base: str
    token: str
    node_id: int
    organization_id: int


def _call(method: str, url: str, *, token: str | None = None, json: Any = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        resp = requests.request(method, url, json=json, headers=headers, timeout=TIMEOUT_S)
    except requests.RequestException as exc:
        raise OperatorError(f"server not reachable at {url}: {exc.__class__.__name__}") from None
    if resp.status_code >= 400:
        try:
            body = resp.json()
            why = f"{body.get('error')}: {body.get('detail')}"
        except ValueError:
            why = resp.text[:200]
        raise OperatorError(f"server answered {resp.status_code} to {method} {url}: {why}")
    try:
        return resp.json()
    except ValueError:
        raise OperatorError(f"server answered {method} {url} with something that is not JSON") from None


def login(settings: NodeSettings) -> Session:
    base = settings.server_url + "/api/v1"
    body = _call("POST", base + "/token/node", json={"api_key": settings.api_key.get_secret_value()})
    try:
        return Session(base, str(body["access_token"]), int(body["node_id"]), int(body["organization_id"]))
    except (KeyError, TypeError, ValueError):
        raise OperatorError(
            "the server's token answer lacks access_token, node_id or organization_id"
        ) from None


def node_status(settings: NodeSettings) -> str:
    """'online' or 'offline' as the server sees the node; 'unknown' when the server cannot be asked."""
    try:
        session = login(settings)
        node = _call("GET", f"{session.base}/nodes/{session.node_id}", token=session.token)
    except OperatorError:
        return "unknown"
    status = node.get("status") if isinstance(node, dict) else None
    return str(status) if status in ("online", "offline") else "unknown"


def upload_public_key(settings: NodeSettings, public_key: str) -> dict[str, Any]:
    """Publish our organization's public key; the server keeps the previous one in the key history."""
    session = login(settings)
    org = _call(
        "PUT",
        f"{session.base}/organizations/{session.organization_id}/public_key",
        token=session.token,
        json={"public_key": public_key},
    )
    return org if isinstance(org, dict) else {}


def mark_killed(settings: NodeSettings, run_ids: list[int], reason: str, logs: dict[int, str]) -> list[int]:
    """Mark our runs killed (as the claiming node); returns the ids the server accepted."""
    if not run_ids:
        return []
    session = login(settings)
    done = []
    for run_id in run_ids:
        body: dict[str, Any] = {"status": "killed", "reason": reason}
        if logs.get(run_id):
            body["log"] = logs[run_id]
        try:
            _call("PATCH", f"{session.base}/runs/{run_id}", token=session.token, json=body)
            done.append(run_id)
        except OperatorError:
            continue  # already final (completed just now, or killed by the agent itself)
    return done
