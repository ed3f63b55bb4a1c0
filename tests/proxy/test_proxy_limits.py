"""A run's limits at its proxy, on a real server and a real Unix socket: bodies held at once (and the memory
they take), requests in flight, body and head read times, and the run's blob quota. Each refusal is a 4xx with
a JSON reason and the proxy keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import socket
import threading
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
from tests.proxy.proxy_kit import World, world
from tests.slow_client import trickle_head

from vfed.proxy.context import ProxyLimits
from vfed.proxy.limits import GATE, Gate
from vfed.proxy.server import ProxyServer

__all__ = ["world"]
MIB = 1024 * 1024


@contextlib.asynccontextmanager
async def _proxy(w: World, tmp_path: Path, **changes: Any) -> AsyncIterator[tuple[ProxyServer, Path]]:
    """A second proxy for the world's run, with other limits."""
    limits = dataclasses.replace(ProxyLimits(), **changes.pop("limits", {}))
    ctx = dataclasses.replace(w.ctx, limits=limits, **changes)
    path = tmp_path / "limited" / "proxy.sock"
    async with ProxyServer(ctx, path) as proxy:
        yield proxy, path


def _gate(proxy: ProxyServer) -> Gate:
    assert proxy._runner is not None
    return proxy._runner.app[GATE]


