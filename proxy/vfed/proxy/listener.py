"""One TCP listener for the proxies of runs that reach their node over a network (Kubernetes pods).

A Docker run gets a Unix socket of its own, so the socket names the caller. A pod cannot: it reaches the
agent through a Service, and the agent cannot tell one pod's connection from another's. Each run therefore
holds a token of its own (32 random bytes, made by the agent, given to the run's pod only), and each
connection is handed to the proxy of the run whose token its first request carries. Until then the listener
reads the request's head only (at most MAX_HEAD_BYTES, within the head timeout) and answers anything else
with 401 and a JSON reason, the same for a missing, malformed, unknown or expired token.

The hand-over uses asyncio's public `transport.set_protocol`: from then on the run's own aiohttp server (with
its head deadline and limits) has the connection, exactly as a connection to its Unix socket. Its app checks
the token again on every request of the connection (`token_middleware`), so a keep-alive connection cannot
change runs. Tokens are kept as SHA-256 digests and compared with `hmac.compare_digest`; they are never
logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import SecretStr

from vfed.common.api.errors import ErrorDocument, error_response

log = logging.getLogger(__name__)

TOKEN_BYTES = 32
MAX_HEAD_BYTES = 16 * 1024
"""A request head longer than this is refused before any run is looked up (aiohttp's own limit is 8 KiB a
line)."""
UNAUTHORIZED_DETAIL = "this proxy answers a run's requests only, with its token (Authorization: Bearer ...)"

ProtocolFactory = Callable[[], asyncio.Protocol]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def new_token() -> SecretStr:
    """A run's proxy token: 32 random bytes, URL-safe base64 (43 characters)."""
    return SecretStr(secrets.token_urlsafe(TOKEN_BYTES))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def token_matches(given: str | None, digest: bytes) -> bool:
    """Whether a presented token is the one whose digest this is (constant time in the token)."""
    return given is not None and hmac.compare_digest(_digest(given), digest)


def bearer_token(value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value; None for any other value."""
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token and " " not in token else None


def unauthorized_body() -> bytes:
    return json.dumps(ErrorDocument(error="unauthorized", detail=UNAUTHORIZED_DETAIL).model_dump()).encode()


def token_middleware(token: SecretStr) -> Middleware:
    """Every request of a run's proxy app carries the run's token (a keep-alive connection cannot change
    runs after the listener handed it over)."""
    digest = _digest(token.get_secret_value())

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not token_matches(bearer_token(request.headers.get("Authorization")), digest):
            response = error_response(
                401, "unauthorized", UNAUTHORIZED_DETAIL, {"WWW-Authenticate": "Bearer"}
            )
            response.force_close()
            return response
        return await handler(request)

    return middleware


@dataclass
class ListenerStats:
    """What the listener refused, by why (never by token)."""

    refused: dict[str, int] = field(default_factory=dict)
    handed_over: int = 0

    def refuse(self, why: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1


class ProxyListener:
    """The TCP endpoint of every network-reached run's proxy; `register` one run's protocol factory under its
    token while the run's proxy serves, `unregister` it when the run ends."""

    def __init__(self, host: str, port: int, *, head_timeout_s: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.head_timeout_s = head_timeout_s
        self._routes: dict[bytes, ProtocolFactory] = {}
        self._server: asyncio.Server | None = None
        self.stats = ListenerStats()

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the port the system chose when `port` was 0)."""
        if self._server is None or not self._server.sockets:
            return self.host, self.port
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: TokenRouter(self), self.host, self.port)
        log.info("run proxy listener on %s:%d", *self.address)

    async def stop(self) -> None:
        server, self._server = self._server, None
        self._routes.clear()
        if server is not None:
            server.close()
            await server.wait_closed()

    async def __aenter__(self) -> ProxyListener:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def register(self, token: SecretStr, factory: ProtocolFactory) -> None:
        """Route connections whose first request carries `token` to `factory`'s protocol."""
        digest = _digest(token.get_secret_value())
        if digest in self._routes:
            raise ValueError("this token is registered already")
        self._routes[digest] = factory

    def unregister(self, token: SecretStr) -> None:
        """The run ended: its token opens nothing any more (connections already handed over are its
        server's, which closes them when it stops)."""
        self._routes.pop(_digest(token.get_secret_value()), None)

    def route(self, given: str | None) -> ProtocolFactory | None:
        """The factory for a presented token, or None."""
        if given is None:
            return None
        digest = _digest(given)
        for known, factory in list(self._routes.items()):
            if hmac.compare_digest(known, digest):
                return factory
        return None

    @property
    def runs(self) -> int:
        return len(self._routes)


class TokenRouter(asyncio.Protocol):
    """One new connection: reads its first request's head, then hands the connection to the run its token
    names, or answers 401 and closes."""

    def __init__(self, listener: ProxyListener) -> None:
        self._listener = listener
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._listener.head_timeout_s, self._expire)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end > MAX_HEAD_BYTES or (end < 0 and len(self._buffer) > MAX_HEAD_BYTES):
            self._refuse("head-too-large")
            return
        if end < 0:
            return
        head = bytes(self._buffer[:end])
        factory = self._listener.route(_authorization(head))
        if factory is None:
            self._refuse("bad-token")
            return
        self._hand_over(factory)

    def eof_received(self) -> bool | None:
        self._finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def _hand_over(self, factory: ProtocolFactory) -> None:
        assert self._transport is not None
        self._finish()
        inner = factory()
        transport = self._transport
        transport.set_protocol(inner)
        inner.connection_made(transport)
        data, self._buffer = bytes(self._buffer), bytearray()
        self._listener.stats.handed_over += 1
        inner.data_received(data)

    def _refuse(self, why: str) -> None:
        self._finish()
        self._listener.stats.refuse(why)
        # debug: a run's algorithm could otherwise fill the agent's log with refused connections
        log.debug("run proxy listener: refused a connection (%s)", why)
        body = unauthorized_body()
        head = (
            "HTTP/1.1 401 Unauthorized\r\n"
            "Content-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            'WWW-Authenticate: Bearer realm="vfed-proxy"\r\n'
            "Connection: close\r\n\r\n"
        )
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(head.encode("ascii") + body)
            self._transport.close()

    def _expire(self) -> None:
        self._timer = None
        if self._done or self._transport is None:
            return
        self._finish()
        self._listener.stats.refuse("head-timeout")
        self._transport.close()

    def _finish(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _authorization(head: bytes) -> str | None:
    """The bearer token of a request head's Authorization header (the first one), else None."""
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"authorization":
            return bearer_token(value.decode("latin-1"))
    return None
