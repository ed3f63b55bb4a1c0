"""Resumable uploads (`/api/v1/uploads`, vfed.common.resumable_upload) on both blob stores: a body cut twice
on its way up goes on from the committed offset (each byte reaches the blob store once), the refusals (wrong
offset, another principal, sizes and checksums), and the collector's removal of expired sessions only."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from s3_testkit import both_backends
from sqlalchemy import select
from tests.cutting_proxy import cutting_proxy
from vserver_testkit import World, kit_settings, seed

from vfed.common.resumable_upload import (
    FileSource,
    GrowingSource,
    ResumableUploader,
    Session,
    SourceFailed,
    UploadBroken,
)
from vfed.server.api.uploads import UPLOADS
from vfed.server.app import create_app
from vfed.server.blob_collector import collect
from vfed.server.config import BlobsSettings, LimitsSettings
from vfed.server.metrics import METRICS
from vfed.server.models import UploadSession
from vfed.server.state import BLOBS, SESSIONS

MIB = 1024 * 1024


@pytest.fixture
async def world(
    request: pytest.FixtureRequest, aiohttp_client: Any, tmp_path: Path, blobs_settings: BlobsSettings
) -> World:
    """SQLite, or a test's PostgreSQL (parametrized indirectly)."""
    db = f"sqlite+aiosqlite:///{tmp_path / 'vserver.sqlite'}"
    if getattr(request, "param", "sqlite") == "postgres":
        db = str(request.getfixturevalue("postgres_url"))
    limits = LimitsSettings(blob_keep_s=0)  # the collector would take any idle upload but a live session's
    settings = kit_settings(tmp_path, db, blobs_settings, max_blob_bytes=64 * MIB, limits=limits)
    return await seed(await aiohttp_client(create_app(settings)))


def _received(world: World) -> float:
    value = world.client.app[METRICS].registry.get_sample_value("vserver_blob_bytes_in_total")
    return float(value or 0)


async def _session(world: World, who: str, **declared: Any) -> dict[str, Any]:
    status, body = await world.call(who, "POST", "/uploads", json=declared)
    assert status == 201, body
    return dict(body)


@both_backends
async def test_a_cut_upload_goes_on_from_the_committed_offset(world: World, tmp_path: Path) -> None:
    data = os.urandom(12 * MIB + 12345)  # on S3 (5 MiB parts): whole parts and a tail
    source = tmp_path / "sealed"
    source.write_bytes(data)
    token = await world.token("a_node")
    port = world.client.server.port
    assert port is not None
    # connections: create, append (cut), status, append (cut), status, append
    fresh = aiohttp.TCPConnector(force_close=True)  # each request meets the proxy's next connection
    async with (
        cutting_proxy(port, after_bytes=4 * MIB, cuts=4, upload=True) as cut,
        aiohttp.ClientSession(connector=fresh) as http,
    ):
        base = f"http://127.0.0.1:{cut.port}/api/v1"
        uploader = ResumableUploader(http, base, lambda: {"Authorization": f"Bearer {token}"}, backoff_s=0.01)
        done = await uploader.upload(FileSource(source), size=len(data))
    assert done.size == len(data) and done.sha256 == hashlib.sha256(data).hexdigest()
    status, got = await world.call("a_node", "GET", f"/blobs/{done.id}")
    assert status == 200 and got == data
    offsets = [
        int(m) for r in cut.requests for m in re.findall(rb"PATCH /api/v1/uploads/\w+\?offset=(\d+)", r)
    ]
    assert len(offsets) == 3 and offsets[0] == 0 and 0 < offsets[1] < offsets[2] < len(data), offsets
    assert _received(world) == len(data)  # no byte was committed twice
    sent = sum(len(r) for r in cut.requests)
    # resent: only what was in flight at each cut (lost with the connection); starting over would have sent
    # the 2 x 4 MiB before the cuts again on top of the whole body
    assert sent < len(data) + 2 * 4 * MIB, (sent, offsets)


async def test_a_later_uploader_goes_on_with_the_session_of_an_earlier_one(
    world: World, tmp_path: Path
) -> None:
    """What a restarted node agent does with the session it journaled."""
    data = os.urandom(9 * MIB + 3)
    source = tmp_path / "sealed"
    source.write_bytes(data)
    token = await world.token("a_node")
    port = world.client.server.port
    assert port is not None
    kept: list[Session] = []
    fresh = aiohttp.TCPConnector(force_close=True)
    async with (
        cutting_proxy(port, after_bytes=4 * MIB, cuts=2, upload=True) as cut,
        aiohttp.ClientSession(connector=fresh) as http,
    ):
        base = f"http://127.0.0.1:{cut.port}/api/v1"
        headers = {"Authorization": f"Bearer {token}"}
        gives_up = ResumableUploader(http, base, lambda: headers, max_failures=0)
        with pytest.raises(UploadBroken):
            await gives_up.upload(FileSource(source), size=len(data), started=kept.append)
        later = ResumableUploader(http, base, lambda: headers)
        done = await later.upload(FileSource(source), size=len(data), resume=kept[0])
    assert done.id == kept[0].blob_id and done.sha256 == hashlib.sha256(data).hexdigest()
    assert _received(world) == len(data)  # the later one sent only what the server did not have
    status, got = await world.call("a_node", "GET", f"/blobs/{done.id}")
    assert status == 200 and got == data


def _write_slowly(path: Path, data: bytes, done: threading.Event) -> threading.Thread:
    """A writer thread (the node's sealing): the file grows in 1 MiB pieces, then `done` is set."""

    def write() -> None:
        with path.open("wb") as fh:
            for start in range(0, len(data), MIB):
                fh.write(data[start : start + MIB])
                fh.flush()
                time.sleep(0.005)
        done.set()

    thread = threading.Thread(target=write)
    thread.start()
    return thread


