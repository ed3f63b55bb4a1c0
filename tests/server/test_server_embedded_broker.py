"""The embedded MQTT broker (a child process of `vserver start`) ends with the server however the server
ends, so a crashed or killed server never leaves a broker holding its port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys

import psutil
from tests import infra

STARTER = """
import asyncio, sys
from vfed.server.embedded import EmbeddedBroker

async def main():
    broker = EmbeddedBroker("127.0.0.1", int(sys.argv[1]))
    await broker.start()
    print(broker._proc.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_a_killed_server_takes_its_broker_with_it() -> None:
    port = infra.free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(port)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert server.stdout is not None
        broker = psutil.Process(int(server.stdout.readline()))
        assert broker.is_running() and broker.ppid() == server.pid
        os.kill(server.pid, signal.SIGKILL)  # no clean-up code of the server runs
        server.wait(10)
        broker.wait(10)  # psutil.TimeoutExpired if the broker outlived its server
        assert not broker.is_running()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
    with socket.socket() as again:  # the port is free for the next server
        again.bind(("127.0.0.1", port))
