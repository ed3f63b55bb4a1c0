"""The blob store contract, written once and run against the filesystem store and the S3 store (a real
moto S3 server), plus what only S3 has: multipart parts, aborts that leave nothing, idle uploads."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from minio import Minio
from s3_testkit import BACKENDS, minio_client
from tests import infra

from vfed.server.blobs import CHUNK_BYTES, BlobMissing, BlobStore, BlobTooLarge, FileBlobStore
from vfed.server.blobs_s3 import S3BlobStore
from vfed.server.config import S3Settings

MIB = 1024 * 1024
FUTURE = 4e9  # a Unix time after every write: `leftovers(FUTURE)` lists everything stored


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    made: BlobStore
    if request.param == "s3":
        made = S3BlobStore(request.getfixturevalue("s3_settings"), 20 * MIB)
    else:
        made = FileBlobStore(tmp_path / "blobs", 20 * MIB)
    await made.prepare()
    yield made
    await made.close()


def pattern(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(seed.to_bytes(4, "big")).digest() * 2048  # 64 KiB that differ by seed
    return (block * (size // len(block) + 1))[:size]


async def chunks(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]
        await asyncio.sleep(0)


async def read(store: BlobStore, blob_id: str, start: int = 0, stop: int | None = None) -> bytes:
    out = bytearray()
    async with store.open(blob_id, start, stop) as body:
        async for chunk in body:
            assert 0 < len(chunk) <= CHUNK_BYTES
            out.extend(chunk)
    return bytes(out)


async def stored(store: BlobStore) -> list[tuple[str, bool]]:
    return sorted((item.blob_id, item.partial) for item in await store.leftovers(FUTURE))


@pytest.mark.parametrize("size", [100 * 1024, 3 * MIB, 12 * MIB + 5])
async def test_write_then_read_whole_and_by_range(store: BlobStore, size: int) -> None:
    data = pattern(size, seed=size)
    blob = await store.write(chunks(data))
    assert (blob.size, blob.sha256, blob.data) == (size, hashlib.sha256(data).hexdigest(), None)
    assert await read(store, blob.id) == data
    for start, stop in (
        (0, 1),
        (size - 1, None),
        (size // 3, size // 3 + MIB + 7),
        (5 * MIB - 3, 5 * MIB + 3),
    ):
        if start < size:
            assert await read(store, blob.id, start, stop) == data[start:stop], (start, stop)
    assert await read(store, blob.id, 10, 10) == b""
    assert await stored(store) == [(blob.id, False)]
    assert store.writing == set()


async def test_small_body_goes_to_its_row_and_stores_nothing(store: BlobStore) -> None:
    blob = await store.write(chunks(b"sealed envelope"), row_max_bytes=64 * 1024)
    assert blob.data == b"sealed envelope" and blob.sha256 == hashlib.sha256(b"sealed envelope").hexdigest()
    assert await stored(store) == []


@pytest.mark.parametrize("size", [2 * MIB, 21 * MIB])  # within the first part, and past several parts
async def test_oversize_upload_raises_and_leaves_nothing(store: BlobStore, size: int) -> None:
    store.max_bytes = min(store.max_bytes, size - 1)
    with pytest.raises(BlobTooLarge):
        await store.write(chunks(pattern(size)))
    assert await stored(store) == []


async def test_a_source_that_fails_midway_leaves_nothing(store: BlobStore) -> None:
    async def broken() -> AsyncIterator[bytes]:
        async for chunk in chunks(pattern(11 * MIB)):
            yield chunk
        raise ConnectionResetError("the client went away")

    with pytest.raises(ConnectionResetError):
        await store.write(broken())
    assert await stored(store) == [] and store.writing == set()


async def test_delete_and_missing_blobs(store: BlobStore) -> None:
    blob = await store.write(chunks(pattern(2 * MIB)))
    await store.delete(blob.id)
    await store.delete(blob.id)  # twice is no error
    with pytest.raises(BlobMissing):
        await read(store, blob.id)
    assert await stored(store) == []


async def test_leftovers_are_the_blobs_written_before_a_time(store: BlobStore) -> None:
    first = await store.write(chunks(pattern(2 * MIB)))
    await asyncio.sleep(1.1)  # S3 keeps modification times to the second
    cut = time.time()
    await asyncio.sleep(1.1)
    second = await store.write(chunks(pattern(2 * MIB, seed=2)))
    assert [item.blob_id for item in await store.leftovers(cut)] == [first.id]
    assert {item.blob_id for item in await store.leftovers(FUTURE)} == {first.id, second.id}
    for item in await store.leftovers(cut):
        await store.remove(item)
    assert await stored(store) == [(second.id, False)]


async def until_a_part_arrived(client: Minio, bucket: str) -> None:
    """Wait (polling the real server: nothing else tells) until a multipart upload holds a part."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for upload in client._list_multipart_uploads(bucket).uploads:
            if client._list_parts(bucket, upload.object_name, str(upload.upload_id)).parts:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("no multipart upload got a part within 30 s")


# --- S3 only ------------------------------------------------------------------------------------------------


