"""Task creation, waiting and results: the encrypting and decrypting half of the researcher client."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from vfed.client.errors import ApiError, ClientError, RunFailed, TaskTimeout
from vfed.common.crypto import PublicKey, decrypt_bytes, encrypt_bytes
from vfed.common.payload import TaskInput, decode_result

if TYPE_CHECKING:
    from vfed.client.client import AsyncClient

FINISHED = frozenset({"completed", "failed", "start-failed", "not-allowed", "killed", "crashed"})
LOG_TAIL_LINES = 20
INLINE_DECRYPT_BYTES = 256 << 10  # smaller results decrypt on the loop: a thread hop costs more
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
    plaintext = TaskInput(method=method, args=args, kwargs=kwargs).to_json()
    fields = {
        "collaboration_id": collaboration,
        "name": name,
        "description": description,
        "image": image,
        "datasets": datasets,
    }
    for fresh in (False, True):
        targets = await _recipients(client, collaboration, organizations, fresh)
        # One payload encryption; only the content key is sealed per organization.
        envelope = encrypt_bytes(plaintext, client.keyring.current, [key for _, key in targets])
        fields["organizations"] = [{"id": o, "key_id": key.key_id} for o, key in targets]
        try:
            # One request: the server stores the envelope as every run's input, in the task's transaction.
            body: dict[str, Any] = await client.api.post_with_input("/tasks", fields, envelope)
            return body
        except ApiError as exc:  # a kept key rotated meanwhile: nothing was stored; read the keys again
            if exc.status != 409 or exc.error != "stale-key" or fresh:
                raise
    raise AssertionError("unreachable: the second attempt returns or raises")


async def _recipients(
    client: AsyncClient, collaboration: int, organizations: list[int] | None, fresh: bool
) -> list[tuple[int, PublicKey]]:
    """The current public key of each target organization (default: every member), in order, from the
    collaboration's members as last listed (fresh: listed again now), not one request per organization."""
    keys = await client.keys.current_in(collaboration, refresh=fresh)
    if organizations is None:
        if not keys:  # an unknown collaboration: let the server say so
            await client.api.request("GET", f"/collaborations/{collaboration}")
        organizations = sorted(keys)
    if not organizations:
        raise ClientError("a task needs at least one target organization")
    recipients: list[tuple[int, PublicKey]] = []  # a repeated organization stays: the server refuses it
    for org_id in organizations:
        key = keys[org_id] if org_id in keys else await client.keys.current(org_id)  # 404 if invisible
        if key is None:
            raise ClientError(
                f"organization {org_id} has published no public key yet (has its node started?)"
            )
        recipients.append((org_id, key))
    return recipients


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
    """Every completed run's result is downloaded and decrypted at once (one connection each): a task's
    results arrive in the time of the slowest, not the sum; a failed run raises before any download."""
    runs = sorted(await client.runs(task_id), key=lambda r: (r["organization_id"], r["id"]))
    done = [run["status"] == "completed" and bool(run.get("result_blob_id")) for run in runs]
    failures = {i: _failure(run) for i, run in enumerate(runs) if not done[i]}
    if failures and raise_on_failure:
        raise failures[min(failures)]
    values = await asyncio.gather(*(_decrypt_result(client, run) for i, run in enumerate(runs) if done[i]))
    it = iter(values)
    return [failures[i] if i in failures else next(it) for i in range(len(runs))]


async def _decrypt_result(client: AsyncClient, run: dict[str, Any]) -> Any:
    blob, sender = await asyncio.gather(
        client.api.download_blob(str(run["result_blob_id"])),
        client.keys.lookup_for(int(run["organization_id"])),
    )
    if len(blob) <= INLINE_DECRYPT_BYTES:
        return decode_result(decrypt_bytes(blob, client.keyring, sender))
    plaintext = await asyncio.to_thread(decrypt_bytes, blob, client.keyring, sender)  # the others go on
    return await asyncio.to_thread(decode_result, plaintext)


def _failure(run: dict[str, Any]) -> RunFailed:
    log = str(run.get("log") or "")
    tail = "\n".join(log.splitlines()[-LOG_TAIL_LINES:])
    status = str(run["status"])
    reason = str(run.get("reason") or ("still " + status if status not in FINISHED else ""))
    return RunFailed(int(run["id"]), int(run["organization_id"]), status, reason, tail)
