"""Engine, sessions and migrations: one place that knows which database we talk to."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, make_url
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from vfed.server import sqlite_fast
from vfed.server.task_events import HUB, NotifyingSession, TaskEvents

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str) -> AsyncEngine:
    """Create the engine; SQLite gets foreign keys, WAL and a busy timeout so writers queue, not fail."""
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30}
    parsed = make_url(url)
    if parsed.drivername == "sqlite+aiosqlite":
        # one worker-thread hand-off per statement instead of three or four (see sqlite_fast)
        args, params = parsed.get_dialect()().create_connect_args(parsed)
        params["timeout"] = 30

        async def creator() -> Any:
            return await sqlite_fast.connect(*args, **params)

        kwargs = {"async_creator": creator}
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    wal = (cur.fetchone() or [""])[0] == "wal"
    driver = getattr(dbapi_conn, "_connection", None)
    if isinstance(driver, sqlite_fast.FastConnection):
        driver.reads_in_loop = wal  # WAL readers never wait for a lock
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_sessionmaker(
    engine: AsyncEngine, events: TaskEvents | None = None
) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded objects usable after commit (handlers serialise after committing), and
    whose commits wake the waiters on tasks whose runs they changed (`events`)."""
    return async_sessionmaker(
        engine,
        expire_on_commit=False,
        sync_session_class=NotifyingSession,
        info={HUB: events} if events is not None else None,
    )


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config pointing at our migrations, optionally bound to an open connection."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: Connection, revision: str) -> None:
    command.upgrade(alembic_config(connection), revision)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema to `revision` (idempotent)."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade, revision)
    log.info("database schema at %s", revision)
