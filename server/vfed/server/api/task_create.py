"""Task creation: JSON that names uploaded input blobs, or one multipart request that brings the input along.

The multipart form (`task`: the JSON fields, `input`: the sealed envelope) is what the researcher client
uses: one request, one authentication, one transaction for blob, task and runs. Statements are built once
and run on the session's connection: the ORM's unit of work and per-call statement building cost more CPU
than the INSERTs themselves.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, hdrs, web
from sqlalchemy import Table, and_, bindparam, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from vfed.common import multipart
from vfed.common.api.statuses import TaskStatus
from vfed.common.trust import KIND_DESCRIPTOR, DescriptorBody, DescriptorDocument, TrustError
from vfed.server import blob_limits
from vfed.server.access import Scope, require, task_filter
from vfed.server.api.blobs import BLOBS_TABLE, readable_blob
from vfed.server.api.common import caller, json_response, read_json, session, validate
from vfed.server.api.tasks import NewTask, RunRef, job_of, out, pair_targets, publish
from vfed.server.auth import Principal
from vfed.server.blob_limits import USAGE
from vfed.server.blobs import CHUNK_BYTES, ROW_BYTES, BlobStore, BlobTooLarge, StoredBlob
from vfed.server.errors import ApiError, bad_request, conflict, forbidden, not_found
from vfed.server.metrics import METRICS
from vfed.server.models import Node, Organization, Run, Task, collaboration_members, utcnow
from vfed.server.schemas import DESCRIPTOR_MAX_BYTES, TaskIn
from vfed.server.state import BLOBS, DOORBELL, SETTINGS

TASKS: Table = Task.__table__  # type: ignore[assignment]
RUNS: Table = Run.__table__  # type: ignore[assignment]
# the JSON fields of a task, a descriptor of up to 2 MiB among them; the input envelope has the blob limit
TASK_PART_MAX_BYTES = 3 << 20
SMALL_FORM_BYTES = 256 << 10  # task requests up to this size are read whole and split in memory
_CM = collaboration_members.c
# members, their current key ids and their nodes in the collaboration, in one statement: the checks and the
# doorbell's targets
_MEMBERS = (
    select(_CM.organization_id, Organization.key_id, Node.id)
    .select_from(collaboration_members)
    .join(Organization, Organization.id == _CM.organization_id)
    .outerjoin(
        Node,
        and_(Node.collaboration_id == _CM.collaboration_id, Node.organization_id == _CM.organization_id),
    )
    .where(_CM.collaboration_id == bindparam("collab"))
)
_INSERT_TASK = insert(TASKS).returning(TASKS.c.id)
_INSERT_RUNS = insert(RUNS).returning(RUNS.c.id, RUNS.c.organization_id)
_INSERT_BLOB = insert(BLOBS_TABLE)


@dataclass(frozen=True)
class _Collab:
    id: int
    key_ids: dict[int, str | None]  # each member organization's current key id
    nodes: dict[int, list[int]]  # node ids by member organization

    @property
    def members(self) -> frozenset[int]:
        return frozenset(self.key_ids)


async def _collab(conn: AsyncConnection, collab_id: int) -> _Collab:
    """The collaboration's members and their nodes (no members: it does not exist, or nobody could use it)."""
    key_ids: dict[int, str | None] = {}
    nodes: dict[int, list[int]] = {}
    for org_id, key_id, node_id in await conn.execute(_MEMBERS, {"collab": collab_id}):
        key_ids[org_id] = key_id
        if node_id is not None:
            nodes.setdefault(org_id, []).append(node_id)
    return _Collab(collab_id, key_ids, nodes)


async def _context(s: AsyncSession, p: Principal, body: TaskIn) -> tuple[_Collab, Task | None]:
    """The collaboration and parent a new task belongs to, checked against the caller."""
    conn = await s.connection()
    if p.kind == "run":
        if body.parent_id not in (None, p.task_id) or body.collaboration_id not in (None, p.collaboration_id):
            raise forbidden("a run token creates subtasks of its own task, in its own collaboration")
        assert p.collaboration_id is not None
        return await _collab(conn, p.collaboration_id), await s.get(Task, p.task_id)
    scope = require(p, "task", "create")
    if body.collaboration_id is None:
        raise ApiError(422, "validation-error", "collaboration_id: required")
    collab = await _collab(conn, body.collaboration_id)
    if not collab.members or (scope < Scope.GLOBAL and p.organization_id not in collab.members):
        raise not_found("collaboration", body.collaboration_id)
    parent = None
    if body.parent_id is not None:
        parent = (
            await s.execute(select(Task).where(Task.id == body.parent_id, task_filter(p, Scope.ORGANIZATION)))
        ).scalar_one_or_none()
        if parent is None or parent.collaboration_id != collab.id:
            raise not_found("task", body.parent_id)
        if parent.initiator_organization_id != p.organization_id:
            # A child shares its parent's job, so on every node its runs mount the parent's job folder: a
            # task that merely targets the caller's organization must not let another organization in there.
            raise forbidden(
                f"task {parent.id} was initiated by another organization: only that organization, or a run "
                "token of its own job, may create a task under it"
            )
    return collab, parent


