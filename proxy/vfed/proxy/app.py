"""The proxy: one aiohttp app per run, the only thing an algorithm container can reach (docs/proxy-api.md).

The app is bound to one run, so the socket it listens on identifies the caller; nothing inside a Docker
run's container is a credential (a run in a cluster reaches it through the agent's listener with a token of
its own, listener.py). It speaks to the server with the run's own token, signs each subtask's descriptor and
encrypts its inputs for each target organization (subtasks.py), and decrypts subtask results with our keyring,
checked against the executing organization's verified key chain and bound to their run.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import SecretStr, ValidationError

from vfed.common.api import proxy as api
from vfed.common.api.errors import ApiError, error_response
from vfed.common.api.resources import Run, Task
from vfed.common.crypto import (
    ContextMismatch,
    CryptoError,
    SenderLookup,
    UnknownSender,
    decrypt_file,
    encrypt_bytes,
)
from vfed.common.payload import result_content_type
from vfed.common.slow_clients import head_middleware
from vfed.common.trust import TrustError
from vfed.proxy import limits, subtasks
from vfed.proxy.context import ProxyContext, ProxyError, RunInfo
from vfed.proxy.listener import token_middleware
from vfed.proxy.rest import ServerUnavailable
from vfed.proxy.subtasks import NewTask

__all__ = ["CONTEXT", "ProxyContext", "ProxyError", "RunInfo", "create_proxy_app"]

log = logging.getLogger(__name__)

MAX_WAIT_S = 300.0
CHUNK_BYTES = 1024 * 1024
WAIT_POLL_MAX_S = 0.25  # how stale a long poll may answer; the server sees one light GET per interval


CONTEXT = web.AppKey("context", ProxyContext)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_middleware(  # noqa: PLR0911 - one answer per error kind
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Every failure answers JSON {"error", "detail"}; server errors keep their status when they are 4xx."""
    try:
        return await handler(request)
    except ProxyError as exc:
        response = error_response(exc.status, exc.error, exc.detail)
        if exc.error in ("too-large", "body-timeout"):
            response.force_close()  # the rest of the body is not worth reading
        return response
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONTEXT].max_request_bytes
        return error_response(413, "too-large", f"request body over the proxy's limit of {limit} bytes")
    except web.HTTPException as exc:
        if exc.status == 405:
            return error_response(403, "forbidden", f"{request.method} {request.path} is not allowed")
        return error_response(exc.status, exc.reason.lower().replace(" ", "-"), exc.text or exc.reason)
    except ApiError as exc:
        status = exc.status if 400 <= exc.status < 500 else 502
        return error_response(status, exc.error, f"server: {exc.detail}")
    except ServerUnavailable as exc:
        return error_response(503, "server-unavailable", str(exc))
    except TrustError as exc:
        return error_response(403, exc.reason, exc.message)


async def get_run(request: web.Request) -> web.Response:
    info = request.app[CONTEXT].run
    answer = api.RunInfo(
        run_id=info.run_id,
        task_id=info.task_id,
        job_id=info.job_id,
        organization_id=info.organization_id,
        collaboration_id=info.collaboration_id,
        image=info.image,
    )
    return web.json_response(answer.model_dump(mode="json"))


async def get_organizations(request: web.Request) -> web.Response:
    orgs = await request.app[CONTEXT].rest.list_organizations()
    data = [api.Organization(id=o.id, name=o.name, key_id=o.key_id).model_dump(mode="json") for o in orgs]
    return web.json_response({"data": data})


async def _read_new_task(request: web.Request) -> NewTask:
    body = await limits.read_body(request, request.app[CONTEXT])
    try:
        return NewTask.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ProxyError(400, "bad-request", f"{where}: {first['msg']}") from None


async def _seal(ctx: ProxyContext, data: bytes, org_ids: list[int]) -> str:
    """Encrypt data for these organizations, signed with our key; upload it; return the blob id."""
    recipients = await subtasks.heads(ctx, org_ids)
    sealed = await asyncio.to_thread(encrypt_bytes, data, ctx.org_key, recipients)
    return (await limits.upload_blob(ctx, sealed)).id


