"""Blobs in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW), so several server machines share them.

The client is MinIO's Python SDK (`minio`), its blocking calls run through `asyncio.to_thread` like every
other blocking SDK here. Not boto3/aiobotocore: botocore caps python-dateutil below 3 while the kubernetes
client of the k8s extra needs 3 or later, so they cannot share one environment; `minio` depends on neither
and is maintained for every S3-compatible service. Its multipart calls (`_create_multipart_upload` and
friends) carry a leading underscore but are the plain S3 operations, unchanged across 7.x; the dependency
is pinned below 7.3 and tests run every call against a real S3 server (moto's).

An upload streams in parts of `part_bytes`: one part is sent while the next fills, so an upload holds about
three parts of memory, never the blob. A body within one part goes up as a single PutObject. Only a
completed object is a blob: a failed or oversize upload is aborted, and one cut short by a crash stays an
invisible multipart upload until the collector aborts it (`leftovers`) once no part arrived for the keep time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.credentials.providers import StaticProvider
from minio.datatypes import Part
from minio.error import MinioException, S3Error
from urllib3.response import BaseHTTPResponse

from vfed.server.blobs import (
    CHUNK_BYTES,
    BlobMissing,
    BlobStore,
    BlobStoreError,
    Commit,
    Leftover,
    StoredBlob,
    UploadOffsetLost,
)
from vfed.server.config import S3Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
_BLOB_ID = re.compile(r"^[0-9a-f]{32}$")
TAIL = ".tail"  # an upload session's bytes past its last whole part
_REFUSED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
ENV_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def credentials(s3: S3Settings) -> StaticProvider:
    """The settings' keys, else the standard AWS variables of the environment; BlobStoreError if neither."""
    if s3.access_key_id is not None and s3.secret_access_key is not None:
        return StaticProvider(s3.access_key_id, s3.secret_access_key, s3.session_token)
    key, secret, token = (os.environ.get(name) for name in ENV_CREDENTIALS)
    if key and secret:
        return StaticProvider(key, secret, token or s3.session_token)
    raise BlobStoreError(
        "blobs.s3: no credentials: set access_key_id and secret_access_key (or their _file keys), or "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the server's environment"
    )


