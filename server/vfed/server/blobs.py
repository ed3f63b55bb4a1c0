"""Blob storage behind one interface: streamed in with a running SHA-256 and a size cap, never held whole in
memory, read back whole or by byte range. The filesystem store lives here; the S3 store in blobs_s3.py.

Every caller (uploads, downloads, the collector) speaks to `BlobStore`; only the filesystem store knows paths,
and it hands one out solely for the sendfile fast path (`local_file`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 1 << 20
ROW_BYTES = 64 << 10  # blobs up to this size live in their database row (sealed task inputs, small results)
SESSION_COMMIT_BYTES = 8 << 20  # an upload session's file records its committed offset this often
INLINE_BYTES = 64 << 10  # up to this size a blob is written on the event loop: page-cache writes of a few
# KiB take tens of microseconds, a hand-off to a worker thread ~1 ms on a busy machine


class BlobTooLarge(Exception):
    """The stream went past the configured maximum; nothing was kept."""


class BlobMissing(Exception):
    """A blob whose row exists has no stored bytes (removed by hand, or a store that lost it)."""


class UploadOffsetLost(Exception):
    """An upload session's store holds fewer bytes than its row says (lost in a crash); `offset` is what it
    holds, where the client must go on from."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"the upload holds {offset} bytes")
        self.offset = offset


Commit = Callable[[int], Awaitable[None]]  # records a session's new committed offset (raises to stop it)


class BlobStoreError(Exception):
    """The blob store cannot be used (unreachable, refused credentials, no such bucket); one line saying what
    to do. Requests answer 503 with it; at start it stops `vserver start`."""


@dataclass(frozen=True)
class StoredBlob:
    id: str
    size: int
    sha256: str
    data: bytes | None = None  # the bytes themselves when small enough to live in the blob's row


@dataclass(frozen=True)
class Leftover:
    """A stored blob or an unfinished upload that the collector may remove when no row names it."""

    blob_id: str
    partial: bool  # an upload that never completed (a `.part` file, an S3 multipart upload)
    handle: str  # what the store needs to remove it (a path, an upload id)


