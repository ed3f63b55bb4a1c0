"""A run's limits at its proxy: requests in flight, bodies held in the agent's memory, body read time, and
the blobs (and bytes) the run may upload to the server (ProxyLimits in context.py says why each exists).

Every refusal is a ProxyError (4xx JSON); the proxy and the run keep going.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Middleware

from vfed.common.api.resources import Blob
from vfed.proxy.context import ProxyContext, ProxyError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Gate:
    """Counts of one proxy app; `peak_bodies` and `peak_body_bytes` show what the agent held at most."""

    bodies: asyncio.Semaphore
    in_flight: int = 0
    reading: int = 0
    body_bytes: int = 0
    peak_bodies: int = 0
    peak_body_bytes: int = 0
    refused: dict[str, int] = field(default_factory=dict)


GATE = web.AppKey("gate", Gate)


def new_gate(ctx: ProxyContext) -> Gate:
    return Gate(asyncio.Semaphore(ctx.limits.max_concurrent_bodies))


def refuse(gate: Gate, status: int, error: str, detail: str) -> ProxyError:
    gate.refused[error] = gate.refused.get(error, 0) + 1
    return ProxyError(status, error, detail)


def limits_middleware(ctx: ProxyContext) -> Middleware:
    """Refuse past `max_concurrent_requests` in flight; let requests with a body in `max_concurrent_bodies`
    at a time (the rest wait unread: aiohttp stops reading a socket whose buffer is full)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        gate = request.app[GATE]
        limit = ctx.limits.max_concurrent_requests
        if gate.in_flight >= limit:
            raise refuse(gate, 429, "too-many-requests", f"this run has {limit} requests in flight already")
        gate.in_flight += 1
        try:
            if not request.body_exists:
                return await handler(request)
            length = request.content_length
            if length is not None and length > ctx.max_request_bytes:
                raise too_large(ctx)
            async with gate.bodies:
                return await handler(request)
        finally:
            gate.in_flight -= 1

    return middleware


def too_large(ctx: ProxyContext) -> ProxyError:
    limit = ctx.max_request_bytes
    return ProxyError(413, "too-large", f"request body over the proxy's limit of {limit} bytes")


async def read_body(request: web.Request, ctx: ProxyContext) -> bytes:
    """The whole body (at most `max_request_bytes`, within `body_timeout_s`), counted while held."""
    gate = request.app[GATE]
    chunks: list[bytes] = []
    held = 0
    gate.reading += 1
    gate.peak_bodies = max(gate.peak_bodies, gate.reading)
    try:
        async with asyncio.timeout(ctx.limits.body_timeout_s):
            async for chunk in request.content.iter_any():
                if held + len(chunk) > ctx.max_request_bytes:
                    raise too_large(ctx)
                chunks.append(chunk)
                held += len(chunk)
                gate.body_bytes += len(chunk)
                gate.peak_body_bytes = max(gate.peak_body_bytes, gate.body_bytes)
    except TimeoutError:
        raise refuse(
            gate, 408, "body-timeout", f"the request body did not arrive within {ctx.limits.body_timeout_s} s"
        ) from None
    finally:
        gate.reading -= 1
        gate.body_bytes -= held
    return b"".join(chunks)


async def upload_blob(ctx: ProxyContext, data: bytes) -> Blob:
    """Upload a sealed input within the run's blob quota (counted before; given back if the upload fails)."""
    limits = ctx.limits
    if ctx.blob_uploads + 1 > limits.max_blob_uploads:
        raise ProxyError(
            429,
            "quota-exceeded",
            f"this run uploaded {ctx.blob_uploads} blobs; this node allows {limits.max_blob_uploads}",
        )
    if ctx.blob_bytes + len(data) > limits.max_blob_bytes:
        raise ProxyError(
            413,
            "quota-exceeded",
            f"this run uploaded {ctx.blob_bytes} bytes of blobs; {len(data)} more would pass this node's "
            f"limit of {limits.max_blob_bytes}",
        )
    ctx.blob_uploads += 1
    ctx.blob_bytes += len(data)
    try:
        return await ctx.rest.upload_blob(data)
    except BaseException:
        ctx.blob_uploads -= 1
        ctx.blob_bytes -= len(data)
        raise