class S3BlobStore(BlobStore):
    """Objects `<prefix><id>` in one bucket, which must exist (the server never creates or deletes it)."""

    def __init__(self, s3: S3Settings, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self.s3 = s3
        url = urlsplit(s3.endpoint)
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=10, read=120),
            maxsize=16,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        self.client = Minio(
            url.netloc,
            secure=url.scheme == "https",
            region=s3.region,
            credentials=credentials(s3),
            http_client=self._http,
        )
        if s3.addressing == "path":
            self.client.disable_virtual_style_endpoint()  # type: ignore[no-untyped-call]
        elif s3.addressing == "virtual":
            self.client.enable_virtual_style_endpoint()  # type: ignore[no-untyped-call]

    def key(self, blob_id: str) -> str:
        return self.s3.prefix + blob_id

    async def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn` in a worker thread, its failures as one BlobStoreError line (a missing object excepted)."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchUpload"):
                raise
            raise BlobStoreError(self._describe(what, exc)) from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise BlobStoreError(f"S3 {what} at {self.s3.endpoint} failed: {exc}") from exc

    def _describe(self, what: str, exc: S3Error) -> str:
        where = f"{self.s3.endpoint} bucket {self.s3.bucket}"
        if exc.code == "NoSuchBucket":
            return f"S3 bucket {self.s3.bucket} does not exist at {self.s3.endpoint}: create it first"
        if exc.code in _REFUSED:
            return (
                f"S3 at {where} refused the credentials ({exc.code}): check blobs.s3 keys or AWS_* variables"
            )
        return f"S3 {what} at {where} failed: {exc.code}: {exc.message}"

    async def prepare(self) -> None:
        """The bucket must exist and the credentials must list it: a misconfiguration stops the start."""
        if not await self._call("bucket check", self.client.bucket_exists, self.s3.bucket):
            raise BlobStoreError(
                f"S3 bucket {self.s3.bucket} does not exist at {self.s3.endpoint}: create it first "
                "(the server never creates buckets)"
            )
        await self._call("listing", _first_object, self.client, self.s3.bucket, self.s3.prefix)

    async def close(self) -> None:
        self._http.clear()

    async def _store(
        self, blob_id: str, head: list[bytes], size: int, rest: AsyncIterator[bytes] | None
    ) -> StoredBlob:
        digest = hashlib.sha256()
        part, filled = head, size
        if rest is not None:
            async for chunk in rest:
                part.append(chunk)
                filled += len(chunk)
                size += len(chunk)
                if filled >= self.s3.part_bytes:
                    return await self._multipart(blob_id, digest, part, size, rest)
        await self._call("upload", _put_whole, self.client, self.s3.bucket, self.key(blob_id), digest, part)
        return StoredBlob(blob_id, size, digest.hexdigest())

    async def _multipart(
        self, blob_id: str, digest: hashlib._Hash, first: list[bytes], size: int, rest: AsyncIterator[bytes]
    ) -> StoredBlob:
        """Part 1 is `first`; each later part fills while the one before is sent."""
        bucket, key = self.s3.bucket, self.key(blob_id)
        upload_id = await self._call("upload start", self.client._create_multipart_upload, bucket, key, {})
        parts: list[Part] = []
        sending: asyncio.Future[str] | None = None
        try:
            sending = self._send(upload_id, key, digest, first, 1)
            part: list[bytes] = []
            filled = 0
            async for chunk in rest:
                part.append(chunk)
                filled += len(chunk)
                size += len(chunk)
                if filled >= self.s3.part_bytes:
                    parts.append(Part(len(parts) + 1, await sending))
                    sending = self._send(upload_id, key, digest, part, len(parts) + 1)
                    part, filled = [], 0
            parts.append(Part(len(parts) + 1, await sending))
            sending = None
            if part:
                parts.append(
                    Part(len(parts) + 1, await self._send(upload_id, key, digest, part, len(parts) + 1))
                )
            await self._call(
                "upload completion", self.client._complete_multipart_upload, bucket, key, upload_id, parts
            )
        except BaseException:
            if sending is not None:  # a thread cannot be stopped: let the part finish before the abort
                with contextlib.suppress(BaseException):
                    await asyncio.shield(sending)
            await self._abort(key, upload_id)
            raise
        return StoredBlob(blob_id, size, digest.hexdigest())

    def _send(
        self, upload_id: str, key: str, digest: hashlib._Hash, chunks: list[bytes], number: int
    ) -> asyncio.Future[str]:
        """Hash and send one part in a worker thread (parts are hashed in order: one is sent at a time)."""
        return asyncio.ensure_future(
            self._call(
                "part upload", _put_part, self.client, self.s3.bucket, key, upload_id, digest, chunks, number
            )
        )

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await self._call(
                "upload abort", self.client._abort_multipart_upload, self.s3.bucket, key, upload_id
            )
        except (BlobStoreError, S3Error) as exc:  # the collector aborts it later
            log.warning("could not abort the multipart upload of %s (the collector will): %s", key, exc)

    @asynccontextmanager
    async def open(
        self, blob_id: str, start: int = 0, stop: int | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        length = 0 if stop is None else stop - start
        if stop is not None and length <= 0:
            yield _nothing()
            return
        try:
            resp = await self._call(
                "download",
                self.client.get_object,
                self.s3.bucket,
                self.key(blob_id),
                offset=start,
                length=length,
            )
        except S3Error as exc:
            raise BlobMissing(f"blob {blob_id} has no object in bucket {self.s3.bucket}") from exc
        try:
            yield self._chunks(resp)
        finally:
            await asyncio.to_thread(_release, resp)

    async def _chunks(self, resp: BaseHTTPResponse) -> AsyncIterator[bytes]:
        while chunk := await self._call("download", resp.read, CHUNK_BYTES):
            yield chunk

    async def delete(self, blob_id: str) -> None:
        await self._call("delete", self.client.remove_object, self.s3.bucket, self.key(blob_id))

    # Upload sessions: a multipart upload at the blob's key, one part per whole `part_bytes` of the session
    # (part N holds bytes [(N-1)*part_bytes, N*part_bytes)), so S3's 5 MiB minimum never applies to an
    # append; the bytes past the last whole part are the object `<key>.tail`, rewritten at the end of each
    # append and read back by the next. Committed offset O = full parts O // part_bytes + the tail's first
    # O % part_bytes bytes, whatever a crash left behind past that.

    async def begin_upload(self, blob_id: str) -> str:
        key = self.key(blob_id)
        return await self._call("upload start", self.client._create_multipart_upload, self.s3.bucket, key, {})

    async def append_upload(
        self, blob_id: str, handle: str, offset: int, chunks: AsyncIterator[bytes], commit: Commit
    ) -> int:
        size = self.s3.part_bytes
        parts, tail = divmod(offset, size)
        buf = bytearray(await self._tail(blob_id, tail, parts * size))
        committed = offset
        try:
            async for chunk in chunks:
                buf += chunk
                while len(buf) >= size:
                    await self._part(blob_id, handle, bytes(buf[:size]), parts + 1)
                    del buf[:size]
                    parts += 1
                    committed = parts * size
                    await commit(committed)
        finally:
            if parts * size + len(buf) != committed and len(buf) < size:  # not a part that failed to go
                committed = await self._keep_tail(blob_id, bytes(buf), parts * size, committed, commit)
        return committed

    async def _keep_tail(self, blob_id: str, data: bytes, at: int, committed: int, commit: Commit) -> int:
        """Store the bytes past the last whole part and commit them; on a store failure the last commit
        stands (the client resends from there)."""
        bucket, key = self.s3.bucket, self.key(blob_id) + TAIL
        try:
            await self._call("upload", self.client.put_object, bucket, key, io.BytesIO(data), len(data))
        except BlobStoreError as exc:
            log.warning("upload session %s: its tail was not kept: %s", blob_id, exc)
            return committed
        await commit(at + len(data))
        return at + len(data)

    async def _tail(self, blob_id: str, length: int, at: int) -> bytes:
        """The first `length` bytes of the session's tail; UploadOffsetLost (at the last whole part) if the
        tail holds fewer."""
        if length == 0:
            return b""
        try:
            async with self.open(blob_id + TAIL, 0, length) as chunks:
                data = b"".join([c async for c in chunks])
        except BlobMissing:
            data = b""
        if len(data) < length:
            raise UploadOffsetLost(at)
        return data

    async def _part(self, blob_id: str, handle: str, data: bytes, number: int) -> str:
        key = self.key(blob_id)
        return await self._call(
            "part upload", self.client._upload_part, self.s3.bucket, key, data, None, handle, number
        )

    async def finish_upload(self, blob_id: str, handle: str, size: int) -> None:
        """The tail becomes the last part; an empty session is an empty object (S3 completes no zero
        parts)."""
        bucket, key = self.s3.bucket, self.key(blob_id)
        count, tail = divmod(size, self.s3.part_bytes)
        if tail:
            last = await self._tail(blob_id, tail, count * self.s3.part_bytes)
            await self._part(blob_id, handle, last, count + 1)
            count += 1
        if count == 0:
            await self._call("upload", self.client.put_object, bucket, key, io.BytesIO(b""), 0)
            await self.abort_upload(blob_id, handle)
            return
        listed = await self._call("listing", _parts, self.client, bucket, key, handle)
        parts = [p for p in listed if p.part_number <= count]
        if [p.part_number for p in parts] != list(range(1, count + 1)):
            raise UploadOffsetLost(0)
        await self._call(
            "upload completion", self.client._complete_multipart_upload, bucket, key, handle, parts
        )
        await self._remove_tail(blob_id)

    async def abort_upload(self, blob_id: str, handle: str) -> None:
        with contextlib.suppress(S3Error):  # NoSuchUpload: completed or aborted already
            await self._call(
                "upload abort", self.client._abort_multipart_upload, self.s3.bucket, self.key(blob_id), handle
            )
        await self._remove_tail(blob_id)

    async def _remove_tail(self, blob_id: str) -> None:
        with contextlib.suppress(S3Error):
            await self._call("delete", self.client.remove_object, self.s3.bucket, self.key(blob_id) + TAIL)

    async def leftovers(self, before: float) -> list[Leftover]:
        """Objects last modified before `before`, and multipart uploads that started before it and got no
        part since (an upload in progress on any server machine keeps adding parts)."""
        objects = await self._call(
            "listing", _old_objects, self.client, self.s3.bucket, self.s3.prefix, before
        )
        uploads = await self._call(
            "listing", _idle_uploads, self.client, self.s3.bucket, self.s3.prefix, before
        )
        found = []
        for key, partial, handle in (*objects, *uploads):
            name = key[len(self.s3.prefix) :]
            tail = name.endswith(TAIL)
            blob_id = name.removesuffix(TAIL)
            if _BLOB_ID.match(blob_id):  # anything else under the prefix is not ours to remove
                found.append(Leftover(blob_id, partial or tail, key if tail else handle))
        return found

    async def remove(self, leftover: Leftover) -> None:
        key = self.key(leftover.blob_id)
        if leftover.handle.endswith(TAIL):  # a session's tail (its multipart upload is a leftover too)
            await self._remove_tail(leftover.blob_id)
        elif leftover.partial:
            with contextlib.suppress(S3Error):  # NoSuchUpload: completed or aborted meanwhile
                await self._call(
                    "upload abort", self.client._abort_multipart_upload, self.s3.bucket, key, leftover.handle
                )
        else:
            await self._call("delete", self.client.remove_object, self.s3.bucket, key)


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield  # pragma: no cover (makes this an async generator)


def _release(resp: BaseHTTPResponse) -> None:
    resp.close()
    resp.release_conn()


def _first_object(client: Minio, bucket: str, prefix: str) -> None:
    next(iter(client.list_objects(bucket, prefix=prefix)), None)


def _put_whole(client: Minio, bucket: str, key: str, digest: hashlib._Hash, chunks: list[bytes]) -> None:
    for chunk in chunks:
        digest.update(chunk)
    data = b"".join(chunks)
    chunks.clear()
    client.put_object(bucket, key, io.BytesIO(data), len(data))


def _put_part(
    client: Minio,
    bucket: str,
    key: str,
    upload_id: str,
    digest: hashlib._Hash,
    chunks: list[bytes],
    number: int,
) -> str:
    for chunk in chunks:
        digest.update(chunk)
    data = b"".join(chunks)
    chunks.clear()
    return client._upload_part(bucket, key, data, None, upload_id, number)


def _parts(client: Minio, bucket: str, key: str, upload_id: str) -> list[Part]:
    """Every part of a multipart upload, page by page, in part order."""
    found: list[Part] = []
    marker: str | None = None
    while True:
        page = client._list_parts(bucket, key, upload_id, max_parts=1000, part_number_marker=marker)
        found.extend(page.parts)
        if not page.is_truncated or not page.next_part_number_marker:
            return sorted(found, key=lambda p: p.part_number)
        marker = str(page.next_part_number_marker)


def _old_objects(client: Minio, bucket: str, prefix: str, before: float) -> list[tuple[str, bool, str]]:
    found = []
    for obj in client.list_objects(bucket, prefix=prefix, recursive=True):
        name = obj.object_name
        if name and obj.last_modified is not None and obj.last_modified.timestamp() < before:
            found.append((name, False, name))
    return found


def _idle_uploads(client: Minio, bucket: str, prefix: str, before: float) -> list[tuple[str, bool, str]]:
    found = []
    for key, upload_id, started in _uploads(client, bucket, prefix):
        if started >= before:
            continue
        parts = client._list_parts(bucket, key, upload_id, max_parts=1000).parts
        if all(p.last_modified is None or p.last_modified.timestamp() < before for p in parts):
            found.append((key, True, upload_id))
    return found


def _uploads(client: Minio, bucket: str, prefix: str) -> Iterator[tuple[str, str, float]]:
    """(key, upload id, start time) of every multipart upload under `prefix`, page by page."""
    marker: str | None = None
    while True:
        page = client._list_multipart_uploads(bucket, prefix=prefix, key_marker=marker)
        for upload in page.uploads:
            if upload.object_name and upload.upload_id and upload.initiated_time is not None:
                yield upload.object_name, upload.upload_id, upload.initiated_time.timestamp()
        if not page.is_truncated or not page.next_key_marker:
            return
        marker = page.next_key_marker
