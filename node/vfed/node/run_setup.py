"""What a run sets up beside its checks, so the start waits only for what it needs and a refusal takes down
exactly what was made."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from vfed.node import ahead
from vfed.node.runtime.base import Runtime
from vfed.proxy.server import ProxyServer


@dataclass
class RunSetup:
    """What a run sets up beside its checks: its journal entry, the image lookup, its job folder and proxy."""

    journaled: asyncio.Future[None]
    digest: asyncio.Future[str]
    volume: asyncio.Future[str]
    runtime: Runtime
    proxy: asyncio.Future[ProxyServer | None] | None = None
    creating: asyncio.Future[ahead.Ahead | None] | None = None
    created: ahead.Ahead | None = None

    async def ready(self) -> ProxyServer | None:
        await self.journaled  # no container before its run is in the journal
        # A job folder that failed here is tried again, with the start's own retries, when the run starts.
        with contextlib.suppress(Exception):
            await self.volume
        if self.creating is not None:
            self.created = await self.creating
        assert self.proxy is not None, "the proxy starts once the input is decrypted"
        return await self.proxy

    async def undo(self) -> None:
        """After a refusal: remove the container made ahead and stop the proxy; the job folder goes with the
        job's last run (the finisher)."""
        await asyncio.gather(self.journaled, self.digest, self.volume, return_exceptions=True)
        if self.creating is not None:
            (early,) = await asyncio.gather(self.creating, return_exceptions=True)
            if isinstance(early, ahead.Ahead):
                await ahead.discard(self.runtime, early)
        if self.proxy is not None:
            (proxy,) = await asyncio.gather(self.proxy, return_exceptions=True)
            if isinstance(proxy, ProxyServer):
                await proxy.stop()
