"""Blob upload (streamed, hashed, size-capped) and download (sendfile, Range resumes)."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from sqlalchemy import Row, Table, bindparam, insert, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.common.api import resources as res
from vfed.server import blob_limits
from vfed.server.access import Scope, require, run_filter, scope_of
from vfed.server.api.common import caller, json_response, session
from vfed.server.auth import Principal
from vfed.server.blob_limits import USAGE
from vfed.server.blobs import CHUNK_BYTES, ROW_BYTES, BlobMissing, BlobStoreError, BlobTooLarge, StoredBlob
from vfed.server.errors import ApiError, not_found
from vfed.server.metrics import METRICS
from vfed.server.models import Blob, Run
from vfed.server.state import BLOBS, SETTINGS

log = logging.getLogger(__name__)
BLOBS_TABLE: Table = Blob.__table__  # type: ignore[assignment]


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "too-large", f"blobs may be at most {limit} bytes")


async def upload_blob(request: web.Request) -> web.Response:
    """Stream the body to a file, recording size and SHA-256, within the organization's quota."""
    store = request.app[BLOBS]
    if request.content_length is not None and request.content_length > store.max_bytes:
        raise _too_large(store.max_bytes)
    async with session(request) as s:
        p = await caller(request, s)
        require(p, "blob", "create")
        count, size = await blob_limits.stored(s, p.organization_id)
    settings = request.app[SETTINGS]
    try:
        meter = blob_limits.Upload(request.app[USAGE], settings.limits, p.organization_id, count, size)
    except blob_limits.QuotaExceeded as exc:
        raise exc.error from None
    try:
        stored = await _write(request, meter)
        async with session(request) as s:  # a Core INSERT: the ORM's unit of work costs more than the write
            await s.execute(
                insert(BLOBS_TABLE).values(
                    id=stored.id,
                    size=stored.size,
                    sha256=stored.sha256,
                    owner_organization_id=p.organization_id,
                    owner_user_id=p.user_id,
                    owner_node_id=p.node_id,
                    data=stored.data,
                )
            )
            await s.commit()
    finally:
        meter.release()
    request.app[METRICS].blob_bytes_in.inc(stored.size)
    return json_response(res.Blob(id=stored.id, size=stored.size, sha256=stored.sha256), 201)


async def _write(request: web.Request, meter: blob_limits.Upload) -> StoredBlob:
    store = request.app[BLOBS]
    try:
        return await store.write(meter.chunks(request.content.iter_chunked(CHUNK_BYTES)), ROW_BYTES)
    except BlobTooLarge as exc:
        raise _too_large(store.max_bytes) from exc
    except blob_limits.QuotaExceeded as exc:
        raise exc.error from None


BlobRow = Row[*tuple[Any, ...]]  # id, size, sha256, owner_user_id, owner_node_id, data
_SHOWN = [BLOBS_TABLE.c[n] for n in ("id", "size", "sha256", "owner_user_id", "owner_node_id", "data")]
_BLOB_ROW = select(*_SHOWN).where(BLOBS_TABLE.c.id == bindparam("blob"))


async def readable_blob(s: AsyncSession, p: Principal, blob_id: str) -> BlobRow | None:
    """The blob (id, size, sha256, owners, data) if the caller uploaded it or may read a run that
    references it (runs are indexed by input and result blob, so that check does not walk every run)."""
    blob = (await (await s.connection()).execute(_BLOB_ROW, {"blob": blob_id})).first()
    if blob is None:
        return None
    run_scope = scope_of(p, "run", "read")
    if run_scope == Scope.GLOBAL:
        return blob
    if p.kind == "user" and blob.owner_user_id == p.user_id:
        return blob
    if p.kind in ("node", "run") and blob.owner_node_id == p.node_id and blob.owner_user_id is None:
        return blob
    if run_scope == Scope.NONE:
        return None
    uses = or_(Run.input_blob_id == blob_id, Run.result_blob_id == blob_id)
    found = (await s.execute(select(Run.id).where(uses, run_filter(p, run_scope)).limit(1))).first()
    return blob if found else None


