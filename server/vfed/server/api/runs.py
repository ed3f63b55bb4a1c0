"""Runs: claimed atomically by one node, updated only by it, final once finished."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import MultipartWriter, hdrs, web
from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.server import auth
from vfed.server.access import require, run_filter
from vfed.server.api.common import (
    caller,
    equal_filters,
    json_response,
    page_of,
    paginate,
    path_id,
    read_json,
    read_query,
    session,
)
from vfed.server.api.tasks import out as task_out
from vfed.server.api.tasks import refresh_status, target_orgs, visible_task
from vfed.server.auth import Principal
from vfed.server.errors import ApiError, conflict, forbidden, not_found
from vfed.server.models import TERMINAL, Blob, Run, RunStatus, utcnow
from vfed.server.schemas import ClaimOut, RunOut, RunPatch, RunQuery, RunTokenOut
from vfed.server.state import SETTINGS

CLAIM_MIXED = "multipart/mixed"  # a node that sends this in Accept gets a small input in the claim answer


def out(r: Run) -> RunOut:
    """The run as the API shows it."""
    blob = "/api/v1/blobs/"
    return RunOut(
        id=r.id,
        task_id=r.task_id,
        job_id=r.job_id,
        organization_id=r.organization_id,
        node_id=r.node_id,
        status=r.status,
        input_blob_id=r.input_blob_id,
        result_blob_id=r.result_blob_id,
        image_digest=r.image_digest,
        exit_code=r.exit_code,
        reason=r.reason,
        log=r.log,
        created_at=r.created_at,
        claimed_at=r.claimed_at,
        started_at=r.started_at,
        finished_at=r.finished_at,
        links={
            "self": f"/api/v1/runs/{r.id}",
            "task": f"/api/v1/tasks/{r.task_id}",
            "organization": f"/api/v1/organizations/{r.organization_id}",
            "node": f"/api/v1/nodes/{r.node_id}" if r.node_id else None,
            "input": blob + r.input_blob_id if r.input_blob_id else None,
            "result": blob + r.result_blob_id if r.result_blob_id else None,
        },
    )


async def visible_run(s: AsyncSession, p: Principal, run_id: int) -> Run:
    """The run, or 404 when the caller may not see it."""
    where = run_filter(p, require(p, "run", "read"))
    run = (
        await s.execute(select(Run).where(Run.id == run_id, where).execution_options(populate_existing=True))
    ).scalar_one_or_none()
    if run is None:
        raise not_found("run", run_id)
    return run


async def node_run(request: web.Request, s: AsyncSession, action: str, refusal: str) -> tuple[Principal, Run]:
    """The calling node and the run in the path, for the actions only nodes take (403 for anyone else)."""
    p = await caller(request, s)
    if p.kind != "node":
        raise forbidden(refusal)
    require(p, "run", action)
    return p, await visible_run(s, p, path_id(request))


async def list_runs(request: web.Request) -> web.Response:
    """Runs the caller may see, filtered."""
    q = read_query(request, RunQuery)
    async with session(request) as s:
        p = await caller(request, s)
        where = [
            run_filter(p, require(p, "run", "read")),
            *equal_filters(
                (Run.task_id, q.task_id),
                (Run.organization_id, q.organization_id),
                (Run.node_id, q.node_id),
                (Run.status, q.status),
            ),
        ]
        rows, total = await paginate(s, Run, where, q.page, q.per_page)
    return web.json_response(page_of(request, [out(r) for r in rows], total, q.page, q.per_page))


async def get_run(request: web.Request) -> web.Response:
    """One run."""
    async with session(request) as s:
        p = await caller(request, s)
        run = await visible_run(s, p, path_id(request))
    return json_response(out(run))


async def claim_run(request: web.Request) -> web.Response:
    """pending -> initializing for exactly one node: a conditional UPDATE, so racing claims never both win."""
    async with session(request) as s:
        p, run = await node_run(request, s, "claim", "only a node claims runs")
        result = await s.execute(
            update(Run)
            .where(Run.id == run.id, Run.status == RunStatus.PENDING, Run.node_id.is_(None))
            .values(status=RunStatus.INITIALIZING, node_id=p.node_id, claimed_at=utcnow())
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            await s.rollback()
            raise conflict("already-claimed", f"run {path_id(request)} is no longer pending")
        await refresh_status(s, run.task_id)
        await s.commit()
        run = await visible_run(s, p, path_id(request))
        task = await visible_task(s, p, run.task_id)
        orgs = await target_orgs(s, [task.id])
        blob = await s.get(Blob, run.input_blob_id) if run.input_blob_id else None
    # What the node needs before it can start the container comes along: the task, the run's proxy token and,
    # for a node that accepts multipart/mixed, a small input (one that lives in its blob row) as binary part.
    token = _issue_run_token(request, p, run.id)
    claim = ClaimOut(**dict(out(run)), task=task_out(task, orgs[task.id]), run_token=token)
    small = blob.data if blob is not None else None
    if small is not None and CLAIM_MIXED in request.headers.get(hdrs.ACCEPT, ""):
        return _claim_with_input(claim, small)
    return json_response(claim)


def _claim_with_input(claim: ClaimOut, data: bytes) -> web.Response:
    """multipart/mixed: the claim as JSON, then the sealed input as octet-stream (never base64)."""
    body = MultipartWriter("mixed")
    body.append(claim.model_dump_json(), {hdrs.CONTENT_TYPE: "application/json"})
    part = body.append(data, {hdrs.CONTENT_TYPE: "application/octet-stream"})
    part.set_content_disposition("attachment", name="input")
    return web.Response(body=body)


def _tail(text: str, max_bytes: int) -> str:
    """Keep the end of a log: the last lines say why a run ended."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    return data[len(data) - max_bytes :].decode(errors="ignore")


