"""Serving the app on TCP with a deadline for request heads (vfed.common.slow_clients) and a keep-alive
timeout; what `web.run_app` did otherwise: stop on SIGINT/SIGTERM, close connections, run cleanups."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from vfed.common.slow_clients import HEAD_WATCH, HeadWatch
from vfed.server.config import LimitsSettings
from vfed.server.tls import ServerTls

log = logging.getLogger(__name__)


async def serve(
    app: web.Application,
    host: str,
    port: int,
    limits: LimitsSettings,
    tls: ServerTls | None = None,
    *,
    reuse_port: bool = False,
    on_listening: Callable[[], None] | None = None,
) -> None:
    """Listen until SIGINT or SIGTERM; OSError when the address cannot be bound. With `tls`, serve HTTPS and
    read the certificate and key again on SIGHUP (new connections get them; open ones keep theirs). With
    `reuse_port`, other processes listen on the same port and the kernel spreads connections among them
    (vfed.server.workers); `on_listening` is called once the socket accepts."""
    watch = HeadWatch(limits.head_timeout_s)
    app[HEAD_WATCH] = watch
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=limits.keepalive_timeout_s)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    server: asyncio.AbstractServer | None = None
    try:
        ssl_context = tls.listening if tls is not None else None
        server = await loop.create_server(
            watch.bind(runner), host, port, ssl=ssl_context, reuse_port=reuse_port or None
        )
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if tls is not None:
            loop.add_signal_handler(signal.SIGHUP, tls.reload)
        log.info("serving on %s://%s:%s", "https" if tls is not None else "http", host, port)
        if on_listening is not None:
            on_listening()
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if server is not None:
            server.close()
        await runner.cleanup()
        if server is not None:
            await server.wait_closed()
