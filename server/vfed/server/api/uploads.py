"""Resumable uploads (docs/server.md "Uploads"): a session takes a blob's bytes over as many requests as a bad
link needs, and the blob appears only once they are all there and match the SHA-256 declared.

`POST /uploads` opens a session (its owner is the caller: another principal's session answers 404 as if it
did not exist); `GET` tells the committed offset; `PATCH ?offset=N` appends a body at exactly the committed
offset (else 409 with the right `offset`), and what arrived before a broken connection stays committed;
`POST .../complete` checks size and SHA-256 and makes the blob; `DELETE` drops the session. Appends to one
session are serialized in this process, and each commit is a compare-and-set on the row, so two server
processes cannot both append at one offset. The running SHA-256 is kept in memory between appends; after a
restart (or on another server process) the completion hashes the stored bytes once instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.common.api import resources as res
from vfed.server import blob_limits
from vfed.server.access import require
from vfed.server.api.common import caller, json_response, read_json, read_query, session
from vfed.server.auth import Principal
from vfed.server.blob_limits import USAGE
from vfed.server.blobs import CHUNK_BYTES, BlobStore, BlobTooLarge, UploadOffsetLost, capped
from vfed.server.errors import ApiError, bad_request, not_found
from vfed.server.metrics import METRICS
from vfed.server.models import Blob, UploadSession, utcnow
from vfed.server.schemas import UploadAppendQuery, UploadCompleteIn, UploadIn, UploadOut
from vfed.server.state import BLOBS, SETTINGS


@dataclass
class _Session:
    """In-process state of a session: the lock its appends take turns on, and the running hash."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    hashed: int = 0  # bytes `digest` has seen; it is only used while that equals the committed offset
    digest: Any = None


UPLOADS = web.AppKey("uploads", dict[str, _Session])
KEPT_HASHES = 10_000


def _offset_mismatch(offset: int) -> ApiError:
    return ApiError(
        409,
        "offset-mismatch",
        f"the upload has {offset} bytes: go on from offset {offset}",
        {"Upload-Offset": str(offset)},
        {"offset": offset},
    )


def _too_large(limit: int, declared: bool) -> ApiError:
    if declared:
        return ApiError(413, "too-large", f"the upload was declared as {limit} bytes")
    return ApiError(413, "too-large", f"blobs may be at most {limit} bytes")


def _out(row: UploadSession, offset: int | None = None) -> UploadOut:
    return UploadOut(
        id=row.id,
        blob_id=row.blob_id,
        offset=row.committed_bytes if offset is None else offset,
        size=row.size,
        sha256=row.sha256,
        expires_at=row.expires_at,
    )


def _mine(p: Principal, row: UploadSession) -> bool:
    return (row.owner_organization_id, row.owner_user_id, row.owner_node_id) == (
        p.organization_id,
        p.user_id,
        p.node_id,
    )


async def _owned(request: web.Request) -> tuple[Principal, UploadSession]:
    """The caller and its live session; 404 for a session that is absent, expired or someone else's."""
    upload_id = request.match_info["upload_id"]
    async with session(request) as s:
        p = await caller(request, s)
        require(p, "blob", "create")
        row = await s.get(UploadSession, upload_id)
    if row is None or not _mine(p, row) or row.expires_at <= utcnow():
        raise not_found("upload", upload_id)
    return p, row


@contextlib.asynccontextmanager
async def _turn(request: web.Request) -> AsyncIterator[_Session]:
    """The session's in-process state, with its lock held (a waiting request gives up after the body
    timeout: an append still running then is one whose client vanished without a word)."""
    states = request.app[UPLOADS]
    upload_id = request.match_info["upload_id"]
    state = states.setdefault(upload_id, _Session())
    state.users += 1
    try:
        try:
            async with asyncio.timeout(request.app[SETTINGS].limits.body_timeout_s):
                await state.lock.acquire()
        except TimeoutError:
            raise ApiError(409, "upload-busy", "another request is appending to this upload") from None
        try:
            yield state
        finally:
            state.lock.release()
    finally:
        state.users -= 1
        if state.users == 0 and state.digest is None:
            states.pop(upload_id, None)
        _forget_idle(states)


