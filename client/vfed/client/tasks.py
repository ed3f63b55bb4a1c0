"""Task creation, waiting and results: the encrypting and decrypting half of the researcher client."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from vfed.client.errors import ApiError, ClientError, RunFailed, TaskFailed, TaskTimeout
from vfed.client.identity import Identity
from vfed.client.progress import runs_progress
from vfed.client.result_files import STREAMS_AT_ONCE, open_checked, stream_result
from vfed.client.results import OrganizationResult, ResultSet, completed_result, failed_result
from vfed.client.run_logs import log_if_readable
from vfed.common.api.resources import Run, Task, TaskWait
from vfed.common.api.statuses import TERMINAL, RunStatus, TaskStatus
from vfed.common.crypto import Keyring, PublicKey, SenderLookup, decrypt_bytes, encrypt_bytes
from vfed.common.payload import TaskInput, decode_result
from vfed.common.trust import (
    DescriptorDocument,
    Target,
    TrustError,
    input_context,
    new_body,
    result_context,
    sign_document,
)

if TYPE_CHECKING:
    from vfed.client.client import AsyncClient

T = TypeVar("T")
LOG_TAIL_LINES = 20
INLINE_DECRYPT_BYTES = 256 << 10  # smaller inputs and results are sealed and opened on the loop
WAIT_CHUNK_S = 30.0  # one long poll at most this long (the server caps it too); then ask again


class CreatedTask(Task):
    """A task this client created, with the digest of the descriptor it signed for it (its runs' results
    are bound to that digest)."""

    descriptor_digest: str


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
) -> CreatedTask:
    plaintext = TaskInput(method=method, args=args, kwargs=kwargs).to_json()
    signer = await client.identity()
    # The ledger head verified now goes into the descriptor, so a node shown another history reports a fork;
    # a fork or tampering found while syncing raises here, before anything is created.
    head = await client.ledgers.head_for_task(collaboration)
    fields: dict[str, Any] = {
        "collaboration_id": collaboration,
        "name": name,
        "description": description,
        "image": image,
        "datasets": datasets,
    }
    for fresh in (False, True):
        targets = await _recipients(client, collaboration, organizations, fresh)
        envelope, document = await _off_loop_if_big(
            len(plaintext),
            functools.partial(
                seal,
                signer,
                plaintext,
                targets,
                collaboration=collaboration,
                image=image,
                method=method,
                datasets=datasets,
                ledger=None if head is None else (head.seq, head.hash),
            ),
        )
        fields["organizations"] = [{"id": o, "key_id": key.key_id} for o, key in targets]
        fields["descriptor"] = document.to_json()
        try:
            # One request: the server stores the envelope as every run's input, in the task's transaction.
            body = await client.api.post_with_input("/tasks", fields, envelope)
        except ApiError as exc:  # a chain's head rotated meanwhile: nothing was stored; read the chains again
            if exc.status != 409 or exc.error != "stale-key" or fresh:
                raise
            continue
        task = CreatedTask.model_validate({**body, "descriptor_digest": document.digest})
        client.descriptor_digests[task.id] = document.digest
        return task
    raise AssertionError("unreachable: the second attempt returns or raises")


def seal(
    signer: Identity,
    plaintext: bytes,
    targets: list[tuple[int, PublicKey]],
    *,
    collaboration: int,
    image: str,
    method: str,
    datasets: list[str],
    ledger: tuple[int, str] | None = None,
) -> tuple[bytes, DescriptorDocument]:
    """The input envelope (encrypted once, bound to the descriptor's nonce) and the signed descriptor that
    names its SHA-256 for every target: one hash and one signature, whatever the number of targets."""
    nonce = secrets.token_hex(16)
    envelope = encrypt_bytes(plaintext, signer.key, [key for _, key in targets], context=input_context(nonce))
    digest = hashlib.sha256(envelope).hexdigest()
    body = new_body(
        collaboration=collaboration,
        initiator_org=signer.organization_id,
        initiator_user=signer.user_id,
        signer=signer.key.public,
        signer_role=signer.role,
        image=image,
        method=method,
        targets=[Target(org=o, datasets=datasets, input=digest, key_id=key.key_id) for o, key in targets],
        reply_to=[signer.key.key_id] + ([signer.also_to.key_id] if signer.also_to is not None else []),
        nonce=nonce,
        ledger=ledger,
    )
    return envelope, sign_document(body, signer.key, signer.certificate)


async def _recipients(
    client: AsyncClient, collaboration: int, organizations: list[int] | None, fresh: bool
) -> list[tuple[int, PublicKey]]:
    """The head of each target organization's verified key chain (default targets: every member, from the
    collaboration's members as last listed; fresh: listed and verified again now)."""
    if organizations is None:
        organizations = await client.members.of(collaboration, refresh=fresh)
        if not organizations:  # an unknown collaboration: let the server say so
            await client.api.request("GET", f"/collaborations/{collaboration}")
    if not organizations:
        raise ClientError("a task needs at least one target organization")
    # A repeated organization stays: the server refuses it.
    chains = await client.chains.chains(organizations, refresh=fresh)
    return [(org_id, chain.head) for org_id, chain in zip(organizations, chains, strict=True)]


async def wait(
    client: AsyncClient, task_id: int, timeout_s: float | None, progress: bool, stream: TextIO | None = None
) -> Task:
    """Long polls the server, which answers as soon as every run ended or, with a progress bar to draw, as
    soon as any run changed (`since`: the state last seen; the first call only reads the state). Progress
    goes to `stream` (standard output when None)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    version: str | None = None
    first = progress
    with runs_progress(task_id, progress, stream) as shown:
        while True:
            left_s = WAIT_CHUNK_S if deadline is None else max(0.0, deadline - time.monotonic())
            state = await _wait_once(client, task_id, 0.0 if first else min(left_s, WAIT_CHUNK_S), version)
            first = False
            runs = state.runs
            version = state.version if progress else None
            done = sum(1 for r in runs if r.status in TERMINAL)
            shown.update(done, len(runs))
            if state.done:
                return state.task
            if deadline is not None and time.monotonic() >= deadline:
                raise TaskTimeout(f"task {task_id}: {done} of {len(runs)} runs finished after {timeout_s} s")


async def _wait_once(client: AsyncClient, task_id: int, timeout_s: float, since: str | None) -> TaskWait:
    params: dict[str, Any] = {"timeout_s": round(timeout_s, 3)}
    if since is not None:
        params["since"] = since
    return TaskWait.model_validate(await client.api.request("GET", f"/tasks/{task_id}/wait", params=params))


async def results(
    client: AsyncClient, task_id: int, raise_on_failure: bool, to: Path | None = None
) -> ResultSet:
    """Every completed run's result is downloaded and decrypted at once (one connection each): a task's
    results arrive in the time of the slowest, not the sum. A failed run raises TaskFailed before any
    download, naming every failed run of the task and of the subtasks below it. With `to`, each result
    streams to a file in that folder (a few at a time, each in bounded memory) and its value is read from
    the file when first asked for."""
    listed, digest, orgs = await asyncio.gather(
        client.runs(task_id), descriptor_digest(client, task_id), client.organizations()
    )
    names = {o.id: o.name for o in orgs}
    runs = sorted(listed, key=lambda r: (r.organization_id, r.id))
    done = [run.status == RunStatus.COMPLETED and bool(run.result_blob_id) for run in runs]
    failed = [i for i in range(len(runs)) if not done[i]]
    logs = await asyncio.gather(*(log_if_readable(client, runs[i]) for i in failed))
    own = {
        i: failed_result(runs[i], _failure(runs[i], text), names)
        for i, text in zip(failed, logs, strict=True)
    }
    failures = list(own.values())
    if failures:
        failures += await subtask_failures(client, task_id, failures, names)
    if failures and raise_on_failure:
        raise TaskFailed(task_id, failures)
    completed = [run for i, run in enumerate(runs) if done[i]]
    if to is None:
        values = await asyncio.gather(*(_decrypt_result(client, run, digest) for run in completed))
        opened = [completed_result(run, value, names) for run, value in zip(completed, values, strict=True)]
    else:
        opened = await _streamed(client, completed, digest, to, names)
    shown = iter(opened)
    return ResultSet(task_id, [own[i] if i in own else next(shown) for i in range(len(runs))], failures)


async def _streamed(
    client: AsyncClient, runs: list[Run], digest: str | None, to: Path, names: Mapping[int, str]
) -> list[OrganizationResult]:
    """Each run's result streamed to a file in `to`, a few at a time. Every stream runs to its end (the
    others' files are then complete), then the first failure is raised."""
    await asyncio.to_thread(to.mkdir, parents=True, exist_ok=True)
    limit = asyncio.Semaphore(STREAMS_AT_ONCE)
    ended = await asyncio.gather(
        *(stream_result(client, run, digest, to, limit) for run in runs), return_exceptions=True
    )
    files = [_or_raise(end) for end in ended]
    return [
        completed_result(run, value, names, file=file) for run, (file, value) in zip(runs, files, strict=True)
    ]


def _or_raise(ended: T | BaseException) -> T:
    if isinstance(ended, BaseException):
        raise ended
    return ended


async def subtask_failures(
    client: AsyncClient,
    task_id: int,
    failed: list[OrganizationResult],
    names: Mapping[int, str],
    logs: bool = True,
) -> list[OrganizationResult]:
    """The failed runs of the subtasks the failed runs created, level by level down to the last: a subtask
    belongs to the run of its parent task at the organization that created it. Only subtasks this client may
    see are walked (the server shows a researcher the tasks its organization started or runs at). `logs`:
    open the log tail of each where this client may (else each `log_tail` is empty)."""
    task = await client.task(task_id)
    below: dict[tuple[int, int | None], list[Task]] = {}
    for sub in await client.tasks(job_id=task.job_id):
        if sub.parent_id is not None:
            below.setdefault((sub.parent_id, sub.initiator_organization_id), []).append(sub)
    found: list[OrganizationResult] = []
    level = failed
    while level:
        children = [
            (parent, sub)
            for parent in level
            for sub in below.get((parent.task_id, parent.organization_id), [])
            if sub.status != TaskStatus.COMPLETED
        ]
        listed = await asyncio.gather(*(client.runs(sub.id) for _, sub in children))
        pairs = [
            (parent, run)
            for (parent, _), runs in zip(children, listed, strict=True)
            for run in sorted(runs, key=lambda r: (r.organization_id, r.id))
            if run.finished and run.status != RunStatus.COMPLETED
        ]
        tails = await asyncio.gather(*(_log_tail(client, run, logs) for _, run in pairs))
        level = [
            replace(
                failed_result(run, _failure(run, text), names),
                path=(*parent.path, run.task_id),
                parent_run_id=parent.run_id,
            )
            for (parent, run), text in zip(pairs, tails, strict=True)
        ]
        found += level
    return found


async def descriptor_digest(client: AsyncClient, task_id: int) -> str | None:
    """The digest of the task's descriptor results are bound to: remembered when this client created the
    task, else the server's copy once it shows it is ours (None: a task made before descriptors)."""
    known = client.descriptor_digests.get(task_id)
    if known is not None:
        return known
    task = await client.task(task_id)
    text = task.descriptor
    if not text:
        return None
    try:
        document = DescriptorDocument.parse(str(text))
        body = document.body()
    except TrustError as exc:
        raise ClientError(f"task {task_id}: {exc.message}") from None
    keyring = client.keyring
    ours = [keyring.get(key_id) for key_id in document.descriptor.signers()]
    if not any(key is not None and document.descriptor.signed_by(key.public) for key in ours):
        raise ClientError(
            f"task {task_id}: its descriptor is not signed by a key of yours (another researcher's task, "
            "or the server swapped it); its results are not yours to read"
        )
    if body.image != task.image or body.collaboration != task.collaboration_id:
        raise ClientError(f"task {task_id}: the server shows another image or collaboration than you signed")
    client.descriptor_digests[task_id] = document.digest
    return document.digest


async def _decrypt_result(client: AsyncClient, run: Run, digest: str | None) -> Any:
    """Decrypt a run's result, checked against the executing organization's verified chain and bound to
    this run (descriptor digest, organization, run id) unless the task has no descriptor."""
    run_id, org_id = run.id, run.organization_id
    context = None if digest is None else result_context(digest, org_id, run_id)
    blob, chain = await asyncio.gather(
        client.api.download_blob(str(run.result_blob_id)), client.chains.chain(org_id)
    )
    plaintext = await open_checked(
        client, run_id, org_id, chain, lambda sender: _decrypt(blob, client.keyring, sender, context)
    )
    return await _off_loop_if_big(len(plaintext), functools.partial(decode_result, plaintext))


async def _off_loop_if_big(size: int, fn: Callable[[], T]) -> T:
    """Small work runs on the loop (a thread hop costs more); big work in a thread, so the loop goes on."""
    return fn() if size <= INLINE_DECRYPT_BYTES else await asyncio.to_thread(fn)


async def _decrypt(blob: bytes, keyring: Keyring, sender: SenderLookup, context: bytes | None) -> bytes:
    return await _off_loop_if_big(
        len(blob), functools.partial(decrypt_bytes, blob, keyring, sender, context=context)
    )


def run_failure(run: Run, names: Mapping[int, str]) -> OrganizationResult:
    """A run that did not complete, with its classified reason and no log (what `vfed task show` tells)."""
    return failed_result(run, _failure(run, ""), names)


async def _log_tail(client: AsyncClient, run: Run, opened: bool) -> str:
    return await log_if_readable(client, run) if opened else ""


def _failure(run: Run, log: str) -> RunFailed:
    """The run's failure: its classified reason and, when this client can open the sealed log, its tail."""
    tail = "\n".join(log.splitlines()[-LOG_TAIL_LINES:])
    status = str(run.status)
    reason = run.reason or ("still " + status if not run.finished else "")
    return RunFailed(run.id, run.organization_id, status, reason, tail)