async def _check_targets(s: AsyncSession, p: Principal, collab: _Collab, body: TaskIn) -> None:
    members = collab.members
    ids = [o.id for o in body.organizations]
    if len(set(ids)) != len(ids):
        raise ApiError(422, "validation-error", "organizations: an organization is listed twice")
    if not set(ids) <= members:
        raise ApiError(
            422, "validation-error", f"organizations: {sorted(set(ids) - members)} not in the collaboration"
        )
    stale = [o for o in body.organizations if o.key_id is not None and o.key_id != collab.key_ids[o.id]]
    if stale:
        named = ", ".join(f"{o.id} (sealed to {o.key_id}, current {collab.key_ids[o.id]})" for o in stale)
        raise conflict("stale-key", f"organizations: the input is not sealed to the current key of {named}")
    for blob_id in {o.input_blob_id for o in body.organizations if o.input_blob_id}:
        if await readable_blob(s, p, blob_id) is None:
            raise ApiError(422, "validation-error", f"input_blob_id: unknown blob {blob_id}")


def _descriptor(body: TaskIn) -> DescriptorBody | None:
    """The signed descriptor's body, parsed once (None without one), when it describes this very request.
    Its signature is not checked here: the server pins no keys, nodes verify it."""
    if body.descriptor is None:
        return None
    try:
        raw = body.descriptor.encode()
    except UnicodeEncodeError:
        raise ApiError(422, "invalid-descriptor", "the task descriptor is not valid text") from None
    if len(raw) > DESCRIPTOR_MAX_BYTES:
        raise ApiError(422, "invalid-descriptor", f"the task descriptor is over {DESCRIPTOR_MAX_BYTES} bytes")
    try:
        document = DescriptorDocument.parse(raw)
        signed = document.body()
    except TrustError as exc:
        raise ApiError(422, "invalid-descriptor", exc.message) from None
    targets = [t.org for t in signed.targets]
    if document.descriptor.kind != KIND_DESCRIPTOR or len(set(targets)) != len(targets):
        raise ApiError(422, "invalid-descriptor", "not a task descriptor (wrong kind, or a target twice)")
    if signed.image != body.image:
        raise _mismatch(f"the descriptor names image {signed.image!r}, the request {body.image!r}")
    if set(targets) != {o.id for o in body.organizations}:
        raise _mismatch(f"the descriptor targets organizations {sorted(targets)}, the request others")
    return signed


def _mismatch(detail: str) -> ApiError:
    return ApiError(422, "descriptor-mismatch", detail)


def _new_task(p: Principal, body: TaskIn, collab: _Collab, parent: Task | None) -> dict[str, Any]:
    """The task row's values."""
    return {
        "collaboration_id": collab.id,
        "initiator_organization_id": p.organization_id,
        "initiator_user_id": p.user_id,
        "initiator_run_id": p.run_id,
        "image": body.image,
        "image_digest": body.image_digest or (body.image.split("@", 1)[1] if "@" in body.image else None),
        "name": body.name,
        "description": body.description,
        "datasets": body.datasets,
        "parent_id": parent.id if parent else None,
        "job_id": job_of(parent) if parent else None,  # NULL: a top-level task is its own job
        "status": TaskStatus.PENDING,
        "created_at": utcnow(),
        "descriptor": body.descriptor,
    }


async def _insert(
    request: web.Request, s: AsyncSession, p: Principal, body: TaskIn, stored: StoredBlob | None
) -> web.Response:
    """Blob row (multipart), task and runs in one transaction; doorbells once committed."""
    signed = _descriptor(body)
    collab, parent = await _context(s, p, body)
    if signed is not None and signed.collaboration != collab.id:
        raise _mismatch(f"the descriptor names collaboration {signed.collaboration}, not {collab.id}")
    await _check_targets(s, p, collab, body)
    conn = await s.connection()
    if stored is not None:
        await conn.execute(_INSERT_BLOB, _blob_row(p, stored))
    values = _new_task(p, body, collab, parent)
    task = NewTask(id=(await conn.execute(_INSERT_TASK, values)).scalar_one(), **_shown(values))
    input_of = {o.id: stored.id if stored else o.input_blob_id for o in body.organizations}
    rows = [
        {"task_id": task.id, "job_id": job_of(task), "organization_id": org, "input_blob_id": blob}
        for org, blob in input_of.items()
    ]
    inserted = await conn.execute(_INSERT_RUNS, rows)
    job = job_of(task)
    runs = sorted((RunRef(run_id, task.id, org, None, job) for run_id, org in inserted), key=lambda r: r.id)
    await s.commit()
    targets = pair_targets(collab.nodes, runs) if request.app[DOORBELL].address is not None else []
    publish(request, targets, "run-created")
    if stored is not None:
        request.app[METRICS].blob_bytes_in.inc(stored.size)
    return json_response(out(task, [r.organization_id for r in runs]), 201)