def _forget_idle(states: dict[str, _Session]) -> None:
    """Past KEPT_HASHES sessions, the oldest idle ones lose their running hash (their completion then reads
    the stored bytes once): abandoned sessions cannot fill the memory."""
    if len(states) > KEPT_HASHES:
        for upload_id in [k for k, v in states.items() if v.users == 0][: len(states) - KEPT_HASHES]:
            del states[upload_id]


async def _usage(s: AsyncSession, org_id: int) -> tuple[int, int]:
    """(count, bytes) the organization's blobs and open sessions take."""
    count, size = await blob_limits.stored(s, org_id)
    row = (
        await s.execute(
            select(func.count(), func.coalesce(func.sum(UploadSession.committed_bytes), 0)).where(
                UploadSession.owner_organization_id == org_id
            )
        )
    ).one()
    return count + int(row[0]), size + int(row[1])


async def create_upload(request: web.Request) -> web.Response:
    """Open a session; its bytes count against the organization's quota as they arrive."""
    body = await read_json(request, UploadIn)
    store = request.app[BLOBS]
    limits = request.app[SETTINGS].limits
    if body.size is not None and body.size > store.max_bytes:
        raise _too_large(store.max_bytes, False)
    async with session(request) as s:
        p = await caller(request, s)
        require(p, "blob", "create")
        count, size = await _usage(s, p.organization_id)
    if count >= limits.blob_quota_count:
        raise blob_limits.quota_error(429, p.organization_id, "blobs", limits.blob_quota_count)
    if size + (body.size or 0) > limits.blob_quota_bytes:
        raise blob_limits.quota_error(413, p.organization_id, "bytes", limits.blob_quota_bytes)
    blob_id = secrets.token_hex(16)
    handle = await store.begin_upload(blob_id)
    row = UploadSession(
        id=secrets.token_hex(16),
        blob_id=blob_id,
        owner_organization_id=p.organization_id,
        owner_user_id=p.user_id,
        owner_node_id=p.node_id,
        size=body.size,
        sha256=body.sha256,
        committed_bytes=0,
        handle=handle,
        created_at=utcnow(),
        expires_at=utcnow() + timedelta(seconds=limits.upload_expiry_s),
    )
    try:
        async with session(request) as s:
            s.add(row)
            await s.commit()
    except BaseException:
        await store.abort_upload(blob_id, handle)
        raise
    resp = json_response(_out(row), 201)
    resp.headers["Location"] = f"{request.path}/{row.id}"
    return resp


async def get_upload(request: web.Request) -> web.Response:
    """The session's committed offset: where a client whose append broke goes on from (after an append
    still running, e.g. one whose connection just broke, settled)."""
    async with _turn(request):
        _, row = await _owned(request)
    return json_response(_out(row))


async def append_upload(request: web.Request) -> web.Response:
    """Append the body at `offset`; answers the new committed offset (also what a broken body left)."""
    query = read_query(request, UploadAppendQuery)
    if query.offset is None:
        raise bad_request("give the append's offset: ?offset=<the upload's committed offset>")
    async with _turn(request) as state:
        p, row = await _owned(request)
        if query.offset != row.committed_bytes:
            raise _offset_mismatch(row.committed_bytes)
        offset = await _append(request, p, row, state)
    return json_response(_out(row, offset))


