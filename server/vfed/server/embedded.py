"""An embedded MQTT broker (amqtt) on loopback, so one `vserver start` is enough on one machine.

The broker runs in a child process: its per-message work then uses another core instead of the API's event
loop (in-process it cost the API ~1 ms per doorbell message here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

log = logging.getLogger(__name__)


class EmbeddedBroker:
    """Anonymous, loopback-only broker: nothing secret travels over the doorbell."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self, timeout_s: float = 30) -> None:
        """Start the child and wait until it says it listens (it prints `ready` after binding)."""
        code = f"from vfed.server.embedded import serve; serve({self.host!r}, {self.port})"
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
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


async def _serve(host: str, port: int) -> None:
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await broker.shutdown()


def serve(host: str, port: int) -> None:
    """Child-process entry point: run the broker until terminated."""
    import signal

    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        try:
            asyncio.run(_serve(host, port))
        except Exception as exc:  # one clear line for the operator, not a traceback
            print(f"embedded MQTT broker: {exc}", file=sys.stderr, flush=True)
            sys.exit(1)
