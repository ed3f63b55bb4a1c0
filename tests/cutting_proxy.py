"""A TCP proxy on loopback that breaks transfers on purpose: what a flaky link does to a download.

Each connection is forwarded both ways; for the first `cuts` connections, the server-to-client direction is
closed after `after_bytes` bytes (the client sees the response end mid-body), or with `upload=True` the
client-to-server direction (the server sees the request body end mid-way). The client-to-server bytes of
every connection are kept (`requests`), so a test can see which Range or offset each attempt asked for and
how many bytes went up in all.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class CuttingProxy:
    def __init__(self, target_port: int, after_bytes: int, cuts: int, upload: bool = False) -> None:
        self.target_port = target_port
        self.upload = upload
        self.after_bytes = after_bytes
        self.cuts = cuts
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        index = len(self.requests)
        self.requests.append(b"")
        limit = self.after_bytes if index < self.cuts else None
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        up, down = (limit, None) if self.upload else (None, limit)
        pumps = {
            asyncio.create_task(self._pump(reader, up_writer, index, up)),
            asyncio.create_task(self._pump(up_reader, writer, None, down)),
        }
        try:
            _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            for pump in pending:  # one direction broke (or was cut): the connection is over
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            for w in (writer, up_writer):
                w.close()
            self._tasks.discard(task)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: int | None, limit: int | None
    ) -> None:
        sent = 0
        while data := await src.read(65536):
            if record is not None:
                self.requests[record] += data[: None if limit is None else max(limit - sent, 0)]
            if limit is not None and sent + len(data) >= limit:
                dst.write(data[: limit - sent])
                with contextlib.suppress(ConnectionError):
                    await dst.drain()
                dst.transport.abort()  # the link breaks mid-body
                raise ConnectionResetError("cut")
            dst.write(data)
            await dst.drain()
            sent += len(data)
        if dst.can_write_eof():
            dst.write_eof()


@contextlib.asynccontextmanager
async def cutting_proxy(
    target_port: int, after_bytes: int, cuts: int, upload: bool = False
) -> AsyncIterator[CuttingProxy]:
    proxy = CuttingProxy(target_port, after_bytes, cuts, upload)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
