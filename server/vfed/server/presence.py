"""Node presence: every authenticated node request is noted in memory and written in batches.

A login or poll then costs no database write; `last_seen_at` in the database lags by at most one flush
interval, and the API answers from memory in the meantime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from sqlalchemy import Table, bindparam, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from vfed.server.models import Node

log = logging.getLogger(__name__)
FLUSH_BATCH = 32


class Presence:
    """Last contact per node: `note` is O(1); `flush` writes what changed since the last flush."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._latest: dict[int, datetime] = {}
        self._dirty: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    def note(self, node_id: int) -> datetime:
        """Record contact now."""
        stamp = datetime.now(UTC)
        self._latest[node_id] = stamp
        self._dirty.add(node_id)
        return stamp

    def last_seen(self, node_id: int, stored: datetime | None) -> datetime | None:
        """The newer of the stored and the in-memory contact time."""
        mem = self._latest.get(node_id)
        if stored is None or (mem is not None and mem > stored):
            return mem
        return stored

    async def flush(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        """Write pending contact times in one executemany."""
        if not self._dirty:
            return
        ids, self._dirty = self._dirty, set()
        rows = [{"node_id": i, "seen": self._latest[i]} for i in ids]
        table: Table = Node.__table__  # type: ignore[assignment]
        stmt = update(table).where(table.c.id == bindparam("node_id")).values(last_seen_at=bindparam("seen"))
        async with sessions() as s:
            conn = await s.connection()
            # small batches: a long executemany in the driver thread holds the GIL and stalls requests
            for start in range(0, len(rows), FLUSH_BATCH):
                await conn.execute(stmt, rows[start : start + FLUSH_BATCH])
            await s.commit()

    async def start(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        """Flush every `interval_s` in the background."""
        self._task = asyncio.create_task(self._run(sessions), name="presence")

    async def stop(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        """Stop the loop and write what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush(sessions)

    async def _run(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush(sessions)
            except Exception:
                log.exception("writing node presence failed; will retry")
