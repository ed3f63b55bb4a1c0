"""Serving one run's proxy app on its own Unix socket, with a deadline for request heads (slow_clients.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from aiohttp import web

from vfed.common.slow_clients import HEAD_WATCH, HeadWatch
from vfed.proxy.app import ProxyContext, create_proxy_app


class ProxyServer:
    """The proxy of one run, listening on a socket only that run's container gets mounted."""

    def __init__(self, ctx: ProxyContext, socket_path: Path) -> None:
        self.ctx = ctx
        self.socket_path = socket_path
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self.watch = HeadWatch(ctx.limits.head_timeout_s)

    async def start(self) -> None:
        """Listen; the socket is world-connectable because the container user is not ours."""
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        app = create_proxy_app(self.ctx)
        app[HEAD_WATCH] = self.watch
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=self.ctx.limits.keepalive_timeout_s,
        )
        await runner.setup()
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_unix_server(self.watch.bind(runner), str(self.socket_path))
        except BaseException:
            await runner.cleanup()
            raise
        os.chmod(self.socket_path, 0o666)
        os.chmod(self.socket_path.parent, 0o755)
        self._runner = runner

    async def stop(self) -> None:
        """Stop listening and remove the socket. Safe to call twice."""
        runner, self._runner = self._runner, None
        server, self._server = self._server, None
        if server is not None:
            server.close()  # no new connections; the runner's cleanup closes the open ones
        if runner is not None:
            await runner.cleanup()
        if server is not None:
            await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