async def post_task(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    new = await _read_new_task(request)
    if (new.input is None) == (new.inputs is None):
        raise ProxyError(400, "bad-request", "give exactly one of 'input' (for all) or 'inputs' (per org)")
    orgs = list(dict.fromkeys(new.organizations))
    if new.inputs is not None and set(new.inputs) != set(orgs):
        raise ProxyError(400, "bad-request", "'inputs' must have exactly one entry per organization")
    subtasks.reserve(ctx)
    try:
        task = await _create_subtask(ctx, new, orgs)
    except BaseException:
        subtasks.release(ctx)
        raise
    ctx.subtasks.add(task.id)
    runs = await ctx.rest.list_runs(task_id=task.id)
    log.info("run %s created subtask %s for organizations %s", ctx.run.run_id, task.id, orgs)
    answer = api.Subtask(task_id=task.id, run_ids=[r.id for r in runs])
    return web.json_response(answer.model_dump(mode="json"), status=201)


async def _create_subtask(ctx: ProxyContext, new: NewTask, orgs: list[int]) -> Task:
    fields: dict[str, Any] = {
        "collaboration_id": ctx.run.collaboration_id,
        "name": new.name,
        "description": new.description or "",
        "image": new.image or ctx.run.image,
        "datasets": new.datasets,
        "parent_id": ctx.run.task_id,
    }
    if ctx.descriptor is not None:
        await subtasks.check_members(ctx, orgs)
        return await subtasks.create_signed(ctx, new, orgs, fields)
    # Without the run's descriptor (the proxy on its own, in tests): the server's keys, unbound inputs.
    blob_by_org: dict[int, str] = {}
    if new.input is not None:
        blob = await _seal(ctx, new.input.to_json(), orgs)
        blob_by_org = dict.fromkeys(orgs, blob)
    else:
        assert new.inputs is not None
        for org_id in orgs:
            blob_by_org[org_id] = await _seal(ctx, new.inputs[org_id].to_json(), [org_id])
    fields["organizations"] = [{"id": o, "input_blob_id": blob_by_org[o]} for o in orgs]
    return await ctx.rest.create_task(fields)


def _int_param(request: web.Request, name: str) -> int:
    try:
        return int(request.match_info[name])
    except ValueError:
        raise ProxyError(400, "bad-request", f"{name} must be an integer") from None


async def _own_task_runs(ctx: ProxyContext, task_id: int) -> list[Run]:
    """The runs of a subtask of this run's job; 403 for any other task."""
    if task_id not in ctx.subtasks:
        try:
            task = await ctx.rest.get_task(task_id)
        except ApiError as exc:
            if exc.status in (403, 404):
                raise ProxyError(403, "forbidden", f"task {task_id} is not a subtask of this job") from None
            raise
        if task.job_id != ctx.run.job_id or task.id == ctx.run.task_id:
            raise ProxyError(403, "forbidden", f"task {task_id} is not a subtask of this job")
        ctx.subtasks.add(task_id)
    return await ctx.rest.list_runs(task_id=task_id)


def _task_view(task_id: int, runs: list[Run]) -> api.TaskState:
    found = [
        api.SubtaskRun(run_id=r.id, organization_id=r.organization_id, status=r.status, reason=r.reason)
        for r in runs
    ]
    return api.TaskState.of(task_id, found)


async def get_task(request: web.Request) -> web.Response:
    task_id = _int_param(request, "task_id")
    runs = await _own_task_runs(request.app[CONTEXT], task_id)
    return web.json_response(_task_view(task_id, runs).model_dump(mode="json"))


async def wait_task(request: web.Request) -> web.Response:
    """Long poll: answer when every run of the subtask is finished or the timeout passed."""
    ctx = request.app[CONTEXT]
    task_id = _int_param(request, "task_id")
    try:
        timeout_s = min(float(request.query.get("timeout_s", "30")), MAX_WAIT_S)
    except ValueError:
        raise ProxyError(400, "bad-request", "timeout_s must be a number") from None
    deadline = time.monotonic() + max(timeout_s, 0.0)
    delay = 0.05
    while True:
        view = _task_view(task_id, await _own_task_runs(ctx, task_id))
        if view.done or time.monotonic() >= deadline:
            return web.json_response(view.model_dump(mode="json"))
        await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
        delay = min(delay * 2, WAIT_POLL_MAX_S)


async def get_result(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    run_id = _int_param(request, "run_id")
    try:
        run = await ctx.rest.get_run(run_id)
    except ApiError as exc:
        if exc.status in (403, 404):
            raise ProxyError(403, "forbidden", f"run {run_id} is not a run of this job's subtasks") from None
        raise
    if run.job_id != ctx.run.job_id or run.task_id == ctx.run.task_id or run.id == ctx.run.run_id:
        raise ProxyError(403, "forbidden", f"run {run_id} is not a run of this job's subtasks")
    if run.status != "completed" or run.result_blob_id is None:
        return web.json_response(
            {
                "error": "not-completed",
                "detail": f"run {run_id} is {run.status}",
                "status": run.status,
                "reason": run.reason,
            },
            status=409,
        )
    context, sender = await _binding(ctx, run)
    spool = await asyncio.to_thread(_make_spool, ctx.spool_dir)
    try:
        await ctx.rest.download_blob_to(run.result_blob_id, spool / "sealed")
        await _decrypt_result(ctx, run, spool, context, sender)
        return await _send_file(request, spool / "plain")
    finally:
        await asyncio.to_thread(shutil.rmtree, spool, True)


async def _binding(ctx: ProxyContext, run: Run) -> tuple[bytes | None, SenderLookup]:
    """The context the result must be bound to, and the executing organization's keys (its verified chain;
    never the server's word)."""
    context = await subtasks.result_context_of(ctx, run)
    try:
        chain = await ctx.chains.chain(run.organization_id)
    except TrustError as exc:
        raise ProxyError(502, "undecryptable", f"result of run {run.id}: {exc.message}") from None
    return context, chain.lookup()


async def _decrypt_result(
    ctx: ProxyContext, run: Run, spool: Path, context: bytes | None, sender: SenderLookup
) -> None:
    sealed, plain = spool / "sealed", spool / "plain"
    try:
        try:
            await asyncio.to_thread(decrypt_file, sealed, plain, ctx.keyring, sender, context=context)
        except UnknownSender:
            # signed by a key newer than the chain we keep: read the chain again, once
            chain = await ctx.chains.chain(run.organization_id, refresh=True)
            await asyncio.to_thread(decrypt_file, sealed, plain, ctx.keyring, chain.lookup(), context=context)
    except ContextMismatch:
        raise ProxyError(
            502,
            "undecryptable",
            f"result of run {run.id} belongs to another run or task (its envelope is not bound to this run)",
        ) from None
    except (CryptoError, TrustError) as exc:
        ctx.chains.forget(run.organization_id)
        raise ProxyError(502, "undecryptable", f"result of run {run.id} does not decrypt: {exc}") from None


def _make_spool(parent: Path | None) -> Path:
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="result-", dir=parent))


