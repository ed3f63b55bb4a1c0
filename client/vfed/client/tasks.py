"""Task creation, waiting and results: the encrypting and decrypting half of the researcher client."""

from __future__ import annotations

import asyncio
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
# Polling for a task's end: quick at first (most tasks are short, and each step of the schedule is latency
# the researcher waits), slower once the task has run a while, so a long wait costs the server little.
POLL_FIRST_S, POLL_FAST_CAP_S, POLL_FAST_FOR_S, POLL_SLOW_CAP_S = 0.05, 0.1, 5.0, 2.0


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
    blob_id = await client.api.upload_blob(envelope)
    body: dict[str, Any] = await client.api.request(
        "POST",
        "/tasks",
        json={
            "collaboration_id": collaboration,
            "name": name,
            "description": description,
            "image": image,
            "datasets": datasets,
            "organizations": [{"id": o, "input_blob_id": blob_id} for o in organizations],
        },
    )
    return body


async def wait(client: AsyncClient, task_id: int, timeout_s: float | None, progress: bool) -> dict[str, Any]:
    started = time.monotonic()
    deadline = None if timeout_s is None else started + timeout_s
    delay_s = POLL_FIRST_S
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
            runs = await client.runs(task_id)
            done = sum(1 for r in runs if r["status"] in FINISHED)
            bar.update(tracker, total=len(runs), completed=done)
            if runs and done == len(runs):
                return await client.task(task_id)
            if deadline is not None and time.monotonic() >= deadline:
                raise TaskTimeout(f"task {task_id}: {done} of {len(runs)} runs finished after {timeout_s} s")
            await asyncio.sleep(delay_s)
            cap_s = POLL_FAST_CAP_S if time.monotonic() - started < POLL_FAST_FOR_S else POLL_SLOW_CAP_S
            delay_s = min(delay_s * 1.5, cap_s)


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