@pytest.fixture
async def s3_store(s3_settings: S3Settings) -> AsyncIterator[S3BlobStore]:
    made = S3BlobStore(s3_settings, 40 * MIB)
    await made.prepare()
    yield made
    await made.close()


async def test_s3_multipart_upload_in_several_parts(
    s3_store: S3BlobStore, moto_server: infra.S3Server
) -> None:
    data = pattern(17 * MIB + 123, seed=7)
    blob = await s3_store.write(chunks(data, 300 * 1024))
    client = minio_client(moto_server)
    info = client.stat_object(s3_store.s3.bucket, s3_store.key(blob.id))
    assert info.size == len(data)
    assert str(info.etag).endswith(
        "-4"
    )  # a multipart object's ETag counts its parts: 3 of 5 MiB and the rest
    assert blob.sha256 == hashlib.sha256(data).hexdigest()
    assert await read(s3_store, blob.id, 5 * MIB - 10, 10 * MIB + 10) == data[5 * MIB - 10 : 10 * MIB + 10]


async def test_s3_body_within_one_part_is_a_single_put(
    s3_store: S3BlobStore, moto_server: infra.S3Server
) -> None:
    data = pattern(4 * MIB)
    blob = await s3_store.write(chunks(data))
    info = minio_client(moto_server).stat_object(s3_store.s3.bucket, s3_store.key(blob.id))
    assert "-" not in str(info.etag) and info.size == len(data)


async def test_s3_upload_in_progress_is_invisible_and_an_idle_one_is_aborted(
    s3_store: S3BlobStore, moto_server: infra.S3Server
) -> None:
    """While parts arrive no object is listed; a leftover upload is found only once idle, and removing it
    aborts it. (moto reports a fixed start time for every multipart upload, so activity is told by parts.)"""
    client = minio_client(moto_server)
    release = asyncio.Event()

    async def held() -> AsyncIterator[bytes]:
        async for chunk in chunks(pattern(6 * MIB)):
            yield chunk
        await release.wait()
        yield b"end"

    writing = asyncio.create_task(s3_store.write(held()))
    await until_a_part_arrived(client, s3_store.s3.bucket)
    assert list(client.list_objects(s3_store.s3.bucket, recursive=True)) == []
    assert [i for i in await s3_store.leftovers(time.time() - 30) if i.partial] == []  # a part came just now
    idle = [i for i in await s3_store.leftovers(FUTURE) if i.partial]
    assert [i.blob_id for i in idle] == list(s3_store.writing)
    release.set()
    blob = await writing
    assert blob.size == 6 * MIB + 3 and await stored(s3_store) == [(blob.id, False)]

    other = S3BlobStore(s3_store.s3, s3_store.max_bytes)  # another server machine, its upload cut short
    upload_id = client._create_multipart_upload(s3_store.s3.bucket, other.key("ab" * 16), {})
    client._upload_part(s3_store.s3.bucket, other.key("ab" * 16), b"x" * MIB, None, upload_id, 1)
    client._create_multipart_upload(s3_store.s3.bucket, "blobs/not-a-blob-id", {})  # not ours: left alone
    await asyncio.sleep(1.1)
    (stale,) = [i for i in await other.leftovers(time.time()) if i.partial]
    assert (stale.blob_id, stale.handle) == ("ab" * 16, upload_id)
    await other.remove(stale)
    await other.remove(stale)  # gone already: no error
    left = [u.object_name for u in client._list_multipart_uploads(s3_store.s3.bucket).uploads]
    assert left == ["blobs/not-a-blob-id"]
    await other.close()


async def test_s3_refusals_are_one_line(s3_settings: S3Settings) -> None:
    from vfed.server.blobs import BlobStoreError

    wrong_bucket = S3BlobStore(s3_settings.model_copy(update={"bucket": "vfed-no-such-bucket"}), MIB)
    with pytest.raises(BlobStoreError, match="bucket vfed-no-such-bucket does not exist at http://127"):
        await wrong_bucket.prepare()
    nobody = S3Settings(
        endpoint=f"http://127.0.0.1:{infra.free_port()}",
        bucket="vfed-x",
        access_key_id="a",
        secret_access_key="b",
    )
    unreachable = S3BlobStore(nobody, MIB)
    with pytest.raises(BlobStoreError, match=r"S3 bucket check at http://127\.0\.0\.1:\d+ failed") as err:
        await unreachable.prepare()
    assert "\n" not in str(err.value)


def test_s3_credentials_from_settings_or_the_environment(
    s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vfed.server.blobs import BlobStoreError
    from vfed.server.blobs_s3 import credentials

    bare = s3_settings.model_copy(update={"access_key_id": None, "secret_access_key": None})
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(BlobStoreError, match="no credentials: set access_key_id and secret_access_key"):
        credentials(bare)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    got = credentials(bare).retrieve()
    assert (got.access_key, got.secret_key) == ("from-env", "env-secret")
    got = credentials(s3_settings).retrieve()  # the settings' keys win over the environment
    assert got.access_key == s3_settings.access_key_id
    assert os.environ["AWS_ACCESS_KEY_ID"] == "from-env"