async def capped(chunks: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    """`chunks` with the size cap applied while they stream (no Content-Length is trusted)."""
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise BlobTooLarge(f"the blob exceeds the maximum of {max_bytes} bytes")
        yield chunk


class BlobStore(ABC):
    """What the server needs of a blob store. Subclasses store a body past the row limit (`_store`)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.writing: set[str] = set()  # ids being written by this process: the collector spares them

    async def write(self, chunks: AsyncIterator[bytes], row_max_bytes: int = 0) -> StoredBlob:
        """Consume `chunks` into a new blob; raise BlobTooLarge past `max_bytes` (nothing is kept then).

        Up to `row_max_bytes` the bytes are handed back for the blob's database row and nothing is stored.
        """
        blob_id = secrets.token_hex(16)
        self.writing.add(blob_id)
        try:
            it = aiter(capped(chunks, self.max_bytes))
            head: list[bytes] = []
            size = 0
            async for chunk in it:
                size += len(chunk)
                head.append(chunk)
                if size >= CHUNK_BYTES:
                    break
            else:
                if size <= row_max_bytes:
                    data = b"".join(head)
                    return StoredBlob(blob_id, size, hashlib.sha256(data).hexdigest(), data)
                return await self._store(blob_id, head, size, None)
            return await self._store(blob_id, head, size, it)
        finally:
            self.writing.discard(blob_id)

    @abstractmethod
    async def _store(
        self, blob_id: str, head: list[bytes], size: int, rest: AsyncIterator[bytes] | None
    ) -> StoredBlob:
        """Store `head` then `rest` (None: the body ended within `head`) so that the blob becomes visible
        only when complete; on any error nothing of it stays visible."""

    @abstractmethod
    def open(
        self, blob_id: str, start: int = 0, stop: int | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """`async with store.open(id, start, stop) as chunks`: bytes [start, stop) streamed in chunks of
        at most CHUNK_BYTES. BlobMissing (raised on entry) when the blob has no stored bytes."""

    @abstractmethod
    async def delete(self, blob_id: str) -> None:
        """Remove a stored blob if present."""

    @abstractmethod
    async def leftovers(self, before: float) -> list[Leftover]:
        """Stored blobs and unfinished uploads last written before `before` (a Unix time)."""

    @abstractmethod
    async def remove(self, leftover: Leftover) -> None:
        """Remove what `leftovers` named (a missing one is no error)."""

    # Upload sessions (api/uploads.py): the bytes of blob `blob_id` arrive over several requests, each
    # appending at the committed offset; the blob becomes visible (its row) only after `finish_upload`.

    @abstractmethod
    async def begin_upload(self, blob_id: str) -> str:
        """Start an upload session's storage; the handle the later calls take."""

    @abstractmethod
    async def append_upload(
        self, blob_id: str, handle: str, offset: int, chunks: AsyncIterator[bytes], commit: Commit
    ) -> int:
        """Append `chunks` at `offset` (what was committed before), calling `commit` with each new durable
        offset, also when `chunks` breaks off (a dropped connection): what arrived stays. Returns the last
        committed offset. UploadOffsetLost when the store holds less than `offset`."""

    @abstractmethod
    async def finish_upload(self, blob_id: str, handle: str, size: int) -> None:
        """Make the session's `size` bytes the stored blob `blob_id` (still invisible until its row)."""

    @abstractmethod
    async def abort_upload(self, blob_id: str, handle: str) -> None:
        """Remove what a session stored (a missing one is no error)."""

    async def prepare(self) -> None:  # noqa: B027 (a hook; stores that need nothing keep it empty)
        """At server start: make sure the store can be used (BlobStoreError if not)."""

    async def close(self) -> None:  # noqa: B027
        """At server stop: release connections."""

    def local_file(self, blob_id: str) -> Path | None:
        """A local file holding the blob, for the sendfile fast path; None for remote stores."""
        del blob_id
        return None


class FileBlobStore(BlobStore):
    """Files under `root/<2 hex>/<id>`; written to a temporary name, renamed when complete."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self.root = root
        self._dirs: set[str] = set()  # subfolders known to exist: a mkdir per blob costs ~0.2 ms of CPU

    def path(self, blob_id: str) -> Path:
        """Where blob `blob_id` lives (ids are hex, so no path tricks)."""
        return self.root / blob_id[:2] / blob_id

    def local_file(self, blob_id: str) -> Path | None:
        return self.path(blob_id)

    async def prepare(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)

    async def _store(
        self, blob_id: str, head: list[bytes], size: int, rest: AsyncIterator[bytes] | None
    ) -> StoredBlob:
        """A body that fits in one chunk is written by a single call (small envelopes are the common
        case: on the loop up to INLINE_BYTES, else in a worker thread); larger ones stream to disk."""
        final = self.path(blob_id)
        digest = hashlib.sha256()
        await self._ensure_dir(blob_id)
        if rest is None:
            if size <= INLINE_BYTES:
                _write_whole(final, digest, head)
            else:
                await asyncio.to_thread(_write_whole, final, digest, head)
            return StoredBlob(blob_id, size, digest.hexdigest())
        size = await self._stream(final, digest, head, size, rest)
        return StoredBlob(blob_id, size, digest.hexdigest())

    async def _ensure_dir(self, blob_id: str) -> None:
        if blob_id[:2] not in self._dirs:
            await asyncio.to_thread(self.path(blob_id).parent.mkdir, parents=True, exist_ok=True)
            self._dirs.add(blob_id[:2])

    async def _stream(
        self, final: Path, digest: hashlib._Hash, head: list[bytes], size: int, rest: AsyncIterator[bytes]
    ) -> int:
        tmp = final.with_suffix(".part")
        fh = await asyncio.to_thread(_open_part, tmp)
        # One chunk is hashed and written in a worker thread while the loop reads the next from the socket
        # (one write at a time, in order): waiting for each write before reading on paused the sender.
        writing: asyncio.Future[None] | None = None
        try:
            buf, buffered = head, size
            async for chunk in rest:
                size += len(chunk)
                buf.append(chunk)
                buffered += len(chunk)
                if buffered >= CHUNK_BYTES:
                    if writing is not None:
                        await writing
                    writing = asyncio.ensure_future(asyncio.to_thread(_write_hash, fh, digest, buf))
                    buf, buffered = [], 0
            if writing is not None:
                await writing
            await asyncio.to_thread(_write_hash, fh, digest, buf)
            await asyncio.to_thread(fh.close)
            await asyncio.to_thread(os.replace, tmp, final)
        except BaseException:
            if writing is not None:  # the thread may still be writing: the file closes after it
                await asyncio.gather(writing, return_exceptions=True)
            await asyncio.to_thread(fh.close)
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
            raise
        return size

    @asynccontextmanager
    async def open(
        self, blob_id: str, start: int = 0, stop: int | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        try:
            fh = await asyncio.to_thread(self.path(blob_id).open, "rb")
        except FileNotFoundError:
            raise BlobMissing(f"blob {blob_id} has no file") from None
        try:
            yield _read_file(fh, start, stop)
        finally:
            await asyncio.to_thread(fh.close)

    async def delete(self, blob_id: str) -> None:
        await asyncio.to_thread(self.path(blob_id).unlink, missing_ok=True)

    async def leftovers(self, before: float) -> list[Leftover]:
        return await asyncio.to_thread(_old_files, self.root, before)

    async def remove(self, leftover: Leftover) -> None:
        await asyncio.to_thread(Path(leftover.handle).unlink, missing_ok=True)

    def _part(self, blob_id: str) -> Path:
        return self.path(blob_id).with_suffix(".part")

    async def begin_upload(self, blob_id: str) -> str:
        await self._ensure_dir(blob_id)
        await asyncio.to_thread(_create_empty, self._part(blob_id))
        return ""

    async def append_upload(
        self, blob_id: str, handle: str, offset: int, chunks: AsyncIterator[bytes], commit: Commit
    ) -> int:
        """Bytes past `offset` (a request cut before its commit) are dropped first. Writes go to a worker
        thread 1 MiB at a time and are waited for even when the request is cancelled (a thread cannot be
        stopped), so the committed length is what the file holds; what arrived before a break is written
        too (_Appender: one write in flight while the next megabyte is read). Committed every
        SESSION_COMMIT_BYTES and at the end."""
        fh = await asyncio.to_thread(_open_at, self._part(blob_id), offset)
        out = _Appender(fh, offset)
        committed = offset
        buf: list[bytes] = []
        try:
            async for chunk in chunks:
                buf.append(chunk)
                if sum(map(len, buf)) >= CHUNK_BYTES:
                    batch, buf = buf, []
                    await out.write(batch)
                    if out.written - committed >= SESSION_COMMIT_BYTES:
                        committed = out.written  # first: a commit that raises is not tried again below
                        await commit(committed)
        finally:
            try:
                if out.intact and buf:
                    await out.write(buf)
                await out.settle()
            finally:
                await asyncio.to_thread(fh.close)
                if out.written != committed:
                    committed = out.written
                    await commit(committed)
        return committed

    async def finish_upload(self, blob_id: str, handle: str, size: int) -> None:
        part = self._part(blob_id)
        actual = await asyncio.to_thread(_truncated, part, size)
        if actual < size:
            raise UploadOffsetLost(actual)
        await asyncio.to_thread(os.replace, part, self.path(blob_id))

    async def abort_upload(self, blob_id: str, handle: str) -> None:
        await asyncio.to_thread(self._part(blob_id).unlink, missing_ok=True)


async def _read_file(fh: BinaryIO, start: int, stop: int | None) -> AsyncIterator[bytes]:
    await asyncio.to_thread(fh.seek, start)
    left = None if stop is None else max(stop - start, 0)
    while left is None or left > 0:
        chunk = await asyncio.to_thread(fh.read, CHUNK_BYTES if left is None else min(left, CHUNK_BYTES))
        if not chunk:
            return
        if left is not None:
            left -= len(chunk)
        yield chunk


def _old_files(root: Path, before: float) -> list[Leftover]:
    found: list[Leftover] = []
    if not root.is_dir():
        return found
    for sub in os.scandir(root):
        if not sub.is_dir(follow_symlinks=False) or len(sub.name) != 2:
            continue
        for entry in os.scandir(sub.path):
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < before:
                partial = entry.name.endswith(".part")
                found.append(Leftover(entry.name.removesuffix(".part"), partial, entry.path))
    return found


def _create_empty(path: Path) -> None:
    with path.open("xb"):
        pass


def _open_at(path: Path, offset: int) -> BinaryIO:
    """The session file opened for appending at `offset`; UploadOffsetLost if it is shorter."""
    try:
        fh = path.open("r+b")
    except FileNotFoundError:
        raise UploadOffsetLost(0) from None
    size = fh.seek(0, os.SEEK_END)
    if size < offset:
        fh.close()
        raise UploadOffsetLost(size)
    fh.truncate(offset)
    fh.seek(offset)
    return fh


class _Appender:
    """Writes of an upload session's file, 1 MiB at a time in a worker thread, one at a time while the loop
    reads the next from the socket. A write is waited for even when the request is cancelled (a thread
    cannot be stopped), so `written` is what the file holds once `settle` returned; `intact` turns False when
    a write failed (then the file's end is unknown and nothing more is written)."""

    def __init__(self, fh: BinaryIO, written: int) -> None:
        self.fh = fh
        self.written = written
        self.intact = True
        self._pending: asyncio.Future[int] | None = None

    async def write(self, parts: list[bytes]) -> None:
        """Start writing `parts` once the write before is done."""
        await self.settle()
        self._pending = asyncio.ensure_future(asyncio.to_thread(_write_all, self.fh, parts))

    async def settle(self) -> None:
        """Wait for the write in flight, if any; its failure is raised here."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            await asyncio.shield(pending)
        finally:
            await asyncio.gather(pending, return_exceptions=True)
            if pending.exception() is None:
                self.written += pending.result()
            else:
                self.intact = False


def _write_all(fh: BinaryIO, parts: list[bytes]) -> int:
    for part in parts:
        fh.write(part)
    fh.flush()
    return sum(map(len, parts))


def _truncated(path: Path, size: int) -> int:
    """The session file cut to `size` (bytes past it were never committed); its length if shorter."""
    try:
        with path.open("r+b") as fh:
            actual = fh.seek(0, os.SEEK_END)
            if actual > size:
                fh.truncate(size)
            return min(actual, size)
    except FileNotFoundError:
        return 0


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
