"""Limits of the server: blob quotas per organization, the collector of unreferenced blobs, and the deadline
for a request's head, each on a real server (a `vserver start` process, or the app in-process where the test
has to reach into the database or the blob folder)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import update
from tests.node.node_harness import PASSWORD, Server
from tests.slow_client import trickle_head
from vserver_proc import server_process, vserver

from vfed.server.blob_collector import collect
from vfed.server.models import Blob, utcnow
from vfed.server.state import BLOBS, SESSIONS

MIB = 1024 * 1024

IMPORT = """
organizations: [{name: alpha}, {name: beta}]
users:
  - {username: res-alpha, password: "long password", organization: alpha, roles: [researcher]}
  - {username: res-beta, password: "long password", organization: beta, roles: [researcher]}
"""


async def _login(http: aiohttp.ClientSession, username: str, password: str) -> dict[str, str]:
    r = await http.post("/api/v1/token/user", json={"username": username, "password": password})
    assert r.status == 200, await r.text()
    return {"Authorization": f"Bearer {(await r.json())['access_token']}"}


async def _upload(http: aiohttp.ClientSession, auth: dict[str, str], data: Any) -> tuple[int, dict[str, Any]]:
    headers = {**auth, "Content-Type": "application/octet-stream"}
    async with http.post("/api/v1/blobs", data=data, headers=headers) as r:
        return r.status, await r.json()


async def test_blob_flood_hits_the_organizations_quota_and_others_still_upload(tmp_path: Path) -> None:
    spec = tmp_path / "import.yaml"
    spec.write_text(IMPORT)
    limits = {"blob_quota_bytes": 3 * MIB, "blob_quota_count": 50}
    with server_process(tmp_path, limits=limits) as srv:
        vserver("import", str(spec), "--config", str(srv.config))
        async with aiohttp.ClientSession(srv.url) as http:
            alpha = await _login(http, "res-alpha", "long password")
            beta = await _login(http, "res-beta", "long password")
            stored, refusal = 0, None
            for _ in range(10):  # a flood of 1 MiB blobs by alpha: three fit, the fourth does not
                status, body = await _upload(http, alpha, os.urandom(MIB))
                if status != 201:
                    refusal = (status, body)
                    break
                stored += 1
            assert stored == 3
            assert refusal is not None
            assert refusal[0] == 413
            assert refusal[1]["error"] == "quota-exceeded"
            assert "quota" in refusal[1]["detail"]
            # a streamed (chunked) upload is stopped as well, and leaves nothing behind
            status, body = await _upload(http, alpha, _chunks(2 * MIB))
            assert (status, body["error"]) == (413, "quota-exceeded")
            assert (await _upload(http, alpha, b"x" * 100))[0] == 413  # the quota is full
            # another organization is not affected, and the server keeps serving
            status, body = await _upload(http, beta, os.urandom(MIB))
            assert status == 201, body
            async with http.get("/api/v1/health") as r:
                assert r.status == 200
    leftovers = [p for p in (tmp_path / "data" / "blobs").rglob("*") if p.is_file()]
    assert len(leftovers) == 4  # alpha's three and beta's one: the refused uploads kept no file


async def _chunks(size: int) -> AsyncIterator[bytes]:
    for _ in range(size // (256 * 1024)):
        yield os.urandom(256 * 1024)


async def test_blob_count_quota_answers_429_with_a_reason(tmp_path: Path) -> None:
    spec = tmp_path / "import.yaml"
    spec.write_text(IMPORT)
    with server_process(tmp_path, limits={"blob_quota_count": 3}) as srv:
        vserver("import", str(spec), "--config", str(srv.config))
        async with aiohttp.ClientSession(srv.url) as http:
            alpha = await _login(http, "res-alpha", "long password")
            beta = await _login(http, "res-beta", "long password")
            answers = [await _upload(http, alpha, b"small envelope") for _ in range(5)]
            assert [status for status, _ in answers] == [201, 201, 201, 429, 429]
            assert answers[3][1]["error"] == "quota-exceeded"
            assert (await _upload(http, beta, b"small envelope"))[0] == 201


@contextlib.asynccontextmanager
async def _in_process(tmp_path: Path) -> AsyncIterator[tuple[Server, aiohttp.ClientSession, dict[str, str]]]:
    server = Server(tmp_path / "server", mqtt_url=None)
    await server.seed(["a", "b"])
    await server.start()
    try:
        async with aiohttp.ClientSession(server.url) as http:
            yield server, http, await _login(http, "res-a", PASSWORD)
    finally:
        await server.stop()


async def test_collector_removes_old_unreferenced_blobs_and_spares_used_and_uploading_ones(
    tmp_path: Path,
) -> None:
    async with _in_process(tmp_path) as (server, http, auth):
        assert server.runner is not None
        app = server.runner.app
        store = app[BLOBS]
        unused_small = (await _upload(http, auth, b"never used"))[1]["id"]  # kept in its row
        unused_file = (await _upload(http, auth, os.urandom(2 * MIB)))[1]["id"]  # kept as a file
        used = (await _upload(http, auth, b"a task's input"))[1]["id"]
        fresh = (await _upload(http, auth, b"uploaded just now"))[1]["id"]
        async with http.get("/api/v1/collaborations", headers=auth) as r:
            collab = (await r.json())["data"][0]["id"]
        async with http.get("/api/v1/organizations", headers=auth) as r:
            org = (await r.json())["data"][0]["id"]
        task = {
            "collaboration_id": collab,
            "name": "t",
            "image": "vfed-test/node-probe",
            "organizations": [{"id": org, "input_blob_id": used}],
        }
        async with http.post("/api/v1/tasks", json=task, headers=auth) as r:
            assert r.status == 201, await r.text()
        # an upload in progress, past its first MiB (so its file exists), its file made to look old
        release = asyncio.Event()
        uploading = asyncio.create_task(_upload(http, auth, _held(release)))
        part = await _wait_for_part(store.root)
        two_hours_ago = time.time() - 7200
        os.utime(part, (two_hours_ago, two_hours_ago))
        orphan = store.root / "ff" / ("ff" * 16)  # a file whose row was never committed (a crash)
        orphan.parent.mkdir(parents=True, exist_ok=True)
        orphan.write_bytes(b"orphaned")
        os.utime(orphan, (two_hours_ago, two_hours_ago))
        async with app[SESSIONS]() as s:
            old = utcnow() - timedelta(hours=2)
            await s.execute(update(Blob).where(Blob.id != fresh).values(created_at=old))
            await s.commit()

        done = await collect(app[SESSIONS], store, keep_s=3600)

        assert (done.rows, done.files) == (2, 1)
        assert not orphan.exists()
        assert not store.path(unused_file).exists()
        assert part.exists()  # the upload in progress keeps its file
        for blob_id, status in ((unused_small, 404), (unused_file, 404), (used, 200), (fresh, 200)):
            async with http.get(f"/api/v1/blobs/{blob_id}", headers=auth) as r:
                assert r.status == status, blob_id
        release.set()
        status, body = await uploading
        assert status == 201
        async with http.get(f"/api/v1/blobs/{body['id']}", headers=auth) as r:
            assert r.status == 200
            assert len(await r.read()) == 3 * MIB


async def _held(release: asyncio.Event) -> AsyncIterator[bytes]:
    yield b"\0" * (2 * MIB)
    await release.wait()
    yield b"\1" * MIB


async def _wait_for_part(root: Path) -> Path:
    while True:
        parts = await asyncio.to_thread(lambda: list(root.rglob("*.part")))
        if parts:
            return parts[0]
        await asyncio.sleep(0.05)


def _trickle_head(port: int, path: str) -> tuple[int, int]:
    """The slow-header client against the server's port; (bytes sent, of)."""
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow-header-client\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        return trickle_head(sock, head)


