"""The error document every vfed HTTP API answers with, `{"error": <code>, "detail": <one line>}`, and the
exception that carries one (the server raises it, the node, proxy and client receive it).

`error` is a short machine code (`not-found`, `quota-exceeded`, ...); `detail` is one human line that holds
nothing a node did not allow out (a run's failure reasons are the classified ones of `reasons`).
"""

from __future__ import annotations

import aiohttp
from aiohttp import web
from pydantic import BaseModel


class ErrorDocument(BaseModel):
    """The body of every error answer (the server's OpenAPI names it)."""

    error: str
    detail: str


class ApiError(Exception):
    """An answer other than success: the HTTP status, the error code and the detail line."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


def error_response(
    status: int,
    error: str,
    detail: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, int | str] | None = None,
) -> web.Response:
    """An error answer in the one shape every vfed API uses; `extra` adds machine-readable fields beside
    the two (an upload's committed `offset` on a 409)."""
    body = {**(extra or {}), **ErrorDocument(error=error, detail=detail).model_dump()}
    return web.json_response(body, status=status, headers=headers)


async def read_error(response: aiohttp.ClientResponse) -> tuple[str, str]:
    """(error, detail) of an error answer; an answer that is not an error document (a proxy's HTML page, a
    truncated body) gives the HTTP reason and the start of its text."""
    fallback = (response.reason or "http-error").lower().replace(" ", "-")
    try:
        body = await response.json(content_type=None)
        return str(body.get("error", fallback)), str(body.get("detail", ""))
    except (ValueError, AttributeError, aiohttp.ContentTypeError):
        return fallback, (await response.text(errors="replace"))[:500]
