"""Serving one run's proxy app on its own Unix socket."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from aiohttp import web

from vfed.proxy.app import ProxyContext, create_proxy_app


class ProxyServer:
    """The proxy of one run, listening on a socket only that run's container gets mounted."""

    def __init__(self, ctx: ProxyContext, socket_path: Path) -> None:
        self.ctx = ctx
        self.socket_path = socket_path
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen; the socket is world-connectable because the container user is not ours."""
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        runner = web.AppRunner(create_proxy_app(self.ctx), access_log=None, handle_signals=False)
        await runner.setup()
        await web.UnixSite(runner, str(self.socket_path)).start()
        os.chmod(self.socket_path, 0o666)
        os.chmod(self.socket_path.parent, 0o755)
        self._runner = runner

    async def stop(self) -> None:
        """Stop listening and remove the socket. Safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
