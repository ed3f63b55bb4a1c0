"""A TCP proxy in front of a real server that breaks blob downloads on demand.

The real server does not break a transfer when a test asks it to, so this stands in for the network in
between: it forwards every byte both ways, and for the next blob download(s) it either closes the
connection (`cut`) or stops forwarding (`stall`) once `after_bytes` of the answer went through. It records
the request head of every blob download, so a test sees the Range each one asked for.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

BLOB_GET = b"GET /api/v1/blobs/"
HEAD_END = b"\r\n\r\n"


@dataclass
class BreakingProxy:
    upstream_host: str
    upstream_port: int
    mode: str = "pass"  # "pass", "cut" or "stall"
    after_bytes: int = 0
    breaks: int = 0  # how many blob downloads to break from now on
    blob_requests: list[str] = field(default_factory=list)
    body_forwarded: int = 0  # body bytes of the last broken answer that went through
    stalled: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _pipes: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def ranges(self) -> list[str | None]:
        """The Range header of every blob download seen, None where it had none."""
        found = [re.search(r"(?im)^range: *(.+?)\r?$", head) for head in self.blob_requests]
        return [m.group(1) if m else None for m in found]

    def break_next(self, mode: str, after_bytes: int, times: int = 1) -> None:
        self.mode, self.after_bytes, self.breaks = mode, after_bytes, times
        self.stalled.clear()

    async def __aenter__(self) -> BreakingProxy:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        budget: list[int | None] = [None]  # answer bytes left before the break, None: no break armed
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._requests(reader, up_writer, budget))
                group.create_task(self._answers(up_reader, writer, budget))
        except* (ConnectionError, _Broken):
            pass
        finally:
            for end in (writer, up_writer):
                end.transport.abort()
            self._pipes.discard(task)

    async def _requests(
        self, reader: asyncio.StreamReader, up: asyncio.StreamWriter, budget: list[int | None]
    ) -> None:
        while data := await reader.read(1 << 16):
            if BLOB_GET in data:
                self.blob_requests.append(data.split(HEAD_END, 1)[0].decode("latin-1"))
                if self.mode != "pass" and self.breaks > 0:
                    self.breaks -= 1
                    budget[0] = self.after_bytes  # armed before the request goes on: its answer counts
            up.write(data)
            await up.drain()
        raise _Broken

    async def _answers(
        self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, budget: list[int | None]
    ) -> None:
        head = bytearray()
        while data := await up.read(1 << 16):
            left = budget[0]
            if left is not None:
                if len(head) < 1 << 16:
                    head += data
                if len(data) >= left:
                    writer.write(data[:left])
                    await writer.drain()
                    self.body_forwarded = self.after_bytes - (head.index(HEAD_END) + len(HEAD_END))
                    await self._break()
                budget[0] = left - len(data)
            writer.write(data)
            await writer.drain()
        raise _Broken

    async def _break(self) -> None:
        if self.mode == "stall":
            self.stalled.set()
            await asyncio.Event().wait()  # held until the client gives up or the proxy closes
        raise _Broken


class _Broken(Exception):
    """This connection ends here (a cut, the end of a stall, or one side closed)."""
