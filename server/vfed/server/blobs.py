"""Blob storage on the filesystem: streamed in with a running SHA-256, never held whole in memory."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 1 << 20
ROW_BYTES = 64 << 10  # blobs up to this size live in their database row (sealed task inputs, small results)
INLINE_BYTES = 64 << 10  # up to this size a blob is written on the event loop: page-cache writes of a few
# KiB take tens of microseconds, a hand-off to a worker thread ~1 ms on a busy machine


class BlobTooLarge(Exception):
    """The stream went past the configured maximum; nothing was kept."""


@dataclass(frozen=True)
class StoredBlob:
    id: str
    size: int
    sha256: str
    data: bytes | None = None  # the bytes themselves when small enough to live in the blob's row


class BlobStore:
    """Files under `root/<2 hex>/<id>`; written to a temporary name, renamed when complete."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._dirs: set[str] = set()  # subfolders known to exist: a mkdir per blob costs ~0.2 ms of CPU
        self.writing: set[str] = set()  # ids being written: the collector never removes their files

    def path(self, blob_id: str) -> Path:
        """Where blob `blob_id` lives (ids are hex, so no path tricks)."""
        return self.root / blob_id[:2] / blob_id

    async def write(self, chunks: AsyncIterator[bytes], row_max_bytes: int = 0) -> StoredBlob:
        """Consume `chunks` into a new blob; raise BlobTooLarge past `max_bytes`.

        Up to `row_max_bytes` the bytes are handed back for the blob's database row and no file is made.
        A body that fits in one chunk is written by a single call (small envelopes are the common case: on the
        loop up to INLINE_BYTES, else in a worker thread); larger ones stream to disk chunk by chunk.
        """
        blob_id = secrets.token_hex(16)
        self.writing.add(blob_id)
        try:
            return await self._write(blob_id, chunks, row_max_bytes)
        finally:
            self.writing.discard(blob_id)

    async def _write(self, blob_id: str, chunks: AsyncIterator[bytes], row_max_bytes: int) -> StoredBlob:
        final = self.path(blob_id)
        digest = hashlib.sha256()
        it = aiter(chunks)
        head, size = [], 0
        async for chunk in it:
            size += len(chunk)
            self._check(size)
            head.append(chunk)
            if size >= CHUNK_BYTES:
                break
        else:
            if size <= row_max_bytes:
                data = b"".join(head)
                return StoredBlob(blob_id, size, hashlib.sha256(data).hexdigest(), data)
            await self._ensure_dir(blob_id)
            if size <= INLINE_BYTES:
                _write_whole(final, digest, head)
            else:
                await asyncio.to_thread(_write_whole, final, digest, head)
            return StoredBlob(blob_id, size, digest.hexdigest())
        await self._ensure_dir(blob_id)
        size = await self._stream(final, digest, head, size, it)
        return StoredBlob(blob_id, size, digest.hexdigest())

    async def _ensure_dir(self, blob_id: str) -> None:
        if blob_id[:2] not in self._dirs:
            await asyncio.to_thread(self.path(blob_id).parent.mkdir, parents=True, exist_ok=True)
            self._dirs.add(blob_id[:2])

    def _check(self, size: int) -> None:
        if size > self.max_bytes:
            raise BlobTooLarge(f"the blob exceeds the maximum of {self.max_bytes} bytes")

    async def _stream(
        self, final: Path, digest: hashlib._Hash, head: list[bytes], size: int, rest: AsyncIterator[bytes]
    ) -> int:
        tmp = final.with_suffix(".part")
        fh = await asyncio.to_thread(_open_part, tmp)
        try:
            buf, buffered = head, size
            async for chunk in rest:
                size += len(chunk)
                self._check(size)
                buf.append(chunk)
                buffered += len(chunk)
                if buffered >= CHUNK_BYTES:
                    await asyncio.to_thread(_write_hash, fh, digest, buf)
                    buf, buffered = [], 0
            await asyncio.to_thread(_write_hash, fh, digest, buf)
            await asyncio.to_thread(fh.close)
            await asyncio.to_thread(os.replace, tmp, final)
        except BaseException:
            await asyncio.to_thread(fh.close)
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
            raise
        return size

    async def delete(self, blob_id: str) -> None:
        """Remove a blob's file if present."""
        await asyncio.to_thread(self.path(blob_id).unlink, missing_ok=True)


def _write_hash(fh: BinaryIO, digest: hashlib._Hash, parts: list[bytes]) -> None:
    for part in parts:
        digest.update(part)
        fh.write(part)


def _open_part(tmp: Path) -> BinaryIO:
    return tmp.open("wb")


def _write_whole(final: Path, digest: hashlib._Hash, parts: list[bytes]) -> None:
    """Straight to the final name (no temporary + rename): the id is new and unpublished until its row is
    committed, so nobody can read a half-written file; a failed write removes it."""
    try:
        with final.open("xb") as fh:
            _write_hash(fh, digest, parts)
    except BaseException:
        final.unlink(missing_ok=True)
        raise