def _shown(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k != "initiator_run_id"}


def _blob_row(p: Principal, stored: StoredBlob) -> dict[str, Any]:
    return {
        "id": stored.id,
        "size": stored.size,
        "sha256": stored.sha256,
        "owner_organization_id": p.organization_id,
        "owner_user_id": p.user_id,
        "owner_node_id": p.node_id,
        "data": stored.data,
    }


async def create_task(request: web.Request) -> web.Response:
    """A task, one pending run per target organization, and a doorbell for each target node."""
    if multipart.is_type(request.headers.get(hdrs.CONTENT_TYPE, ""), "form-data"):
        return await _create_multipart(request)
    body = await read_json(request, TaskIn)
    async with session(request) as s:
        p = await caller(request, s)
        return await _insert(request, s, p, body, None)


async def _create_multipart(request: web.Request) -> web.Response:
    """Authenticate and authorize first (nothing is stored for a caller who may not create tasks), then
    stream the parts; the envelope's file is removed again if the task is not created."""
    store = request.app[BLOBS]
    if request.content_length is not None and request.content_length > store.max_bytes + TASK_PART_MAX_BYTES:
        raise _too_large(store.max_bytes)
    async with session(request) as s:
        p = await caller(request, s)
        require(p, "task", "create")
        require(p, "blob", "create")
        count, size = await blob_limits.stored(s, p.organization_id)
    try:  # the input counts against the organization's blob quota until its row is committed
        limits = request.app[SETTINGS].limits
        meter = blob_limits.Upload(request.app[USAGE], limits, p.organization_id, count, size)
    except blob_limits.QuotaExceeded as exc:
        raise exc.error from None
    try:
        body, stored = await _read_parts(request, store, meter)
        try:
            async with session(request) as s:
                return await _insert(request, s, p, body, stored)
        except BaseException:
            await store.delete(stored.id)
            raise
    finally:
        meter.release()


async def _read_parts(
    request: web.Request, store: BlobStore, meter: blob_limits.Upload
) -> tuple[TaskIn, StoredBlob]:
    """The `task` part (JSON) and the `input` part (into blob storage), in either order."""
    body: TaskIn | None = None
    stored: StoredBlob | None = None
    try:
        async with contextlib.aclosing(_parts(request)) as parts:
            async for name, chunks in parts:
                if name == "task" and body is None:
                    body = validate(TaskIn, _json(await _collect(chunks, TASK_PART_MAX_BYTES)))
                elif name == "input" and stored is None:
                    stored = await store.write(meter.chunks(chunks), ROW_BYTES)
                else:
                    raise _malformed(f"unexpected part {name!r}")
        if body is None or stored is None:
            raise _malformed("a `task` part and an `input` part are both required")
        if any(o.input_blob_id for o in body.organizations):
            raise ApiError(422, "validation-error", "input_blob_id: the input part is every run's input")
    except BaseException as exc:
        if stored is not None:
            await store.delete(stored.id)
        if isinstance(exc, BlobTooLarge):
            raise _too_large(store.max_bytes) from exc
        if isinstance(exc, blob_limits.QuotaExceeded):
            raise exc.error from None
        if isinstance(exc, (ValueError, AssertionError, LookupError)):
            raise _malformed(str(exc) or type(exc).__name__) from exc
        raise
    return body, stored


async def _parts(request: web.Request) -> AsyncGenerator[tuple[str | None, AsyncIterator[bytes]]]:
    """(name, its bytes) per part: a small body is read whole and split in memory (vfed.common.multipart, on
    python-multipart: aiohttp's reader parses each part's headers with the `email` package, ~0.4 ms of CPU per
    task request); a larger or chunked one streams through aiohttp's reader."""
    length = request.content_length
    if length is not None and length <= SMALL_FORM_BYTES:
        ctype = request.headers.get(hdrs.CONTENT_TYPE, "")
        for piece in multipart.split(ctype, await request.read(), "form-data"):
            yield piece.name, _once(piece.data)
        return
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise _malformed("nested multipart parts are not accepted")
        yield part.name, _chunks(part)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _collect(chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    data = bytearray()
    async for chunk in chunks:
        data.extend(chunk)
        if len(data) > max_bytes:
            raise ApiError(413, "too-large", f"the task part may be at most {max_bytes} bytes")
    return bytes(data)


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(CHUNK_BYTES):
        yield chunk


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the task part is not valid JSON: {exc}", "malformed-json") from exc


def _malformed(detail: str) -> ApiError:
    return bad_request(
        f"malformed multipart body ({detail}): send a `task` part (JSON) and an `input` part (bytes)",
        "malformed-multipart",
    )


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "too-large", f"the input may be at most {limit} bytes")
