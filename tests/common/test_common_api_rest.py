"""The shared REST client (vfed.common.api.rest) against a small local aiohttp server: where it retries (an
idempotent request answered 502/503/504, a connection that could not be opened) and where it must not (a
POST the server may have acted on), that attempts are bounded, and what errors become."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from vfed.client.errors import ApiError as ClientApiError
from vfed.client.http import ApiSession
from vfed.common.api.errors import ApiError, error_response
from vfed.common.api.rest import RestClient, ServerUnavailable


def _app(answers: dict[str, list[int]], seen: list[str]) -> web.Application:
    """Each request to /api/v1/<name> takes the next status of answers[name] (the last one repeats)."""

    async def handle(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        seen.append(f"{request.method} {name}")
        statuses = answers[name]
        status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
        if status == 200:
            return web.json_response({"name": name, "auth": request.headers.get("Authorization")})
        if status == 404:
            return error_response(404, "not-found", f"no {name}")
        return web.Response(status=status, text="<html>bad gateway</html>")

    app = web.Application()
    app.router.add_route("*", "/api/v1/{name}", handle)
    return app


@pytest.fixture
async def served(aiohttp_server: Any) -> AsyncIterator[tuple[str, dict[str, list[int]], list[str]]]:
    answers: dict[str, list[int]] = {}
    seen: list[str] = []
    server = await aiohttp_server(_app(answers, seen))
    yield str(server.make_url("/")), answers, seen


async def test_an_idempotent_request_is_retried_after_a_503(served: Any) -> None:
    url, answers, seen = served
    answers["flaky"] = [503, 502, 200]
    async with aiohttp.ClientSession() as session:
        rest = RestClient(session, url, token="t0k")
        assert await rest.request("GET", "/flaky") == {"name": "flaky", "auth": "Bearer t0k"}
        answers["put"] = [504, 200]
        assert (await rest.request("PUT", "/put", json={}))["name"] == "put"
    assert seen == ["GET flaky", "GET flaky", "GET flaky", "PUT put", "PUT put"]


async def test_a_post_is_not_retried(served: Any) -> None:
    url, answers, seen = served
    answers["tasks"] = [503, 200]
    async with aiohttp.ClientSession() as session:
        rest = RestClient(session, url)
        with pytest.raises(ServerUnavailable, match="HTTP 503"):
            await rest.request("POST", "/tasks", json={"name": "x"})
    assert seen == ["POST tasks"]  # the server may have acted on it: asking again is the caller's call


async def test_attempts_are_bounded(served: Any) -> None:
    url, answers, seen = served
    answers["down"] = [503]
    async with aiohttp.ClientSession() as session:
        rest = RestClient(session, url)
        with pytest.raises(ServerUnavailable):
            await rest.request("GET", "/down")
    assert seen == ["GET down"] * RestClient.retry_attempts


async def test_an_error_answer_is_not_retried(served: Any) -> None:
    url, answers, seen = served
    answers["gone"] = [404]
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ApiError) as raised:
            await RestClient(session, url).request("GET", "/gone")
    assert (raised.value.status, raised.value.error, raised.value.detail) == (404, "not-found", "no gone")
    assert seen == ["GET gone"]


async def test_a_server_that_cannot_be_reached_is_unavailable() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ServerUnavailable, match="GET /health"):
            await RestClient(session, f"http://127.0.0.1:{port}").request("GET", "/health")


async def test_the_researchers_session_keeps_its_own_errors(served: Any) -> None:
    """The researcher's client retries the same way, on a session of its own, and raises its ApiError
    (a ClientError) for any error answer, a 503 included once the attempts are spent."""
    url, answers, seen = served
    answers["runs"] = [502, 200]
    answers["down"] = [503]
    async with ApiSession(url, token="abc") as api:
        assert (await api.request("GET", "/runs"))["auth"] == "Bearer abc"
        with pytest.raises(ClientApiError) as raised:
            await api.request("GET", "/down")
        assert raised.value.status == 503
    assert api._session is None  # its own session is closed with it
    assert seen == ["GET runs", "GET runs"] + ["GET down"] * ApiSession.retry_attempts
