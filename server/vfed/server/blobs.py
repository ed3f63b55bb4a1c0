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


class BlobTooLarge(Exception):
    """The stream went past the configured maximum; nothing was kept."""


@dataclass(frozen=True)
class StoredBlob:
    id: str
    size: int
    sha256: str


class BlobStore:
    """Files under `root/<2 hex>/<id>`; written to a temporary name, renamed when complete."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def path(self, blob_id: str) -> Path:
        """Where blob `blob_id` lives (ids are hex, so no path tricks)."""
        return self.root / blob_id[:2] / blob_id

    async def write(self, chunks: AsyncIterator[bytes]) -> StoredBlob:
        """Consume `chunks` into a new blob; raise BlobTooLarge past `max_bytes`."""
        blob_id = secrets.token_hex(16)
        final = self.path(blob_id)
        tmp = final.with_suffix(".part")
        await asyncio.to_thread(final.parent.mkdir, parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fh = await asyncio.to_thread(tmp.open, "wb")
        try:
            buf: list[bytes] = []
            buffered = 0
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_bytes:
                    raise BlobTooLarge(f"the blob exceeds the maximum of {self.max_bytes} bytes")
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
        return StoredBlob(blob_id, size, digest.hexdigest())

    async def delete(self, blob_id: str) -> None:
        """Remove a blob's file if present."""
        await asyncio.to_thread(self.path(blob_id).unlink, missing_ok=True)


def _write_hash(fh: BinaryIO, digest: hashlib._Hash, parts: list[bytes]) -> None:
    for part in parts:
        digest.update(part)
        fh.write(part)
