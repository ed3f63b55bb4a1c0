"""What a run sets up beside its checks, so the start waits only for what it needs and a refusal takes down
exactly what was made."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from vfed.node import ahead
from vfed.node.runtime.base import INPUT_NAME, Runtime
from vfed.proxy.server import ProxyServer


@dataclass
class RunSetup:
    """What a run sets up beside its checks: its journal entry, the image lookup, its job folder and proxy."""

    journaled: asyncio.Future[None]
    digest: asyncio.Future[str]
    volume: asyncio.Future[str]
    runtime: Runtime
    proxy: asyncio.Future[ProxyServer] | None = None
    creating: asyncio.Future[ahead.Ahead | None] | None = None
    created: ahead.Ahead | None = None

    async def ready(self) -> ProxyServer:
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


def fresh_run_dir(run_dir: Path) -> None:
    """A fresh, private run folder (0700), made before the container. The runtime hands it to the container's
    user when the run starts (vfed.node.runtime.docker_spec.grant_container_user): as root by chown, keeping
    0700; an agent that is not root cannot chown and opens it to 0777 instead, inside its 0700 data folder."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    run_dir.mkdir(mode=0o700)
    os.chmod(run_dir, 0o700)  # whatever the umask


def write_input(run_dir: Path, plaintext: bytes) -> None:
    """The decrypted input, 0600 from its first byte (created with that mode, never a link followed), so no
    other user of the host reads it even for an instant; the start hands it to the container's user."""
    fd = os.open(
        run_dir / INPUT_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # whatever the umask
        handle.write(plaintext)