async def test_slow_header_client_is_cut_off_while_others_are_served(tmp_path: Path) -> None:
    with server_process(tmp_path, limits={"head_timeout_s": 2.0}) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        slow = asyncio.create_task(asyncio.to_thread(_trickle_head, port, "/api/v1/health"))
        async with aiohttp.ClientSession(srv.url) as http:
            served = 0
            while not slow.done():
                async with http.get("/api/v1/health") as r:
                    assert r.status == 200
                    served += 1
                await asyncio.sleep(0.2)
        sent, of = await slow
        assert sent < of  # cut off before the head was complete
        assert served > 0
        # the server still accepts and serves new connections
        async with aiohttp.ClientSession(srv.url) as http, http.get("/api/v1/health") as r:
            assert r.status == 200


async def test_upload_whose_body_stalls_is_dropped_with_408(tmp_path: Path) -> None:
    with server_process(tmp_path, limits={"body_timeout_s": 1.0}) as srv:
        spec = tmp_path / "import.yaml"
        spec.write_text(IMPORT)
        vserver("import", str(spec), "--config", str(srv.config))
        async with aiohttp.ClientSession(srv.url) as http:
            alpha = await _login(http, "res-alpha", "long password")
            never = asyncio.Event()
            status, body = await _upload(http, alpha, _held(never))
            assert (status, body["error"]) == (408, "body-timeout")
            assert (await _upload(http, alpha, b"ok"))[0] == 201
    assert not [p for p in (tmp_path / "data" / "blobs").rglob("*.part")]


async def test_json_body_that_trickles_is_dropped_with_408(tmp_path: Path) -> None:
    """A small JSON body (the login's) that never finishes arriving gets 408; the next request is served."""
    with server_process(tmp_path, limits={"body_timeout_s": 1.0}) as srv:
        spec = tmp_path / "import.yaml"
        spec.write_text(IMPORT)
        vserver("import", str(spec), "--config", str(srv.config))
        never = asyncio.Event()

        async def half_a_login() -> AsyncIterator[bytes]:
            yield b'{"username": "res-alpha", '
            await never.wait()

        async with aiohttp.ClientSession(srv.url) as http:
            headers = {"Content-Type": "application/json"}
            async with http.post("/api/v1/token/user", data=half_a_login(), headers=headers) as r:
                assert (r.status, (await r.json())["error"]) == (408, "body-timeout")
            await _login(http, "res-alpha", "long password")
