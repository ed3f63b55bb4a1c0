"""Removing blobs nothing uses any more (docs/security.md "Limits").

A blob is uploaded before the task or result that references it, so a fresh unreferenced blob is normal: the
collector removes only blobs older than `limits.blob_keep_s` that no row references. "References" are found in
the schema itself (every foreign key to `blobs.id`: runs' inputs and results today), so a table added later is
respected without a change here. The DELETE re-checks the references in the same statement, so a task created
meanwhile keeps its input (or, on a race, fails on the foreign key and is retried by its client); files are
removed after the rows are committed. Stored blobs without a row (a crash between writing and committing) and
unfinished uploads (a `.part` file, an S3 multipart upload) are removed once nothing was written to them for
the keep time, unless this process is still writing them; an upload in progress on another server machine
sharing an S3 bucket keeps adding parts, so it is never idle that long. A resumable upload session's bytes
are spared while the session lives; an expired session (no append for `limits.upload_expiry_s`) is removed
with them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

from aiohttp import web
from sqlalchemy import Table, and_, delete, exists, not_, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from vfed.server.blobs import BlobStore, BlobStoreError
from vfed.server.models import Base, Blob, UploadSession, utcnow
from vfed.server.state import BLOBS, SESSIONS, SETTINGS

log = logging.getLogger(__name__)
BATCH = 500
BLOBS_TABLE: Table = Blob.__table__  # type: ignore[assignment]


@dataclass
class Collected:
    rows: int = 0
    files: int = 0
    uploads: int = 0


def _unreferenced() -> list[object]:
    """One NOT EXISTS per foreign key to blobs.id in the schema."""
    clauses: list[object] = []
    for table in Base.metadata.sorted_tables:
        for fk in table.foreign_keys:
            if fk.column is BLOBS_TABLE.c.id:
                clauses.append(not_(exists().where(fk.parent == BLOBS_TABLE.c.id)))
    return clauses


async def collect(sessions: async_sessionmaker[AsyncSession], store: BlobStore, keep_s: float) -> Collected:
    """One pass: unreferenced blobs older than keep_s (rows and files), then orphaned files."""
    done = Collected()
    cutoff = utcnow() - timedelta(seconds=keep_s)
    unused = and_(BLOBS_TABLE.c.created_at < cutoff, *_unreferenced())  # type: ignore[arg-type]
    while True:
        async with sessions() as s:
            ids = list((await s.execute(select(BLOBS_TABLE.c.id).where(unused).limit(BATCH))).scalars())
            if not ids:
                break
            try:
                removed = list(
                    (
                        await s.execute(
                            delete(BLOBS_TABLE)
                            .where(BLOBS_TABLE.c.id.in_(ids), unused)
                            .returning(BLOBS_TABLE.c.id)
                        )
                    ).scalars()
                )
                await s.commit()
            except DBAPIError as exc:  # a run referencing one was inserted meanwhile: next pass
                log.info("blob collection deferred: %s", exc.orig)
                break
        for blob_id in removed:
            await store.delete(blob_id)
        done.rows += len(removed)
        if len(ids) < BATCH:
            break
    done.uploads = await _expired_uploads(sessions, store)
    done.files = await _orphans(sessions, store, keep_s)
    return done


async def _expired_uploads(sessions: async_sessionmaker[AsyncSession], store: BlobStore) -> int:
    """Upload sessions past their expiry, with what they stored (rows first: a late append then finds none
    and answers 404 rather than writing into bytes being removed)."""
    removed = 0
    while True:
        async with sessions() as s:
            rows = list(
                (
                    await s.execute(
                        delete(UploadSession)
                        .where(
                            UploadSession.id.in_(
                                select(UploadSession.id)
                                .where(UploadSession.expires_at < utcnow())
                                .limit(BATCH)
                            )
                        )
                        .returning(UploadSession.blob_id, UploadSession.handle)
                    )
                ).all()
            )
            await s.commit()
        for blob_id, handle in rows:
            await store.abort_upload(blob_id, handle)
        removed += len(rows)
        if len(rows) < BATCH:
            return removed


async def _orphans(sessions: async_sessionmaker[AsyncSession], store: BlobStore, keep_s: float) -> int:
    """Stored blobs and unfinished uploads idle for keep_s that have no row and are not being written."""
    old = await store.leftovers(time.time() - keep_s)
    removed = 0
    for start in range(0, len(old), BATCH):
        batch = old[start : start + BATCH]
        async with sessions() as s:
            ids = {item.blob_id for item in batch}
            known = set((await s.execute(select(Blob.id).where(Blob.id.in_(ids)))).scalars())
            uploading = set(
                (
                    await s.execute(select(UploadSession.blob_id).where(UploadSession.blob_id.in_(ids)))
                ).scalars()
            )
        for item in batch:
            if (item.blob_id in known and not item.partial) or item.blob_id in store.writing:
                continue
            if item.partial and item.blob_id in uploading:  # a live session's bytes
                continue
            await store.remove(item)
            removed += 1
    return removed


async def _loop(app: web.Application) -> None:
    limits = app[SETTINGS].limits
    while True:
        await asyncio.sleep(limits.blob_collect_interval_s)
        try:
            done = await collect(app[SESSIONS], app[BLOBS], limits.blob_keep_s)
        except (OSError, DBAPIError, BlobStoreError) as exc:
            log.warning("blob collection failed, trying again later: %s", exc)
            continue
        if done.rows or done.files or done.uploads:
            log.info(
                "removed %d unreferenced blobs, %d orphaned blob files and %d expired uploads",
                done.rows,
                done.files,
                done.uploads,
            )


async def collector(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: collect every `blob_collect_interval_s` while the server runs."""
    task = asyncio.create_task(_loop(app), name="blob-collector")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