async def download_blob(request: web.Request) -> web.StreamResponse:
    """The bytes; `Range: bytes=N-` answers 206 so broken transfers resume (on every store)."""
    blob_id = request.match_info["blob_id"]
    async with session(request) as s:
        p = await caller(request, s)
        blob = await readable_blob(s, p, blob_id)
    if blob is None:
        raise not_found("blob", blob_id)
    if blob.data is not None:
        return _from_row(request, blob, blob.data)
    store = request.app[BLOBS]
    path = store.local_file(blob.id)
    if path is None:
        return await _streamed(request, blob)
    sent = blob.size
    try:
        rng = request.http_range
        start, stop = rng.start or 0, rng.stop if rng.stop is not None else blob.size
        if start < 0:
            start, stop = max(blob.size + start, 0), blob.size
        sent = max(min(stop, blob.size) - start, 0)
    except ValueError:
        sent = 0
    request.app[METRICS].blob_bytes_out.inc(sent)
    return web.FileResponse(  # sendfile from the filesystem store; aiohttp answers the Range itself
        path,
        chunk_size=CHUNK_BYTES,
        headers={"Content-Type": "application/octet-stream", "X-Sha256": blob.sha256},
    )


def _byte_range(request: web.Request, size: int) -> tuple[int, int, int, dict[str, str]]:
    """(status, start, stop, headers) for the request's Range over `size` bytes: 200 for the whole, 206 with
    Content-Range for a part, ApiError 416 for a range past the end or a malformed one."""
    headers = {"Accept-Ranges": "bytes"}
    try:
        rng = request.http_range
    except ValueError as exc:
        raise ApiError(416, "range-not-satisfiable", f"bad Range header: {exc}") from exc
    if rng.start is None and rng.stop is None:
        return 200, 0, size, headers
    start = rng.start or 0
    stop = min(rng.stop, size) if rng.stop is not None else size
    if start < 0:
        start = max(size + start, 0)
    if start >= size or start >= stop:
        headers["Content-Range"] = f"bytes */{size}"
        raise ApiError(416, "range-not-satisfiable", f"the blob has {size} bytes", headers)
    headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    return 206, start, stop, headers


def _from_row(request: web.Request, blob: BlobRow, data: bytes) -> web.Response:
    """A blob kept in its row, with the same Range answers a file gets (206, or 416 past the end)."""
    status, start, stop, headers = _byte_range(request, len(data))
    headers["X-Sha256"] = blob.sha256
    request.app[METRICS].blob_bytes_out.inc(stop - start)
    body = data[start:stop]
    return web.Response(body=body, status=status, headers=headers, content_type="application/octet-stream")


async def _streamed(request: web.Request, blob: BlobRow) -> web.StreamResponse:
    """A blob from a remote store (S3), streamed chunk by chunk with the same Range answers. A store that
    fails before the first byte answers 503; one that fails midway cuts the body short, and the client
    resumes from what it has."""
    status, start, stop, headers = _byte_range(request, blob.size)
    headers["X-Sha256"] = blob.sha256
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_type = "application/octet-stream"
    resp.content_length = stop - start
    try:
        async with request.app[BLOBS].open(blob.id, start, stop) as chunks:
            await resp.prepare(request)
            async for chunk in chunks:
                await resp.write(chunk)
                request.app[METRICS].blob_bytes_out.inc(len(chunk))
    except BlobMissing:  # raised on opening, before anything is sent
        raise not_found("blob", blob.id) from None
    except BlobStoreError as exc:
        if not resp.prepared:
            raise
        log.warning("blob %s cut short after a store failure: %s", blob.id, exc)
        resp.force_close()
        return resp
    await resp.write_eof()
    return resp
