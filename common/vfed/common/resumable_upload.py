"""The client side of the server's resumable uploads (`/api/v1/uploads`, docs/server.md "Uploads").

A big body goes up through an upload session: when the connection breaks, the client asks the server how
many bytes it committed and sends only the rest, so a bad link costs the bytes in flight, not the whole
file. Retries are bounded: `max_failures` breaks in a row without the committed offset moving end the upload
(`UploadBroken`); one that moved starts the count again. Bodies up to `single_max_bytes`, and every body
for a server without sessions (404/405 on `POST /uploads`), go as one `POST /blobs`, sent again whole after
a break.

The SHA-256 sent at completion is computed from the bytes as they are first read, so a source that is still
being written (a result sealed while it uploads) needs no second pass. The server checks it before the blob
exists. The caller gives the HTTP session, the API base and its authorization headers (and, optionally, a
coroutine that renews them after a 401), so every REST client of the project can use this one module.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp

from vfed.common.api.errors import ApiError, read_error
from vfed.common.growing_file import GrowingFile

log = logging.getLogger(__name__)
CHUNK_BYTES = 1024 * 1024
SINGLE_MAX_BYTES = 8 * 1024 * 1024
_RETRYABLE_STATUS = (502, 503, 504)
T = TypeVar("T")


class UploadBroken(Exception):
    """The server stayed unreachable (or kept cutting the body) for `max_failures` attempts in a row."""


class Source(Protocol):
    """Bytes to upload, readable again from any offset already read (a file, not a socket)."""

    def chunks(self, offset: int) -> AsyncIterator[bytes]: ...


@dataclass(frozen=True)
class Session:
    """An upload session on the server: its id, and the id its blob gets."""

    id: str
    blob_id: str


@dataclass(frozen=True)
class Uploaded:
    id: str
    size: int
    sha256: str


class FileSource:
    """A complete file."""

    def __init__(self, path: Path, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.path = path
        self.chunk_bytes = chunk_bytes

    async def chunks(self, offset: int) -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(self.path.open, "rb")
        try:
            await asyncio.to_thread(handle.seek, offset)
            while chunk := await asyncio.to_thread(handle.read, self.chunk_bytes):
                yield chunk
        finally:
            handle.close()


class GrowingSource:
    """A file another thread is still writing (vfed.common.growing_file): its end is where the writer
    stopped. `failed` tells, once the writer is over, whether what it wrote must not become a blob; the
    read then raises SourceFailed."""

    def __init__(
        self,
        paths: Sequence[Path],
        done: threading.Event,
        failed: Callable[[], bool],
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.paths = list(paths)
        self.done = done
        self.failed = failed
        self.chunk_bytes = chunk_bytes

    async def chunks(self, offset: int) -> AsyncIterator[bytes]:
        with GrowingFile(self.paths, self.done) as source:
            if offset:  # a resume: the writer passed this point when the bytes were first read
                await asyncio.to_thread(source.seek, offset)
            while chunk := await asyncio.to_thread(source.read, self.chunk_bytes):
                yield chunk
        if self.failed():
            raise SourceFailed("the writer of the file failed: the upload is abandoned")


class SourceFailed(Exception):
    """The source cannot deliver its bytes; the upload ends unfinished (the server keeps nothing visible)."""


class _Broken(Exception):
    """One request broke off (connection, timeout, 502-504): the loop asks where to go on from."""


Headers = Callable[[], Mapping[str, str]]
Renew = Callable[[], Awaitable[bool]]


class ResumableUploader:
    """Uploads to one server: `await uploader.upload(source, size=..., sha256=...)`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base: str,
        headers: Headers,
        renew: Renew | None = None,
        *,
        max_failures: int = 5,
        backoff_s: float = 0.5,
        single_max_bytes: int = SINGLE_MAX_BYTES,
    ) -> None:
        self.session = session
        self.base = base.rstrip("/")
        self.headers = headers
        self.renew = renew
        self.max_failures = max_failures
        self.backoff_s = backoff_s
        self.single_max_bytes = single_max_bytes

    async def upload(
        self,
        source: Source,
        size: int | None = None,
        sha256: str | None = None,
        *,
        resume: Session | None = None,
        started: Callable[[Session], None] | None = None,
    ) -> Uploaded:
        """Store the source's bytes as a blob. `size` and `sha256`, when known, are declared up front (the
        server then refuses anything else); a size within `single_max_bytes` goes as one request.

        `started` is told the session as soon as it exists, so a caller that keeps it can pass it back as
        `resume` after a restart: the upload then goes on from what the server committed (the bytes before
        are read once more to hash them). A session the server no longer has (expired) starts anew."""
        if size is not None and size <= self.single_max_bytes:
            return await self._single(source)
        if resume is not None:
            try:
                return await self._transfer(_Transfer(self, source, resume, resuming=True))
            except ApiError as exc:
                if exc.status != 404:
                    raise
                log.info("upload %s is gone from the server (%s); starting a new one", resume.id, exc)
        declared = _declared(size, sha256)
        created = await self._retrying(lambda: self._call("POST", "/uploads", json=declared, sessions=True))
        if created is None:  # a server without upload sessions
            return await self._single(source)
        session = Session(str(created["id"]), str(created["blob_id"]))
        if started is not None:
            started(session)
        return await self._transfer(_Transfer(self, source, session))

    async def _transfer(self, transfer: _Transfer) -> Uploaded:
        try:
            return await transfer.run()
        except (SourceFailed, ApiError):  # it cannot go on: the session's bytes go now, not at its expiry
            with contextlib.suppress(_Broken, ApiError):
                await self._call("DELETE", transfer.path)
            raise

    async def _single(self, source: Source) -> Uploaded:
        """One `POST /blobs`, sent again whole after a break (bounded like the sessions' appends)."""
        failed: list[BaseException] = []
        digest = hashlib.sha256()

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in source.chunks(0):
                    digest.update(chunk)
                    yield chunk
            except Exception as exc:
                failed.append(exc)
                raise

        async def send() -> Uploaded:
            nonlocal digest
            digest = hashlib.sha256()
            try:
                answer = await self._call("POST", "/blobs", body=body())
            except _Broken:
                if failed:
                    raise failed[0] from None
                raise
            return _checked(answer, digest.hexdigest())

        return await self._retrying(send)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call` again after a break, `max_failures` times at most; then UploadBroken."""
        failures = 0
        while True:
            try:
                return await call()
            except _Broken as exc:
                failures += 1
                if failures > self.max_failures:
                    raise UploadBroken(f"upload failed {failures} times: {exc}") from exc
                await self.pause(failures)

    async def pause(self, failures: int) -> None:
        await asyncio.sleep(min(self.backoff_s * 2 ** (failures - 1), 10.0) * random.uniform(0.5, 1.0))

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        body: AsyncIterator[bytes] | None = None,
        params: Mapping[str, str] | None = None,
        sessions: bool = False,
        conflict: bool = False,
    ) -> Any:
        """One request; its JSON answer. `_Broken` for a break, ApiError for a refusal. With `sessions`, a
        404/405 (a server without upload sessions) answers None; with `conflict`, a 409 offset-mismatch
        answers its document."""
        for renewed in (False, True):
            headers = dict(self.headers())
            if body is not None:
                headers["Content-Type"] = "application/octet-stream"
            try:
                async with self.session.request(
                    method, self.base + path, json=json, data=body, params=params, headers=headers
                ) as resp:
                    if resp.status == 401 and not renewed and self.renew is not None and await self.renew():
                        if body is not None:  # a streamed body cannot be replayed: the loop resumes it
                            raise _Broken("the token was renewed")
                        continue
                    if resp.status < 300:
                        return await resp.json() if resp.status != 204 else None
                    return await _refusal(resp, sessions, conflict)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                raise _Broken(f"{method} {path}: {exc or type(exc).__name__}") from exc
        raise AssertionError("unreachable")  # pragma: no cover


async def _refusal(resp: aiohttp.ClientResponse, sessions: bool, conflict: bool) -> Any:
    if resp.status in _RETRYABLE_STATUS:
        raise _Broken(f"{resp.method} {resp.url.path}: HTTP {resp.status}")
    if sessions and resp.status in (404, 405):
        return None
    if conflict and resp.status == 409:
        doc = await resp.json(content_type=None)
        if isinstance(doc, dict) and doc.get("error") == "offset-mismatch":
            return doc
        raise ApiError(409, str(doc.get("error", "conflict")), str(doc.get("detail", "")))
    raise ApiError(resp.status, *await read_error(resp))


def _checked(answer: Any, sha256: str) -> Uploaded:
    """The server's answer, if it names the bytes sent (their SHA-256 as computed here)."""
    if not isinstance(answer, dict) or answer.get("sha256") != sha256:
        raise ApiError(502, "checksum-mismatch", "the server stored bytes other than the ones sent")
    return Uploaded(str(answer["id"]), int(answer["size"]), sha256)


def _declared(size: int | None, sha256: str | None) -> dict[str, Any]:
    return {k: v for k, v in (("size", size), ("sha256", sha256)) if v is not None}


class _Transfer:
    """One session's appends: from the committed offset, until the source's end is committed."""

    def __init__(
        self, up: ResumableUploader, source: Source, session: Session, resuming: bool = False
    ) -> None:
        self.up = up
        self.source = source
        self.path = f"/uploads/{session.id}"
        self.blob_id = session.blob_id
        self.resuming = resuming
        self.digest = hashlib.sha256()
        self.hashed = 0  # bytes the digest has seen: each byte is hashed the first time it is read
        self.end: int | None = None  # the source's size, once read to its end
        self.source_error: BaseException | None = None
        self.committed = 0
        self.failures = 0
        self.progress_mark = 0  # the committed offset at the last break

    async def run(self) -> Uploaded:
        while True:
            await self._send_all()
            assert self.end is not None
            done = await self._complete(self.end, self.digest.hexdigest())
            if done is not None:
                return done

    async def _send_all(self) -> None:
        """Append until the server committed the source's end."""
        known = not self.resuming  # a session from before: ask where it stands first
        while self.end is None or self.committed < self.end:
            try:
                if not known:
                    self.committed = (await self.up._call("GET", self.path))["offset"]
                    known = True
                    if self.committed > self.hashed:
                        await self._hash_to(self.committed)
                    if self.end is not None and self.committed >= self.end:
                        return
                before = self.committed
                answer = await self.up._call(
                    "PATCH", self.path, body=self._body(before), params={"offset": str(before)}, conflict=True
                )
                self.committed = int(answer["offset"])
                if self.committed <= before and (self.end is None or self.committed < self.end):
                    raise _Broken(f"the server committed nothing past {before}")
            except _Broken as exc:
                if self.source_error is not None:
                    raise self.source_error from None
                await self._broke(exc)
                known = False

    async def _broke(self, exc: _Broken) -> None:
        if self.committed > self.progress_mark:
            self.failures = 0
        self.progress_mark = self.committed
        self.failures += 1
        if self.failures > self.up.max_failures:
            raise UploadBroken(f"upload broke {self.failures - 1} times without progress: {exc}") from exc
        log.info("upload %s: %s; resuming (%d bytes committed)", self.path, exc, self.committed)
        await self.up.pause(self.failures)

    async def _hash_to(self, offset: int) -> None:
        """Hash the source's bytes up to `offset`, which a session from before already holds."""
        async for chunk in self.source.chunks(self.hashed):
            take = memoryview(chunk)[: offset - self.hashed]
            self.digest.update(take)
            self.hashed += len(take)
            if self.hashed >= offset:
                return

    async def _body(self, offset: int) -> AsyncIterator[bytes]:
        position = offset
        try:
            if offset > self.hashed:  # bytes this client never sent: not an upload it can finish
                raise ApiError(409, "offset-mismatch", f"the server holds {offset} bytes, more than sent")
            async for chunk in self.source.chunks(offset):
                if position + len(chunk) > self.hashed:  # position <= hashed: bytes before were all read
                    self.digest.update(memoryview(chunk)[self.hashed - position :])
                    self.hashed = position + len(chunk)
                position += len(chunk)
                yield chunk
        except Exception as exc:
            self.source_error = exc
            raise
        self.end = position

    async def _complete(self, size: int, sha256: str) -> Uploaded | None:
        """The blob; None when the server holds fewer bytes than sent (then the appends go on)."""
        broke = False
        while True:
            try:
                answer = await self.up._call(
                    "POST", self.path + "/complete", json={"size": size, "sha256": sha256}, conflict=True
                )
                if answer.get("error") == "offset-mismatch":
                    self.committed = int(answer["offset"])
                    return None
                return _checked(answer, sha256)
            except ApiError as exc:
                if not (broke and exc.status == 404 and await self._stored(sha256)):
                    raise
                return Uploaded(self.blob_id, size, sha256)  # the answer to a completion was lost
            except _Broken as exc:
                broke = True
                await self._broke(exc)

    async def _stored(self, sha256: str) -> bool:
        """Whether the session's blob exists with this SHA-256 (a completion whose answer was lost)."""
        try:
            headers = {**self.up.headers(), "Range": "bytes=0-0"}
            url = f"{self.up.base}/blobs/{self.blob_id}"
            async with self.up.session.get(url, headers=headers) as resp:
                return resp.status in (200, 206) and resp.headers.get("X-Sha256") == sha256
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError):
            return False
