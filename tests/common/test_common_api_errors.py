"""The error document every vfed API answers with, read back by every component (vfed.common.api.errors):
a real aiohttp server answering error documents and things that are not, and the readers of the server's,
the proxy's and the client's sides raising the same ApiError."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from vfed.client.errors import ApiError as ClientApiError
from vfed.client.errors import ClientError
from vfed.common.api.errors import ApiError, ErrorDocument, error_response, read_error
from vfed.server.errors import ApiError as ServerApiError


async def _serve(aiohttp_client: Any) -> Any:
    async def document(_: web.Request) -> web.Response:
        return error_response(409, "conflict", "the run is finished", {"Retry-After": "3"})

    async def html(_: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>bad gateway</html>", content_type="text/html")

    async def not_a_mapping(_: web.Request) -> web.Response:
        return web.json_response([1, 2], status=400)

    app = web.Application()
    app.router.add_get("/document", document)
    app.router.add_get("/html", html)
    app.router.add_get("/list", not_a_mapping)
    return await aiohttp_client(app)


async def test_an_error_document_round_trips(aiohttp_client: Any) -> None:
    client = await _serve(aiohttp_client)
    response = await client.get("/document")
    assert response.status == 409 and response.headers["Retry-After"] == "3"
    assert ErrorDocument.model_validate(await response.json()) == ErrorDocument(
        error="conflict", detail="the run is finished"
    )
    response = await client.get("/document")
    assert await read_error(response) == ("conflict", "the run is finished")


@pytest.mark.parametrize(
    ("path", "error", "detail"),
    [("/html", "bad-gateway", "<html>bad gateway</html>"), ("/list", "bad-request", "[1, 2]")],
)
async def test_an_answer_that_is_not_an_error_document_still_reads(
    aiohttp_client: Any, path: str, error: str, detail: str
) -> None:
    client = await _serve(aiohttp_client)
    response = await client.get(path)
    assert await read_error(response) == (error, detail)


def test_every_side_raises_the_one_api_error() -> None:
    server = ServerApiError(404, "not-found", "task 9 not found", {"X": "y"})
    client = ClientApiError(401, "token-revoked", "log in again")
    for exc in (server, client, ApiError(403, "forbidden", "no")):
        assert isinstance(exc, ApiError)
    assert (server.status, server.error, server.detail, server.headers) == (
        404,
        "not-found",
        "task 9 not found",
        {"X": "y"},
    )
    assert (
        isinstance(client, ClientError) and str(client) == "server answered 401 token-revoked: log in again"
    )
