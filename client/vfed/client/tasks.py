"""Task creation, waiting and results: the encrypting and decrypting half of the researcher client."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from vfed.client.errors import ClientError, RunFailed, TaskTimeout
from vfed.common.crypto import decrypt_bytes, encrypt_bytes
from vfed.common.payload import TaskInput, decode_result

if TYPE_CHECKING:
    from vfed.client.client import AsyncClient

FINISHED = frozenset({"completed", "failed", "start-failed", "not-allowed", "killed", "crashed"})
LOG_TAIL_LINES = 20
WAIT_CHUNK_S = 30.0  # one long poll at most this long (the server caps it too); then ask again


async def create(
    client: AsyncClient,
    collaboration: int,
    image: str,
    method: str,
    args: list[Any],
    kwargs: dict[str, Any],
    organizations: list[int] | None,
    datasets: list[str],
    name: str,
    description: str,
) -> dict[str, Any]:
    if organizations is None:
        collab = await client.api.request("GET", f"/collaborations/{collaboration}")
        organizations = [int(o) for o in collab["organization_ids"]]
    if not organizations:
        raise ClientError("a task needs at least one target organization")
    recipients = []
    for org_id in organizations:
        key = await client.keys.current(org_id)
        if key is None:
            raise ClientError(
                f"organization {org_id} has published no public key yet (has its node started?)"
            )
        recipients.append(key)
    plaintext = TaskInput(method=method, args=args, kwargs=kwargs).to_json()
    # One payload encryption; only the content key is sealed per organization.
    envelope = encrypt_bytes(plaintext, client.keyring.current, recipients)
    fields = {
        "collaboration_id": collaboration,
        "name": name,
        "description": description,
        "image": image,
        "datasets": datasets,
        "organizations": [{"id": o} for o in organizations],
    }
    # One request: the server stores the envelope as every run's input, in the task's transaction.
    body: dict[str, Any] = await client.api.post_with_input("/tasks", fields, envelope)
    return body


async def wait(client: AsyncClient, task_id: int, timeout_s: float | None, progress: bool) -> dict[str, Any]:
    """Long polls the server, which answers as soon as every run ended or, with a progress bar to draw, as
    soon as any run changed (`since`: the state last seen; the first call only reads the state)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    version: str | None = None
    first = progress
    with Progress(
        TextColumn(f"task {task_id}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("runs"),
        TimeElapsedColumn(),
        disable=not progress,
        transient=False,
    ) as bar:
        tracker = bar.add_task("runs", total=None)
        while True:
            left_s = WAIT_CHUNK_S if deadline is None else max(0.0, deadline - time.monotonic())
            state = await _wait_once(client, task_id, 0.0 if first else min(left_s, WAIT_CHUNK_S), version)
            first = False
            runs = state["runs"]
            version = state["version"] if progress else None
            done = sum(1 for r in runs if r["status"] in FINISHED)
            bar.update(tracker, total=len(runs), completed=done)
            if state["done"]:
                return dict(state["task"])
            if deadline is not None and time.monotonic() >= deadline:
                raise TaskTimeout(f"task {task_id}: {done} of {len(runs)} runs finished after {timeout_s} s")


async def _wait_once(
    client: AsyncClient, task_id: int, timeout_s: float, since: str | None
) -> dict[str, Any]:
    params: dict[str, Any] = {"timeout_s": round(timeout_s, 3)}
    if since is not None:
        params["since"] = since
    state: dict[str, Any] = await client.api.request("GET", f"/tasks/{task_id}/wait", params=params)
    return state


async def results(client: AsyncClient, task_id: int, raise_on_failure: bool) -> list[Any]:
    out: list[Any] = []
    for run in sorted(await client.runs(task_id), key=lambda r: (r["organization_id"], r["id"])):
        if run["status"] != "completed" or not run.get("result_blob_id"):
            failure = _failure(run)
            if raise_on_failure:
                raise failure
            out.append(failure)
            continue
        out.append(await _decrypt_result(client, run))
    return out


async def _decrypt_result(client: AsyncClient, run: dict[str, Any]) -> Any:
    blob = await client.api.download_blob(str(run["result_blob_id"]))
    sender = await client.keys.lookup_for(int(run["organization_id"]))
    plaintext = decrypt_bytes(blob, client.keyring, sender)
    return decode_result(plaintext)


def _failure(run: dict[str, Any]) -> RunFailed:
    log = str(run.get("log") or "")
    tail = "\n".join(log.splitlines()[-LOG_TAIL_LINES:])
    status = str(run["status"])
    reason = str(run.get("reason") or ("still " + status if status not in FINISHED else ""))
    return RunFailed(int(run["id"]), int(run["organization_id"]), status, reason, tail)
