"""The agent's TCP proxy listener (runs in a cluster): one listener, each connection handed to the proxy of
the run whose token it carries; every other request is 401 with a JSON reason, and a token never shows in a
log. A real server, real proxies of two runs, real TCP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from tests.proxy.proxy_kit import World, world

from vfed.proxy.app import RunInfo
from vfed.proxy.listener import MAX_HEAD_BYTES, ProxyListener, bearer_token, new_token
from vfed.proxy.server import ProxyServer

__all__ = ["world"]


@dataclasses.dataclass
class Two:
    listener: ProxyListener
    url: str
    proxies: list[ProxyServer]

    def token(self, i: int) -> str:
        token = self.proxies[i].token
        assert token is not None
        return token.get_secret_value()


@contextlib.asynccontextmanager
async def _two_runs(w: World, head_timeout_s: float = 5.0) -> AsyncIterator[Two]:
    """The world's run and a second one (another run id), both behind one listener on an ephemeral port."""
    other = dataclasses.replace(w.ctx, run=dataclasses.replace(w.ctx.run, run_id=w.ctx.run.run_id + 1000))
    async with ProxyListener("127.0.0.1", 0, head_timeout_s=head_timeout_s) as listener:
        proxies = [ProxyServer(ctx, listener=listener, token=new_token()) for ctx in (w.ctx, other)]
        for proxy in proxies:
            await proxy.start()
        try:
            host, port = listener.address
            yield Two(listener, f"http://{host}:{port}", proxies)
        finally:
            for proxy in proxies:
                await proxy.stop()


async def _get(url: str, token: str | None, session: aiohttp.ClientSession | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        async with session.get(f"{url}/run", headers=headers) as answer:
            return answer.status, await answer.json(content_type=None)
    finally:
        if own:
            await session.close()


def _raw(address: tuple[str, int], request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request over a fresh connection, read to the end (the listener closes after a refusal)."""
    with socket.create_connection(address) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def test_each_token_reaches_its_own_runs_proxy_only_and_nothing_else_passes(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with _two_runs(world) as two:
        first, second = world.ctx.run.run_id, world.ctx.run.run_id + 1000
        assert await _get(two.url, two.token(0)) == (200, _run_view(world.ctx.run))
        status, body = await _get(two.url, two.token(1))
        assert (status, body["run_id"]) == (200, second) and first != second
        refusals = [None, "", "nonsense", two.token(0)[:-1], two.token(0) + "x", two.token(0).upper()]
        for token in refusals:
            status, body = await _get(two.url, token)
            assert status == 401 and body["error"] == "unauthorized", (token, body)
        for header in (f"Basic {two.token(0)}", f"Bearer {two.token(0)} {two.token(1)}", "Bearer"):
            status, headers, raw = await asyncio.to_thread(
                _raw,
                two.listener.address,
                f"GET /run HTTP/1.1\r\nHost: p\r\nAuthorization: {header}\r\n\r\n".encode(),
            )
            assert status == 401 and json.loads(raw)["error"] == "unauthorized"
            assert headers["www-authenticate"].startswith("Bearer")
        # The 401 says nothing about which runs exist: one detail for every refusal.
        details = {(await _get(two.url, t))[1]["detail"] for t in ("x", two.token(0)[:10], None)}
        assert len(details) == 1
        assert two.listener.stats.refused["bad-token"] >= len(refusals) + 3
        tokens = (two.token(0), two.token(1))
        # One keep-alive connection cannot change runs; an ended run's token opens nothing.
        connector = aiohttp.TCPConnector(limit=1)  # one keep-alive connection for every request
        async with aiohttp.ClientSession(connector=connector) as session:
            assert (await _get(two.url, two.token(0), session))[0] == 200
            status, body = await _get(two.url, two.token(1), session)  # same connection, other run's token
            assert (status, body["error"]) == (401, "unauthorized")
            assert (await _get(two.url, two.token(0), session))[0] == 200  # a new connection after the close
            ended = two.token(0)
            await two.proxies[0].stop()  # the run ended: its open connection goes, its token opens nothing
            status, body = await _get(two.url, ended, session)
            assert (status, body["error"]) == (401, "unauthorized")
        assert (await _get(two.url, two.token(1)))[0] == 200  # the other run is unaffected
        assert two.listener.runs == 1
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert logged and not any(t in logged for t in tokens)


def _run_view(run: RunInfo) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "task_id": run.task_id,
        "job_id": run.job_id,
        "organization_id": run.organization_id,
        "collaboration_id": run.collaboration_id,
        "image": run.image,
    }


async def test_oversized_or_unfinished_heads_are_cut(world: World) -> None:
    async with _two_runs(world, head_timeout_s=0.3) as two:
        huge = b"GET /run HTTP/1.1\r\nX-Pad: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n"
        status, _, body = await asyncio.to_thread(_raw, two.listener.address, huge)
        assert status == 401 and json.loads(body)["error"] == "unauthorized"
        assert two.listener.stats.refused["head-too-large"] == 1

        def unfinished() -> bytes:
            with socket.create_connection(two.listener.address) as sock:
                sock.sendall(b"GET /run HTTP/1.1\r\nAuthorization: Bearer " + two.token(0).encode())
                return sock.recv(65536)  # until the listener closes the connection

        assert await asyncio.to_thread(unfinished) == b""  # closed without an answer, and no run reached
        assert two.listener.stats.refused["head-timeout"] == 1 and two.listener.stats.handed_over == 0


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    for value in (None, "", "Bearer", "Bearer ", "Basic abc", "Bearer a b", "abc"):
        assert bearer_token(value) is None, value
    token = new_token().get_secret_value()
    assert len(token) == 43 and token != new_token().get_secret_value()
