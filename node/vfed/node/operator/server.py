"""The few server calls the operator tool makes, with the node's own API key (docs/api.md)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import requests

from vfed.common.crypto import Keyring
from vfed.common.trust import SignedEntry, records_for_keys
from vfed.node.config import NodeSettings
from vfed.node.keys import NO_KEY_RECORDS, KeyMismatch, check_served_chain
from vfed.node.log_sealing import seal_run_log_now
from vfed.node.operator.common import OperatorError

TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Session:
    """A node login: the bearer token and who the server says we are."""

    base: str
    token: str
    node_id: int
    organization_id: int
    verify: str | bool = True
    """The CA file an https:// server's certificate is checked against (True: the system's CAs)."""


class ServerRefused(OperatorError):
    """The server answered with an error status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def ca_verify(settings: NodeSettings) -> str | bool:
    """requests' `verify`: the configured server_ca_file, else the system's CAs (never off)."""
    return str(settings.server_ca_file) if settings.server_ca_file is not None else True


def _call(
    method: str,
    url: str,
    *,
    token: str | None = None,
    json: Any = None,
    params: dict[str, Any] | None = None,
    verify: str | bool = True,
) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        resp = requests.request(
            method, url, json=json, params=params, headers=headers, timeout=TIMEOUT_S, verify=verify
        )
    except requests.exceptions.SSLError as exc:
        where = f"the CA file {verify}" if isinstance(verify, str) else "the system's CAs"
        raise OperatorError(
            f"TLS with {url} failed ({_ssl_reason(exc)}): server_url's host must be in the server's "
            f"certificate, and the certificate must verify with {where} (server_ca_file)"
        ) from None
    except OSError as exc:  # a CA file that cannot be read
        raise OperatorError(f"server_ca_file {verify}: {exc.strerror or exc}") from None
    except requests.RequestException as exc:
        raise OperatorError(f"server not reachable at {url}: {exc.__class__.__name__}") from None
    if resp.status_code >= 400:
        try:
            body = resp.json()
            why = f"{body.get('error')}: {body.get('detail')}"
        except ValueError:
            why = resp.text[:200]
        raise ServerRefused(f"server answered {resp.status_code} to {method} {url}: {why}", resp.status_code)
    try:
        return resp.json()
    except ValueError:
        raise OperatorError(f"server answered {method} {url} with something that is not JSON") from None


def login(settings: NodeSettings) -> Session:
    base = settings.server_url + "/api/v1"
    checked = ca_verify(settings)
    body = _call(
        "POST", base + "/token/node", json={"api_key": settings.api_key.get_secret_value()}, verify=checked
    )
    try:
        return Session(
            base, str(body["access_token"]), int(body["node_id"]), int(body["organization_id"]), checked
        )
    except (KeyError, TypeError, ValueError):
        raise OperatorError(
            "the server's token answer lacks access_token, node_id or organization_id"
        ) from None


def node_status(settings: NodeSettings) -> str:
    """'online' or 'offline' as the server sees the node; 'unknown' when the server cannot be asked."""
    try:
        session = login(settings)
        node = _call(
            "GET", f"{session.base}/nodes/{session.node_id}", token=session.token, verify=session.verify
        )
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
        verify=session.verify,
        json={"public_key": public_key},
    )
    return org if isinstance(org, dict) else {}


def mark_killed(
    settings: NodeSettings, run_ids: list[int], reason: str, logs: dict[int, str], keyring: Keyring | None
) -> list[int]:
    """Mark our runs killed (as the claiming node); returns the ids the server accepted. A run's log goes
    along sealed to our organization when `keyring` is there (log_sealing), never in plaintext."""
    if not run_ids:
        return []
    session = login(settings)
    done = []
    for run_id in run_ids:
        body: dict[str, Any] = {"status": "killed", "reason": reason}
        if logs.get(run_id) and keyring is not None:
            with contextlib.suppress(OperatorError):
                task_id = int(get_run(session, run_id).get("task_id", 0))
                body["sealed_log"] = seal_run_log_now(
                    logs[run_id], keyring, [], session.organization_id, task_id, run_id
                )
        try:
            _call(
                "PATCH",
                f"{session.base}/runs/{run_id}",
                token=session.token,
                verify=session.verify,
                json=body,
            )
            done.append(run_id)
        except OperatorError:
            continue  # already final (completed just now, or killed by the agent itself)
    return done


def get_run(session: Session, run_id: int) -> dict[str, Any]:
    """`GET /runs/{id}` as this node sees it (a run of its organization)."""
    answer = _call("GET", f"{session.base}/runs/{run_id}", token=session.token, verify=session.verify)
    if not isinstance(answer, dict):
        raise OperatorError(f"the server's answer for run {run_id} is not an object")
    return answer


def _data(answer: Any, what: str) -> list[Any]:
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):
        raise OperatorError(f"the server's answer for {what} is not {{'data': [...]}}")
    return data


def publish_key_chain(settings: NodeSettings, keyring: Keyring) -> list[SignedEntry]:
    """Publish the key records of our chain the server lacks (after checking what it holds against our first
    key); a server without key records gets the current public key instead. Answers what was published."""
    session = login(settings)
    url = f"{session.base}/organizations/{session.organization_id}/key-records"
    try:
        served = _data(_call("GET", url, token=session.token, verify=session.verify), "key records")
    except ServerRefused as exc:
        if exc.status not in NO_KEY_RECORDS:
            raise
        upload_public_key(settings, keyring.current.public.to_text())
        return []
    try:
        held = check_served_chain(session.organization_id, keyring, served, settings.key_path)
    except KeyMismatch as exc:
        raise OperatorError(str(exc)) from None
    missing = records_for_keys(session.organization_id, keyring.keys)[held:]
    if missing:
        body = {"records": [r.model_dump(mode="json") for r in missing]}
        _call("POST", url, token=session.token, verify=session.verify, json=body)
    with contextlib.suppress(ServerRefused):  # the plain key field, for clients that still read it
        upload_public_key(settings, keyring.current.public.to_text())
    return missing


def post_certificate(settings: NodeSettings, certificate: SignedEntry) -> dict[str, Any]:
    session = login(settings)
    url = f"{session.base}/organizations/{session.organization_id}/certificates"
    answer = _call(
        "POST",
        url,
        token=session.token,
        verify=session.verify,
        json={"certificate": certificate.model_dump(mode="json")},
    )
    return answer if isinstance(answer, dict) else {}


def certificates(settings: NodeSettings, user_id: int | None = None) -> tuple[int, list[dict[str, Any]]]:
    """(our organization id, its certificates as the server lists them, optionally of one user)."""
    session = login(settings)
    url = f"{session.base}/organizations/{session.organization_id}/certificates"
    params = {"user_id": user_id} if user_id is not None else None
    rows = _data(_call("GET", url, token=session.token, verify=session.verify, params=params), "certificates")
    return session.organization_id, [r for r in rows if isinstance(r, dict)]


def post_revocation(settings: NodeSettings, revocation: SignedEntry) -> None:
    session = login(settings)
    url = f"{session.base}/organizations/{session.organization_id}/revocations"
    _call(
        "POST",
        url,
        token=session.token,
        verify=session.verify,
        json={"revocation": revocation.model_dump(mode="json")},
    )


def organization_id(settings: NodeSettings) -> int:
    return login(settings).organization_id


def user_name(settings: NodeSettings, user_id: int) -> str:
    """The user's name as the server knows it, or "" when the node may not read it."""
    session = login(settings)
    try:
        user = _call("GET", f"{session.base}/users/{user_id}", token=session.token, verify=session.verify)
    except OperatorError:
        return ""
    name = user.get("username") if isinstance(user, dict) else None
    return name if isinstance(name, str) else ""


def organizations_named(session: Session, name: str) -> list[dict[str, Any]]:
    """The organizations the server shows this node under `name` (rows of GET /organizations?name=)."""
    answer = _call(
        "GET",
        f"{session.base}/organizations",
        token=session.token,
        verify=session.verify,
        params={"name": name},
    )
    rows = answer.get("data") if isinstance(answer, dict) else None
    return [r for r in rows or [] if isinstance(r, dict) and r.get("name") == name]


def _ssl_reason(exc: requests.exceptions.SSLError) -> str:
    """The innermost reason of a TLS failure (requests nests it in urllib3's errors)."""
    found: BaseException | None = exc
    while found is not None:
        reason = getattr(found, "reason", None)
        if isinstance(reason, BaseException):
            found = reason
            continue
        args = getattr(found, "args", ())
        if args and isinstance(args[0], BaseException):
            found = args[0]
            continue
        break
    return str(found or exc).splitlines()[0][:300]