def _peek(path: Path) -> tuple[int, str]:
    """Size and content type (Parquet files start and end with PAR1) of a result file."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(4)
        handle.seek(max(size - 4, 0))
        return size, result_content_type(head + handle.read(4))


async def _send_file(request: web.Request, path: Path) -> web.StreamResponse:
    """Stream a verified plaintext file to the algorithm."""
    size, content_type = await asyncio.to_thread(_peek, path)
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.content_length = size
    await response.prepare(request)
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
            await response.write(chunk)
    finally:
        handle.close()
    await response.write_eof()
    return response


async def forbidden(request: web.Request) -> web.Response:
    return error_response(
        403, "forbidden", f"{request.method} {request.path} is not allowed through the proxy"
    )


def create_proxy_app(ctx: ProxyContext, token: SecretStr | None = None) -> web.Application:
    """The app for one run. Only the routes of docs/proxy-api.md; everything else answers 403. With `token`
    (a run reached over the network, listener.py) every request must carry it, else 401."""
    middlewares: list[Middleware] = [head_middleware, errors_middleware, limits.limits_middleware(ctx)]
    if token is not None:
        middlewares.insert(1, token_middleware(token))
    app = web.Application(middlewares=middlewares, client_max_size=ctx.max_request_bytes)
    app[CONTEXT] = ctx
    app[limits.GATE] = limits.new_gate(ctx)
    app.router.add_get("/run", get_run)
    app.router.add_get("/organizations", get_organizations)
    app.router.add_post("/tasks", post_task)
    app.router.add_get(r"/tasks/{task_id}", get_task)
    app.router.add_get(r"/tasks/{task_id}/wait", wait_task)
    app.router.add_get(r"/runs/{run_id}/result", get_result)
    app.router.add_route("*", "/{tail:.*}", forbidden)
    return app
