"""Blob downloads of the node and the proxy (vfed.proxy.rest) resume where a broken transfer stopped: through
a TCP proxy that cuts the first connections mid-body, against a real server app, the bytes come back whole
and the later attempts ask for `Range: bytes=<what arrived>-`. A server that sends nothing is not retried."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from tests.cutting_proxy import cutting_proxy
from tests.node.node_harness import Server

from vfed.node.server_api import NodeClient
from vfed.proxy.rest import ServerUnavailable

MIB = 1024 * 1024


async def _ranges(requests: list[bytes]) -> list[int]:
    """The start of each Range the attempts asked for, in order."""
    starts = []
    for head in requests:
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"range: bytes="):
                starts.append(int(line.split(b"=")[1].rstrip(b"-")))
    return starts


@contextlib.asynccontextmanager
async def _stored(tmp_path: Path, data: bytes) -> AsyncIterator[tuple[NodeClient, str, str, int]]:
    """A server with organization a's node logged in and `data` stored: (node, its API key, blob id, the
    server's port)."""
    server = Server(tmp_path / "server", mqtt_url=None)
    keys = await server.seed(["a"])
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            node = NodeClient(session, server.url, keys["a"])
            await node.login()
            blob = await node.upload_blob(data)
            port = urlsplit(server.url).port
            assert port is not None
            yield node, keys["a"], blob.id, port
    finally:
        await server.stop()


async def test_downloads_resume_after_broken_transfers(tmp_path: Path) -> None:
    data = os.urandom(3 * MIB + 123)
    async with _stored(tmp_path, data) as (node, api_key, blob_id, port):
        for into_file in (False, True):
            async with cutting_proxy(port, after_bytes=MIB, cuts=3) as cut:
                # fresh connections only: each attempt meets the proxy's next connection
                flaky_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
                async with flaky_session:
                    flaky = NodeClient(flaky_session, f"http://127.0.0.1:{cut.port}", api_key)
                    flaky.token = node.token
                    if into_file:
                        target = tmp_path / "blob"
                        size = await flaky.download_blob_to(blob_id, target)
                        got = target.read_bytes()
                        assert size == len(data) and target.stat().st_mode & 0o777 == 0o600
                    else:
                        got = await flaky.download_blob(blob_id)
            assert got == data
            starts = await _ranges(cut.requests)
            assert len(starts) == 3 and starts == sorted(starts) and 0 < starts[0] <= MIB, starts


async def test_a_server_that_sends_nothing_is_not_retried(tmp_path: Path) -> None:
    async with _stored(tmp_path, b"x" * MIB) as (node, api_key, blob_id, port):
        async with cutting_proxy(port, after_bytes=0, cuts=100) as cut:
            flaky = NodeClient(node.session, f"http://127.0.0.1:{cut.port}", api_key)
            flaky.token = node.token
            with pytest.raises(ServerUnavailable):
                await flaky.download_blob(blob_id)
        # one attempt of ours; aiohttp itself repeats an idempotent request once on a connection that
        # closed before any answer (ClientSession's persistent-connection retry)
        gets = [r for r in cut.requests if r.startswith(b"GET ")]
        assert len(gets) == 2 and not await _ranges(gets)
