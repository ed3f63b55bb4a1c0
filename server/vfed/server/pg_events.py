"""Cross-process wake-ups on PostgreSQL: LISTEN/NOTIFY carries "these tasks' runs changed" between server
processes (the workers of one `vserver start --workers N`, or servers on several machines sharing a database).

The sending half is in task_events: a session that changed runs queues `pg_notify` in its own transaction,
so PostgreSQL delivers the notice when, and only if, the change commits. The receiving half is here: one
connection per process, outside the pool, LISTENs and wakes this process's waiters on the tasks named. The
notice a process sent itself is skipped (its waiters were woken by the commit hook already).

Notices are a shortcut, never the truth, like the in-process events: a waiter still re-reads the database
every `task_wait_recheck_s`. When the listening connection is lost, every waiter is woken once it is back
(a notice sent meanwhile was not received), and the connection is re-made with jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import make_url

if TYPE_CHECKING:
    from vfed.server.task_events import TaskEvents

log = logging.getLogger(__name__)
CHANNEL = "vfed_task_changes"
PAYLOAD_MAX = 7000  # PostgreSQL refuses payloads of 8000 bytes and more
HEALTH_S = 10.0  # how often an idle listening connection is checked


def new_origin() -> str:
    """This process's name in its notices (random: pids repeat across machines)."""
    return secrets.token_hex(6)


def payloads(origin: str, task_ids: Iterable[int]) -> list[str]:
    """The notices for these tasks, each under PostgreSQL's payload limit."""
    out: list[str] = []
    chunk: list[int] = []
    size = 0
    for task_id in sorted(set(task_ids)):
        text = str(task_id)
        if chunk and size + len(text) + 1 > PAYLOAD_MAX:
            out.append(json.dumps({"o": origin, "t": chunk}, separators=(",", ":")))
            chunk, size = [], 0
        chunk.append(task_id)
        size += len(text) + 1
    if chunk:
        out.append(json.dumps({"o": origin, "t": chunk}, separators=(",", ":")))
    return out


def parse(payload: str) -> tuple[str, list[int]] | None:
    """(origin, task ids) of a notice; None for anything else on the channel (ignored, logged)."""
    try:
        data = json.loads(payload)
        origin, ids = data["o"], data["t"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(origin, str) or not isinstance(ids, list):
        return None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return None
    return origin, ids


def asyncpg_dsn(url: str) -> str:
    """The libpq-style DSN asyncpg takes, from the server's SQLAlchemy URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class PgEvents:
    """The listening half; `start` returns at once and connects in the background."""

    def __init__(self, url: str, hub: TaskEvents, origin: str) -> None:
        self.dsn = asyncpg_dsn(url)
        self.hub = hub
        self.origin = origin
        self.listening = asyncio.Event()
        self.received = 0  # notices from other processes (tests and metrics read it)
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pg-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _on_notice(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        notice = parse(payload)
        if notice is None:
            log.warning("ignored a notice on %s that is not a vfed task change", CHANNEL)
            return
        origin, ids = notice
        if origin == self.origin:
            return
        self.received += 1
        self.hub.notify(set(ids))

    def _on_lost(self, _conn: Any) -> None:
        self._lost.set()

    async def _run(self) -> None:
        import asyncpg  # type: ignore[import-untyped]  # present whenever the database is PostgreSQL

        delay_s = 0.5
        while True:
            conn: Any = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=10)
                self._lost.clear()
                conn.add_termination_listener(self._on_lost)
                await conn.add_listener(CHANNEL, self._on_notice)
                self.listening.set()
                delay_s = 0.5
                self.hub.notify_all()  # whatever was sent while nobody listened: look again
                await self._watch(conn)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("listening for task changes on PostgreSQL failed (%s); retrying", exc)
            finally:
                self.listening.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=2))
            await asyncio.sleep(delay_s * (0.5 + random.random()))
            delay_s = min(delay_s * 2, 30.0)

    async def _watch(self, conn: Any) -> None:
        """Until the connection is lost: a server that went away without a word shows at the next check."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), HEALTH_S)
            if self._lost.is_set():
                return
            await conn.fetchval("SELECT 1", timeout=10)