async def _changes(s: AsyncSession, p: Principal, run: Run, body: RunPatch, log_max: int) -> dict[str, Any]:
    values: dict[str, Any] = body.model_dump(exclude_unset=True, exclude_none=True)
    if body.status == RunStatus.PENDING:
        raise ApiError(422, "validation-error", "status: a run cannot go back to pending")
    if body.result_blob_id is not None:
        blob = await s.get(Blob, body.result_blob_id)
        if blob is None or blob.owner_node_id != p.node_id:
            raise ApiError(422, "validation-error", f"result_blob_id: unknown blob {body.result_blob_id}")
    if body.log is not None:
        values["log"] = _tail(body.log, log_max)
    now: datetime = utcnow()
    if body.status == RunStatus.ACTIVE and run.started_at is None:
        values["started_at"] = now
    if body.status in TERMINAL:
        values["finished_at"] = now
    return values


async def patch_run(request: web.Request) -> web.Response:
    """The claiming node reports progress; terminal statuses are final (409), but a killed run's node may
    still PATCH only its `log`: it stops the container after the kill and uploads the log so far."""
    body = await read_json(request, RunPatch)
    async with session(request) as s:
        p = await caller(request, s)
        if p.kind != "node":
            raise forbidden("only the claiming node updates a run")
        require(p, "run", "edit")
        run = await visible_run(s, p, path_id(request))
        if run.node_id != p.node_id:
            raise forbidden("only the node that claimed this run may update it")
        values = await _changes(s, p, run, body, request.app[SETTINGS].run_log_max_bytes)
        if values:
            open_run: ColumnElement[bool] = Run.status.not_in(list(TERMINAL))
            if set(values) == {"log"}:  # a killed run still takes the log its node saved while stopping it
                open_run = or_(open_run, Run.status == RunStatus.KILLED)
            result = await s.execute(update(Run).where(Run.id == run.id, open_run).values(**values))
            if result.rowcount != 1:  # type: ignore[attr-defined]
                await s.rollback()
                run = await visible_run(s, p, path_id(request))
                code = "run-killed" if run.status == RunStatus.KILLED else "run-final"
                raise conflict(code, f"run {run.id} is {run.status}; its status is final")
            await refresh_status(s, run.task_id)
            await s.commit()
        run = await visible_run(s, p, path_id(request))
    return json_response(out(run))


async def run_token(request: web.Request) -> web.Response:
    """A token for the run's proxy: scoped to the run and its subtasks, dead once the run ends."""
    async with session(request) as s:
        p, run = await node_run(request, s, "token", "only a node asks for run tokens")
        if run.node_id != p.node_id:
            raise forbidden("only the node that claimed this run gets its token")
        if run.status in TERMINAL:
            raise conflict("run-final", f"run {run.id} is {run.status}")
    return json_response(_issue_run_token(request, p, run.id))


def _issue_run_token(request: web.Request, p: Principal, run_id: int) -> RunTokenOut:
    settings = request.app[SETTINGS]
    claims = {"sub": str(p.node_id), "kind": "run", "typ": "access", "run_id": run_id}
    token, expires_at = auth.issue(settings.jwt_secret, claims, settings.run_token_max_s)
    return RunTokenOut(token=token, expires_at=expires_at)
