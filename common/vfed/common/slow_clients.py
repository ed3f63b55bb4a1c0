"""A deadline for a request's head on aiohttp servers (the server's and each run's proxy), which have none.

aiohttp (3.x) calls no handler until a request's head is parsed, and has no timeout for reading it: only
`keepalive_timeout`, counted from the connection's opening or the previous response, which also governs idle
keep-alive connections and so cannot be short. A client that sends its headers one byte a second holds a
connection, a file descriptor and a parser for that long.

`HeadDeadline` sits between the event loop and aiohttp's protocol (`web.Server`, which `AppRunner.server`
exposes, is a public asyncio protocol factory): it forwards every asyncio `Protocol` call unchanged and closes
the connection when a request's handler has not started within `head_timeout_s` of the request's first byte
(or of the connection's opening). `head_middleware` tells it when a handler starts and ends, so the time a
handler takes (a long poll, a large upload) is never counted. Only asyncio's Protocol interface and an
ordinary middleware are used: nothing of aiohttp's internals, so an upgrade cannot break it silently. Slow
bodies are the handlers' business (they read with their own timeouts).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HeadWatch:
    """The protocol factory: wraps each connection aiohttp's factory makes; counts the connections it cut."""

    def __init__(self, head_timeout_s: float) -> None:
        self._factory: Callable[[], asyncio.Protocol] | None = None
        self.head_timeout_s = head_timeout_s
        self._connections: dict[int, HeadDeadline] = {}  # by id() of the transport a request shows
        self.cut = 0

    def bind(self, runner: web.BaseRunner) -> HeadWatch:
        """Wrap the runner's protocol factory (after `runner.setup()`); returns self, the factory to serve."""
        if runner.server is None:
            raise RuntimeError("bind the head watch after runner.setup()")
        self._factory = runner.server
        return self

    def __call__(self) -> HeadDeadline:
        assert self._factory is not None, "HeadWatch.bind(runner) first"
        return HeadDeadline(self, self._factory())

    def handler_started(self, transport: object) -> None:
        connection = self._connections.get(id(transport))
        if connection is not None:
            connection.busy()

    def handler_done(self, transport: object) -> None:
        connection = self._connections.get(id(transport))
        if connection is not None:
            connection.idle()


class HeadDeadline(asyncio.Protocol):
    """One connection: waiting for a head (deadline armed), busy in a handler, or idle between requests."""

    def __init__(self, watch: HeadWatch, inner: asyncio.Protocol) -> None:
        self._watch = watch
        self._inner = inner
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._watch._connections[id(transport)] = self
        self._arm()  # a connection that never completes a head is cut as well
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._busy and self._timer is None:
            self._arm()  # the first byte of the next request
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._transport is not None:
            self._watch._connections.pop(id(self._transport), None)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def busy(self) -> None:
        self._busy = True
        self._disarm()

    def idle(self) -> None:
        self._busy = False

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._watch.head_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._busy or self._transport is None or self._transport.is_closing():
            return
        self._watch.cut += 1
        log.info("closed a connection whose request head took over %.1f s", self._watch.head_timeout_s)
        self._transport.close()


HEAD_WATCH = web.AppKey("head_watch", HeadWatch)


@web.middleware
async def head_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Mark the connection busy while a handler runs (outermost middleware, so nothing else is counted)."""
    watch = request.app.get(HEAD_WATCH)
    if watch is None:
        return await handler(request)
    transport = request.transport
    watch.handler_started(transport)
    try:
        return await handler(request)
    finally:
        watch.handler_done(transport)