async def _append(request: web.Request, p: Principal, row: UploadSession, state: _Session) -> int:
    store, limits = request.app[BLOBS], request.app[SETTINGS].limits
    async with session(request) as s:
        count, used = await _usage(s, p.organization_id)
    try:
        meter = blob_limits.Upload(request.app[USAGE], limits, p.organization_id, count - 1, used)
    except blob_limits.QuotaExceeded as exc:
        raise exc.error from None
    committed = row.committed_bytes
    if state.digest is None or state.hashed != committed:
        state.digest, state.hashed = (hashlib.sha256(), 0) if committed == 0 else (None, 0)

    async def hashed(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            if state.digest is not None:
                state.digest.update(chunk)
                state.hashed += len(chunk)
            yield chunk

    async def commit(offset: int) -> None:  # also while the handler is cancelled (its client went away)
        nonlocal committed
        await _commit(request, row.id, committed, offset)
        request.app[METRICS].blob_bytes_in.inc(offset - committed)
        committed = offset

    limit = min(store.max_bytes, row.size if row.size is not None else store.max_bytes)
    body = hashed(capped(meter.chunks(request.content.iter_chunked(CHUNK_BYTES)), limit - committed))
    try:
        await store.append_upload(row.blob_id, row.handle, committed, body, commit)
    except BlobTooLarge:
        raise _too_large(limit, row.size is not None) from None
    except blob_limits.QuotaExceeded as exc:
        raise exc.error from None
    except UploadOffsetLost as exc:
        await _commit(request, row.id, None, exc.offset)
        raise _offset_mismatch(exc.offset) from None
    except (ConnectionError, ClientPayloadError, HttpProcessingError):
        pass  # the client went away mid-body: what arrived is committed, and it asks for the offset
    finally:
        meter.release()
    return committed


async def _commit(request: web.Request, upload_id: str, before: int | None, offset: int) -> None:
    """Record the new committed offset if the row still has `before` (None: whatever it has); 409 if
    another request moved it meanwhile. Each commit moves the expiry on."""
    expires = utcnow() + timedelta(seconds=request.app[SETTINGS].limits.upload_expiry_s)
    where = [UploadSession.id == upload_id]
    if before is not None:
        where.append(UploadSession.committed_bytes == before)
    async with session(request) as s:
        done = await s.execute(
            update(UploadSession).where(*where).values(committed_bytes=offset, expires_at=expires)
        )
        await s.commit()
    if done.rowcount != 1:  # type: ignore[attr-defined]
        raise ApiError(409, "upload-conflict", "another request appended to this upload meanwhile")


async def complete_upload(request: web.Request) -> web.Response:
    """Check the size and SHA-256 against what arrived (and what was declared), then make the blob."""
    body = await read_json(request, UploadCompleteIn)
    store = request.app[BLOBS]
    async with _turn(request) as state:
        p, row = await _owned(request)
        if body.size != row.committed_bytes:
            raise _offset_mismatch(row.committed_bytes)
        declared = (row.size if row.size is not None else body.size, row.sha256 or body.sha256)
        if declared != (body.size, body.sha256):
            raise ApiError(422, "checksum-mismatch", "the size or SHA-256 differs from the one declared")
        store.writing.add(row.blob_id)  # the collector spares it until its row exists
        try:
            digest = await _finish(request, store, row, state)
            if digest != body.sha256:
                await _discard(request, store, row)
                raise ApiError(
                    422,
                    "checksum-mismatch",
                    "the bytes received do not have the SHA-256 given; the upload was dropped, start again",
                )
            async with session(request) as s:
                await s.execute(
                    insert(Blob.__table__).values(  # type: ignore[arg-type]
                        id=row.blob_id,
                        size=body.size,
                        sha256=digest,
                        owner_organization_id=p.organization_id,
                        owner_user_id=p.user_id,
                        owner_node_id=p.node_id,
                        data=None,
                    )
                )
                await s.execute(delete(UploadSession).where(UploadSession.id == row.id))
                await s.commit()
            state.digest = None  # the state goes with the request's turn
        finally:
            store.writing.discard(row.blob_id)
    return json_response(res.Blob(id=row.blob_id, size=body.size, sha256=digest), 201)


async def _finish(request: web.Request, store: BlobStore, row: UploadSession, state: _Session) -> str:
    """Store the blob; its SHA-256 from the running hash, or read back once when that was lost."""
    try:
        await store.finish_upload(row.blob_id, row.handle, row.committed_bytes)
    except UploadOffsetLost as exc:
        await _commit(request, row.id, None, exc.offset)
        raise _offset_mismatch(exc.offset) from None
    if state.digest is not None and state.hashed == row.committed_bytes:
        return str(state.digest.hexdigest())
    digest = hashlib.sha256()
    async with store.open(row.blob_id) as chunks:
        async for chunk in chunks:
            digest.update(chunk)
    return digest.hexdigest()


async def _discard(request: web.Request, store: BlobStore, row: UploadSession) -> None:
    request.app[UPLOADS][row.id].digest = None  # the state goes with the request's turn
    await store.delete(row.blob_id)
    await store.abort_upload(row.blob_id, row.handle)
    async with session(request) as s:
        await s.execute(delete(UploadSession).where(UploadSession.id == row.id))
        await s.commit()


async def delete_upload(request: web.Request) -> web.Response:
    """Drop the session and what it stored."""
    async with _turn(request):
        _, row = await _owned(request)
        await _discard(request, request.app[BLOBS], row)
    return web.Response(status=204)