def _exchange(path: Path, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send a whole request (Connection: close) over the socket; the status and JSON body of the answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        with contextlib.suppress(OSError):  # the proxy may answer (and close) before reading it all
            sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _flood(path: Path, request: bytes, senders: int) -> list[tuple[int, dict[str, Any]]]:
    """The same request from `senders` threads at once (threads: a blocked send keeps its bytes in the
    kernel, not in this process, so traced memory is the proxy's)."""
    answers: list[tuple[int, dict[str, Any]]] = []
    threads = [
        threading.Thread(target=lambda: answers.append(_exchange(path, request))) for _ in range(senders)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def _post(body: bytes) -> bytes:
    head = f"POST /tasks HTTP/1.1\r\nHost: proxy\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


async def test_concurrent_large_bodies_stay_within_the_cap_and_memory_is_bounded(
    world: World, tmp_path: Path
) -> None:
    size, senders, cap = 4 * MIB, 12, 2
    # JSON that is whitespace up to its last byte: each body is read whole before it is found wrong
    request = _post(b"{" + b" " * (size - 2) + b"x")
    limits = {"max_concurrent_bodies": cap, "max_concurrent_requests": 64}
    async with _proxy(world, tmp_path, max_request_bytes=size, limits=limits) as (proxy, path):
        tracemalloc.start()
        try:
            answers = await asyncio.to_thread(_flood, path, request, senders)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        gate = _gate(proxy)
        assert [status for status, _ in answers] == [400] * senders
        assert all(body["error"] == "bad-request" for _, body in answers)
        assert gate.peak_bodies <= 2
        assert gate.peak_body_bytes <= 2 * size
        # held at once: at most two bodies (and a copy each while joined), not twelve of them
        assert peak < 6 * size, f"peak traced memory {peak} bytes"
        async with world.proxy_session.get("/run") as r:
            assert r.status == 200


async def test_a_body_over_the_limit_is_refused_before_it_is_read(world: World, tmp_path: Path) -> None:
    async with _proxy(world, tmp_path, max_request_bytes=64 * 1024) as (proxy, path):
        status, body = await asyncio.to_thread(_exchange, path, _post(b"{" + b" " * 200_000 + b"}"))
        assert (status, body["error"]) == (413, "too-large")
        assert _gate(proxy).peak_body_bytes == 0


async def _until(condition: Callable[[], bool]) -> None:
    """Wait for a state of the proxy (the test's own timeout bounds it)."""
    for _ in itertools.count():
        if condition():
            return
        await asyncio.sleep(0.02)


async def _open_stalled_post(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A POST whose body never finishes: it stays in flight at the proxy."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(b"POST /tasks HTTP/1.1\r\nHost: proxy\r\nContent-Length: 1000\r\n\r\n{")
    await writer.drain()
    return reader, writer


async def test_requests_past_the_in_flight_cap_get_429_and_the_run_goes_on(
    world: World, tmp_path: Path
) -> None:
    limits = {"max_concurrent_requests": 3, "max_concurrent_bodies": 1}
    async with _proxy(world, tmp_path, limits=limits) as (proxy, path):
        gate = _gate(proxy)
        stalled = [await _open_stalled_post(path) for _ in range(3)]
        await _until(lambda: gate.in_flight == 3)
        connector = aiohttp.UnixConnector(path=str(path))
        async with aiohttp.ClientSession(connector=connector, base_url="http://proxy") as http:
            async with http.get("/run") as r:
                assert r.status == 429
                assert (await r.json())["error"] == "too-many-requests"
            for _, writer in stalled:
                writer.close()
                await writer.wait_closed()
            await _until(lambda: gate.in_flight == 0)
            async with http.get("/run") as r:
                assert r.status == 200
                assert (await r.json())["run_id"] == world.parent_run


async def test_a_body_that_stalls_is_answered_408(world: World, tmp_path: Path) -> None:
    async with _proxy(world, tmp_path, limits={"body_timeout_s": 1.0}) as (_proxy_server, path):
        reader, writer = await _open_stalled_post(path)
        answer = await reader.read()  # until the proxy closes the connection
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert int(head.split()[1]) == 408
        assert json.loads(body)["error"] == "body-timeout"


async def test_the_runs_blob_quota_refuses_more_uploads_and_the_proxy_keeps_serving(
    world: World, tmp_path: Path
) -> None:
    new = {"name": "sub", "input": {"method": "echo", "args": [1]}, "organizations": [world.org_ids["b"]]}
    async with _proxy(world, tmp_path, limits={"max_blob_uploads": 2}) as (proxy, path):
        connector = aiohttp.UnixConnector(path=str(path))
        async with aiohttp.ClientSession(connector=connector, base_url="http://proxy") as http:
            statuses = []
            for _ in range(3):
                async with http.post("/tasks", json=new) as r:
                    statuses.append(r.status)
                    last = await r.json()
            assert statuses == [201, 201, 429]
            assert last["error"] == "quota-exceeded"
            assert proxy.ctx.blob_uploads == 2
            async with http.get("/run") as r:
                assert r.status == 200
    big = {**new, "input": {"method": "echo", "args": ["y" * 5000]}}
    async with _proxy(world, tmp_path, limits={"max_blob_bytes": 4096}) as (proxy, path):
        connector = aiohttp.UnixConnector(path=str(path))
        async with aiohttp.ClientSession(connector=connector, base_url="http://proxy") as http:
            async with http.post("/tasks", json=big) as r:
                assert r.status == 413
                assert (await r.json())["error"] == "quota-exceeded"
            async with http.post("/tasks", json=new) as r:  # a small one still fits
                assert r.status == 201
            assert 0 < proxy.ctx.blob_bytes <= 4096


def _trickle_head(path: Path) -> tuple[int, int]:
    """The slow-header client against the proxy's socket; (bytes sent, of)."""
    head = b"GET /run HTTP/1.1\r\nHost: proxy\r\nUser-Agent: slow-header-client\r\n\r\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        return trickle_head(sock, head)


async def test_slow_header_client_is_cut_off_while_the_run_is_served(world: World, tmp_path: Path) -> None:
    async with _proxy(world, tmp_path, limits={"head_timeout_s": 2.0}) as (proxy, path):
        slow = asyncio.create_task(asyncio.to_thread(_trickle_head, path))
        connector = aiohttp.UnixConnector(path=str(path))
        served = 0
        async with aiohttp.ClientSession(connector=connector, base_url="http://proxy") as http:
            while not slow.done():
                async with http.get("/run") as r:
                    assert r.status == 200
                    served += 1
                await asyncio.sleep(0.2)
            sent, of = await slow
            assert sent < of
            assert served > 0
            assert proxy.watch.cut == 1
            async with http.get("/run") as r:
                assert r.status == 200
