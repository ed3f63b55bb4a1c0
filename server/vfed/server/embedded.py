"""An embedded MQTT broker (amqtt) on loopback, so one `vserver start` is enough on one machine.

The broker runs in a child process: its per-message work then uses another core instead of the API's event
loop (in-process it cost the API ~1 ms per doorbell message here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class EmbeddedBroker:
    """Loopback-only broker; with `folder`, the same password and ACL files as a Mosquitto configured by
    `vserver broker config` (vfed.server.embedded_auth), else anonymous."""

    def __init__(self, host: str, port: int, folder: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.folder = folder
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self, timeout_s: float = 30) -> None:
        """Start the child and wait until it says it listens (it prints `ready` after binding)."""
        folder = str(self.folder) if self.folder is not None else None
        code = f"from vfed.server.embedded import serve; serve({self.host!r}, {self.port}, {folder!r})"
        # Its standard input is a pipe this process holds open: when the server dies, however it dies, the
        # broker reads end-of-file and exits with it instead of keeping the port.
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert self._proc.stdout is not None
        async with asyncio.timeout(timeout_s):
            line = await self._proc.stdout.readline()
        if line.strip() != b"ready":
            await self.stop()
            raise RuntimeError("the embedded MQTT broker did not start (see its log above)")
        log.info("embedded MQTT broker on %s (pid %s)", self.url, self._proc.pid)

    async def stop(self) -> None:
        """Terminate the child."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 10)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        self._proc = None


async def start_embedded(port: int, folder: Path | None) -> EmbeddedBroker | None:
    """The embedded broker on loopback, or None (logged) when it cannot start: the server serves on without
    a doorbell and nodes poll."""
    broker = EmbeddedBroker("127.0.0.1", port, folder)
    try:
        await broker.start()
    except (RuntimeError, TimeoutError, OSError) as exc:
        log.error(
            "embedded MQTT broker could not start on 127.0.0.1:%s (%s; port in use?): no doorbell, "
            "nodes will poll. Set mqtt.embedded_port or mqtt.url.",
            port,
            exc,
        )
        await broker.stop()
        return None
    return broker


async def _serve(host: str, port: int, folder: str | None) -> None:
    from amqtt.broker import Broker

    plugins: dict[str, dict[str, object]] = {
        "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
    }
    if folder is not None:
        plugins = {
            "vfed.server.embedded_auth.PasswordFileAuth": {"folder": folder},
            "vfed.server.embedded_auth.AclTopicCheck": {"folder": folder},
        }
    config = {"listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}}, "plugins": plugins}
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        await broker.shutdown()


def _exit_with_parent() -> None:
    """Standard input ends when the server that started this broker is gone: end too (as on SIGTERM)."""
    with contextlib.suppress(OSError):
        while os.read(0, 4096):  # the raw descriptor: a buffered reader's lock would block interpreter exit
            pass
    os.kill(os.getpid(), signal.SIGTERM)


def serve(host: str, port: int, folder: str | None = None) -> None:
    """Child-process entry point: run the broker until terminated, or until its parent is gone."""
    logging.basicConfig(level=logging.WARNING)
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        try:
            asyncio.run(_serve(host, port, folder))
        except Exception as exc:  # one clear line for the operator, not a traceback
            print(f"embedded MQTT broker: {exc}", file=sys.stderr, flush=True)
            sys.exit(1)
