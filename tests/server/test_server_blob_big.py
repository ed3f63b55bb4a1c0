"""A 1 GiB blob goes up and comes back through a real `vserver start` process with bounded memory.

Memory is the resident set of the server process, sampled while the transfer runs.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest
from vserver_proc import server_process, vserver

GIB = 1024**3
CHUNK = 1024 * 1024
MAX_RSS_GROWTH = 150 * 1024 * 1024

IMPORT = """
organizations: [{name: alpha}]
users: [{username: res, password: "long password", organization: alpha, roles: [researcher]}]
"""


async def _sample_peak(pid: int, stop: asyncio.Event) -> int:
    proc, peak = psutil.Process(pid), 0
    while not stop.is_set():
        peak = max(peak, proc.memory_info().rss)
        await asyncio.sleep(0.05)
    return peak


def _pattern(i: int) -> bytes:
    return i.to_bytes(8, "big") * (CHUNK // 8)


async def _body(digest: hashlib._Hash) -> AsyncIterator[bytes]:
    for i in range(GIB // CHUNK):
        chunk = _pattern(i)
        digest.update(chunk)
        yield chunk


@pytest.mark.slow
async def test_one_gib_upload_and_download_bounded_memory(tmp_path: Path) -> None:
    spec = tmp_path / "import.yaml"
    spec.write_text(IMPORT)
    with server_process(tmp_path, max_blob_bytes=2 * GIB) as srv:
        vserver("import", str(spec), "--config", str(srv.config))
        async with aiohttp.ClientSession(srv.url, timeout=aiohttp.ClientTimeout(total=600)) as http:
            r = await http.post("/api/v1/token/user", json={"username": "res", "password": "long password"})
            auth = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
            await http.get("/api/v1/health")
            baseline = psutil.Process(srv.proc.pid).memory_info().rss
            stop = asyncio.Event()
            sampler = asyncio.create_task(_sample_peak(srv.proc.pid, stop))
            sent = hashlib.sha256()
            r = await http.post("/api/v1/blobs", data=_body(sent), headers=auth)
            blob = await r.json()
            assert r.status == 201, blob
            assert blob["size"] == GIB and blob["sha256"] == sent.hexdigest()
            got, size = hashlib.sha256(), 0
            async with http.get(f"/api/v1/blobs/{blob['id']}", headers=auth) as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_chunked(CHUNK):
                    got.update(chunk)
                    size += len(chunk)
            assert size == GIB and got.hexdigest() == blob["sha256"]
            half = GIB // 2
            async with http.get(
                f"/api/v1/blobs/{blob['id']}", headers={**auth, "Range": f"bytes={half}-"}
            ) as resp:
                assert resp.status == 206
                first = await resp.content.readexactly(CHUNK)
                assert first == _pattern(half // CHUNK)
            stop.set()
            peak = await sampler
    growth = peak - baseline
    print(
        f"server RSS baseline {baseline / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, "
        f"growth {growth / 2**20:.0f} MiB"
    )
    assert growth < MAX_RSS_GROWTH, f"server RSS grew by {growth / 2**20:.0f} MiB moving 1 GiB"
