"""Serving one run's proxy app, with a deadline for request heads (slow_clients.py): on its own Unix socket
(Docker runs), or behind the agent's TCP listener under the run's token (runs in a cluster, listener.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from aiohttp import web
from pydantic import SecretStr

from vfed.common.slow_clients import HEAD_WATCH, HeadWatch
from vfed.proxy.app import ProxyContext, create_proxy_app
from vfed.proxy.listener import ProxyListener

# A Unix socket's address holds at most 107 bytes of path (sun_path is 108 with the NUL); a node whose data
# folder lies deep (a long home, a mounted volume) would otherwise fail every run: "AF_UNIX path too long".
SUN_PATH_MAX = 107


@contextlib.contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """An address bind() and connect() accept for the socket at `path`: the path itself, or, when it is too
    long, the same name reached through a descriptor of its folder (`/proc/self/fd/N/name`), which the kernel
    resolves like the path. Bind or connect inside the block: the descriptor is closed after it."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield str(path)
        return
    folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)


class ProxyServer:
    """The proxy of one run: listening on a socket only that run's container gets mounted, or (with
    `listener` and `token`) reached through the shared listener by the run's token alone."""

    def __init__(
        self,
        ctx: ProxyContext,
        socket_path: Path | None = None,
        *,
        listener: ProxyListener | None = None,
        token: SecretStr | None = None,
    ) -> None:
        if (socket_path is None) == (listener is None) or (listener is None) != (token is None):
            raise ValueError("a run's proxy has either a socket path, or a listener and a token")
        self.ctx = ctx
        self.socket_path = socket_path
        self.listener = listener
        self.token = token
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self.watch = HeadWatch(ctx.limits.head_timeout_s)

    async def start(self) -> None:
        """Listen; the socket is world-connectable because the container user is not ours."""
        app = create_proxy_app(self.ctx, token=self.token)
        app[HEAD_WATCH] = self.watch
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=self.ctx.limits.keepalive_timeout_s,
        )
        await runner.setup()
        try:
            if self.listener is not None:
                assert self.token is not None
                self.listener.register(self.token, self.watch.bind(runner))
            else:
                await self._listen_on_socket(runner)
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def _listen_on_socket(self, runner: web.AppRunner) -> None:
        assert self.socket_path is not None
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        loop = asyncio.get_running_loop()
        with unix_address(self.socket_path) as address:
            self._server = await loop.create_unix_server(self.watch.bind(runner), address)
        os.chmod(self.socket_path, 0o666)
        os.chmod(self.socket_path.parent, 0o755)

    async def stop(self) -> None:
        """Stop listening (the token opens nothing any more) and remove the socket. Safe to call twice."""
        runner, self._runner = self._runner, None
        server, self._server = self._server, None
        if self.listener is not None and self.token is not None and runner is not None:
            self.listener.unregister(self.token)
        if server is not None:
            server.close()  # no new connections; the runner's cleanup closes the open ones
        if runner is not None:
            await runner.cleanup()
        if server is not None:
            await server.wait_closed()
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