async def test_a_file_still_being_written_uploads_through_cuts(world: World, tmp_path: Path) -> None:
    data = os.urandom(10 * MIB + 7)
    token = await world.token("a_node")
    port = world.client.server.port
    assert port is not None
    for fail in (False, True):
        done = threading.Event()
        path = tmp_path / f"sealing-{fail}"
        writer = _write_slowly(path, data, done)
        fresh = aiohttp.TCPConnector(force_close=True)
        async with (
            cutting_proxy(port, after_bytes=3 * MIB, cuts=2, upload=True) as cut,
            aiohttp.ClientSession(connector=fresh) as http,
        ):
            base = f"http://127.0.0.1:{cut.port}/api/v1"
            uploader = ResumableUploader(
                http, base, lambda: {"Authorization": f"Bearer {token}"}, backoff_s=0.01
            )
            source = GrowingSource([path], done, functools.partial(bool, fail))  # size unknown: a session
            if fail:  # the writer failed: nothing becomes a blob, and the session is dropped
                with pytest.raises(SourceFailed):
                    await uploader.upload(source)
                async with world.client.app[SESSIONS]() as s:
                    assert (await s.execute(select(UploadSession))).first() is None
            else:
                got = await uploader.upload(source)
        await asyncio.to_thread(writer.join)
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    status, body = await world.call("a_node", "GET", f"/blobs/{got.id}")
    assert status == 200 and body == data


@pytest.mark.parametrize(
    "world", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_offsets_owners_sizes_and_checksums_are_checked(world: World) -> None:
    up = await _session(world, "a_res", size=10)
    path = f"/uploads/{up['id']}"
    status, body = await world.call("a_res", "PATCH", path + "?offset=5", data=b"12345")
    assert status == 409 and body["error"] == "offset-mismatch" and body["offset"] == 0, body
    status, body = await world.call("a_res", "PATCH", path, data=b"12345")
    assert status == 400, body
    for other in ("b_res", "a_res2", "a_node"):  # another organization, user or node: no such upload
        status, body = await world.call(other, "GET", path)
        assert status == 404, (other, body)
        status, body = await world.call(other, "PATCH", path + "?offset=0", data=b"x")
        assert status == 404, (other, body)
    status, body = await world.call("a_res", "PATCH", path + "?offset=0", data=b"0123456789")
    assert status == 200 and body["offset"] == 10, body
    status, body = await world.call("a_res", "PATCH", path + "?offset=10", data=b"!")
    assert status == 413, body  # past the declared size
    status, body = await world.call("a_res", "GET", path)
    assert status == 200 and body["offset"] == 10, body
    wrong = {"size": 10, "sha256": hashlib.sha256(b"something else").hexdigest()}
    status, body = await world.call("a_res", "POST", path + "/complete", json=wrong)
    assert status == 422 and body["error"] == "checksum-mismatch", body
    status, _ = await world.call("a_res", "GET", path)
    assert status == 404  # bytes that are not the ones meant are dropped
    status, body = await world.call("a_res", "POST", "/uploads", json={"size": 65 * MIB})
    assert status == 413, body
    declared = hashlib.sha256(b"abc").hexdigest()
    up = await _session(world, "a_res", sha256=declared)
    path = f"/uploads/{up['id']}"
    status, _ = await world.call("a_res", "PATCH", path + "?offset=0", data=b"abc")
    status, body = await world.call("a_res", "POST", path + "/complete", json={"size": 3, "sha256": "0" * 64})
    assert status == 422, body  # not the SHA-256 declared at the start
    status, body = await world.call("a_res", "POST", path + "/complete", json={"size": 2, "sha256": declared})
    assert status == 409 and body["offset"] == 3, body
    status, body = await world.call("a_res", "POST", path + "/complete", json={"size": 3, "sha256": declared})
    assert status == 201 and body["id"] == up["blob_id"], body
    status, got = await world.call("a_res", "GET", f"/blobs/{body['id']}")
    assert status == 200 and got == b"abc"


@both_backends
async def test_the_collector_removes_expired_uploads_and_spares_live_ones(world: World) -> None:
    store, sessions = world.client.app[BLOBS], world.client.app[SESSIONS]
    expired, live = await _session(world, "a_res"), await _session(world, "a_res")
    for up in (expired, live):
        status, body = await world.call(
            "a_res", "PATCH", f"/uploads/{up['id']}?offset=0", data=b"x" * 100_000
        )
        assert status == 200 and body["offset"] == 100_000, body
    async with sessions() as s:
        row = await s.get(UploadSession, expired["id"])
        assert row is not None
        row.expires_at = row.created_at  # past: no waiting for the expiry
        await s.commit()
    await collect(sessions, store, keep_s=0)
    left = {item.blob_id for item in await store.leftovers(time.time() + 3600)}
    assert live["blob_id"] in left and expired["blob_id"] not in left, left
    status, _ = await world.call("a_res", "GET", f"/uploads/{expired['id']}")
    assert status == 404
    world.client.app[UPLOADS].clear()  # as after a server restart: the completion hashes the stored bytes
    digest = hashlib.sha256(b"x" * 100_000).hexdigest()
    complete = {"size": 100_000, "sha256": digest}
    status, body = await world.call("a_res", "POST", f"/uploads/{live['id']}/complete", json=complete)
    assert status == 201 and body["sha256"] == digest, body
    status, got = await world.call("a_res", "GET", f"/blobs/{body['id']}")
    assert status == 200 and got == b"x" * 100_000
