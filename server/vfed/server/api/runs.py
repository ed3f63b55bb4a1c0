"""Runs: claimed atomically by one node, updated only by it, final once finished."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import MultipartWriter, hdrs, web
from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.common.api import resources as res
from vfed.common.api.statuses import TERMINAL, RunStatus
from vfed.server import auth
from vfed.server.access import require, run_filter
from vfed.server.api import run_rows
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
from vfed.server.auth import Principal
from vfed.server.errors import ApiError, conflict, forbidden, not_found
from vfed.server.models import Run, utcnow
from vfed.server.schemas import RunPatch, RunQuery
from vfed.server.state import SETTINGS

CLAIM_MIXED = "multipart/mixed"  # a node that sends this in Accept gets a small input in the claim answer


def out(r: Run | Row[Any]) -> res.Run:
    """The run as the API shows it (a row of our own database, or RETURNING: no validation needed)."""
    blob = "/api/v1/blobs/"
    return res.Run.model_construct(
        id=r.id,
        task_id=r.task_id,
        job_id=r.job_id,
        organization_id=r.organization_id,
        node_id=r.node_id,
        status=RunStatus(r.status),
        input_blob_id=r.input_blob_id,
        result_blob_id=r.result_blob_id,
        image_digest=r.image_digest,
        exit_code=r.exit_code,
        reason=r.reason,
        sealed_log=r.sealed_log,
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
    """pending -> initializing for exactly one node: a conditional UPDATE ... RETURNING, so racing claims
    never both win; the task (its status re-derived) and a small input follow in two statements."""
    async with session(request) as s:
        p = await caller(request, s)
        if p.kind != "node":
            raise forbidden("only a node claims runs")
        require(p, "run", "claim")
        run_id = path_id(request)
        conn = await s.connection()
        run = await run_rows.claim(conn, p, run_id, utcnow())
        if run is None:
            await s.rollback()
            await visible_run(s, p, run_id)  # 404 for a run the node may not see
            raise conflict("already-claimed", f"run {run_id} is no longer pending")
        # the node may read the task: the run it just claimed is its organization's, in its collaboration
        task, orgs, small = await run_rows.settle(s, conn, run.task_id, run.input_blob_id)
        await s.commit()
    # What the node needs before it can start the container comes along: the task, the run's proxy token and,
    # for a node that accepts multipart/mixed, a small input (one that lives in its blob row) as binary part.
    token = _issue_run_token(request, p, run.id)
    claim = res.Claim.model_construct(**dict(out(run)), task=task_out(task, orgs), run_token=token)
    if small is not None and CLAIM_MIXED in request.headers.get(hdrs.ACCEPT, ""):
        return _claim_with_input(claim, small)
    return json_response(claim)


def _claim_with_input(claim: res.Claim, data: bytes) -> web.Response:
    """multipart/mixed: the claim as JSON, then the sealed input as octet-stream (never base64)."""
    body = MultipartWriter("mixed")
    body.append(claim.model_dump_json(), {hdrs.CONTENT_TYPE: "application/json"})
    part = body.append(data, {hdrs.CONTENT_TYPE: "application/octet-stream"})
    part.set_content_disposition("attachment", name="input")
    return web.Response(body=body)


SEAL_SLACK_BYTES = 16 * 1024
"""What sealing adds to a log tail of run_log_max_bytes: header, a key per recipient, tags, signature."""


def _sealed_log_cap(log_max: int) -> int:
    """The longest base64 `sealed_log` kept: a sealed tail of run_log_max_bytes (the node cuts the tail, the
    server cannot: it is ciphertext)."""
    return 4 * -(-(log_max + SEAL_SLACK_BYTES) // 3)


def _changes(body: RunPatch, log_max: int) -> dict[str, Any]:
    """The columns a PATCH sets (`started_at` keeps its first value: see run_rows.update_own_run). A
    plaintext `log` (an older node's) is dropped: algorithm output is never stored in the clear."""
    values: dict[str, Any] = body.model_dump(exclude_unset=True, exclude_none=True)
    values.pop("log", None)
    if body.sealed_log is not None and len(body.sealed_log) > _sealed_log_cap(log_max):
        raise ApiError(
            413,
            "too-large",
            f"sealed_log: over {_sealed_log_cap(log_max)} characters (run_log_max_bytes {log_max} sealed)",
        )
    now: datetime = utcnow()
    if body.status == RunStatus.ACTIVE:
        values["started_at"] = now
    if body.status in TERMINAL:
        values["finished_at"] = now
    return values


async def _checked_run(s: AsyncSession, p: Principal, run_id: int, body: RunPatch) -> Run:
    """The run, after every check a PATCH passes, in the order they answer: 404, 403, then 422."""
    run = await visible_run(s, p, run_id)
    if run.node_id != p.node_id:
        raise forbidden("only the node that claimed this run may update it")
    if body.status == RunStatus.PENDING:
        raise ApiError(422, "validation-error", "status: a run cannot go back to pending")
    if body.result_blob_id is not None and not await run_rows.blob_owner_is(
        await s.connection(), body.result_blob_id, p.node_id
    ):
        raise _unknown_blob(body.result_blob_id)
    return run


def _unknown_blob(blob_id: str) -> ApiError:
    return ApiError(422, "validation-error", f"result_blob_id: unknown blob {blob_id}")


async def patch_run(request: web.Request) -> web.Response:
    """The claiming node reports progress; terminal statuses are final (409), but a killed run's node may
    still PATCH only its `sealed_log`: it stops the container after the kill and uploads the log so far.
    One conditional UPDATE ... RETURNING does the checks that pass on the way (the run is this node's and
    open); only a refusal reads the run again, to answer with the code the first failing check gives."""
    body = await read_json(request, RunPatch)
    async with session(request) as s:
        p = await caller(request, s)
        if p.kind != "node":
            raise forbidden("only the claiming node updates a run")
        require(p, "run", "edit")
        run_id = path_id(request)
        values = _changes(body, request.app[SETTINGS].run_log_max_bytes)
        conn = await s.connection()
        blob_ok = body.result_blob_id is None or await run_rows.blob_owner_is(
            conn, body.result_blob_id, p.node_id
        )
        if not values or body.status == RunStatus.PENDING or not blob_ok:
            run = await _checked_run(s, p, run_id, body)
            if not blob_ok:
                raise _unknown_blob(str(body.result_blob_id))
            return json_response(out(run))  # nothing to change
        row = await run_rows.update_run(conn, p, run_id, values)
        if row is None:
            await s.rollback()
            run = await _checked_run(s, p, run_id, body)
            code = "run-killed" if run.status == RunStatus.KILLED else "run-final"
            raise conflict(code, f"run {run.id} is {run.status}; its status is final")
        if "status" in values:
            await run_rows.settle(s, conn, row.task_id, orgs=False)
        await s.commit()
    return json_response(out(row))


async def run_token(request: web.Request) -> web.Response:
    """A token for the run's proxy: scoped to the run and its subtasks, dead once the run ends."""
    async with session(request) as s:
        p, run = await node_run(request, s, "token", "only a node asks for run tokens")
        if run.node_id != p.node_id:
            raise forbidden("only the node that claimed this run gets its token")
        if run.status in TERMINAL:
            raise conflict("run-final", f"run {run.id} is {run.status}")
    return json_response(_issue_run_token(request, p, run.id))


def _issue_run_token(request: web.Request, p: Principal, run_id: int) -> res.RunToken:
    settings = request.app[SETTINGS]
    claims = {"sub": str(p.node_id), "kind": "run", "typ": "access", "run_id": run_id}
    token, expires_at = auth.issue(settings.jwt_secret, claims, settings.run_token_max_s)
    return res.RunToken(token=token, expires_at=expires_at)
