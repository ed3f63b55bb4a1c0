"""Engine, sessions and migrations: one place that knows which database we talk to."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy import event, inspect, make_url
from sqlalchemy.engine import Connection
from sqlalchemy.exc import ArgumentError, DBAPIError, InvalidRequestError, NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from vfed.server import sqlite_fast
from vfed.server.task_events import HUB, NOTIFY_ORIGIN, NotifyingSession, TaskEvents

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
    engine: AsyncEngine, events: TaskEvents | None = None, notify_origin: str | None = None
) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded objects usable after commit (handlers serialise after committing), and
    whose commits wake the waiters on tasks whose runs they changed (`events`), and with `notify_origin`
    (PostgreSQL) those of other server processes too (vfed.server.pg_events)."""
    info: dict[str, object] = {}
    if events is not None:
        info[HUB] = events
    if notify_origin is not None:
        info[NOTIFY_ORIGIN] = notify_origin
    return async_sessionmaker(
        engine,
        expire_on_commit=False,
        sync_session_class=NotifyingSession,
        info=info or None,
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


class DatabaseError(Exception):
    """The database cannot be used: a driver that is not installed, a server that does not answer, a schema
    this code does not match. The message is one line for the operator, saying what to do."""


# SQLAlchemy driver module (the `+name` of a URL, or a dialect's default) -> how to get it
_DRIVER_INSTALL = {
    "asyncpg": "pip install 'vfed[postgres]'",
    "aiosqlite": "pip install aiosqlite (a dependency of vfed: reinstall vfed)",
}
SUPPORTED = "sqlite+aiosqlite:// or postgresql+asyncpg://"


def safe_url(url: str) -> str:
    """The URL for messages: the password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<not a database URL>"


def open_engine(url: str) -> AsyncEngine:
    """make_engine, with a URL that cannot work (bad form, a driver not installed, a synchronous driver)
    refused in one line that names what to install or write instead."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"database_url is not a database URL (e.g. {SUPPORTED})") from None
    try:
        return make_engine(url)
    except NoSuchModuleError:
        raise DatabaseError(
            f"database_url {safe_url(url)}: no SQLAlchemy dialect {parsed.drivername!r} is installed; "
            f"vfed supports {SUPPORTED}"
        ) from None
    except ImportError as exc:
        module = (exc.name or str(exc)).split(".")[0]
        install = _DRIVER_INSTALL.get(module, f"pip install {module}; vfed is tested with {SUPPORTED}")
        if parsed.get_backend_name() == "postgresql" and module != "asyncpg":
            install = f"pip install {module}, or write postgresql+asyncpg:// and pip install 'vfed[postgres]'"
        raise DatabaseError(
            f"database_url {safe_url(url)}: its driver {module} is not installed ({install})"
        ) from None
    except InvalidRequestError as exc:  # "The asyncio extension requires an async driver"
        raise DatabaseError(
            f"database_url {safe_url(url)}: {parsed.get_driver_name()} is not an asyncio driver; write "
            f"{SUPPORTED} ({' '.join(str(exc).split())})"
        ) from None


def _schema_state(connection: Connection) -> tuple[str | None, bool]:
    """(the stored revision, whether any other table exists)."""
    revision = MigrationContext.configure(connection).get_current_revision()
    tables = set(inspect(connection).get_table_names()) - {"alembic_version"}
    return revision, bool(tables)


def head_revision() -> str:
    """The newest revision this code knows."""
    return str(ScriptDirectory.from_config(alembic_config()).get_current_head())


async def prepare(engine: AsyncEngine, *, upgrade_schema: bool) -> None:
    """Make sure the schema is the one this code expects before serving.

    An empty database gets the newest schema (nothing to migrate, nothing to lose). An older schema is
    migrated only when asked (`vserver start --upgrade`, `auto_migrate: true`, `vserver db upgrade`):
    migrations may take long and cannot always be undone, so they are the operator's step, run with the
    backup in hand, not a side effect of a restart. A schema newer than the code (a downgraded server) is
    refused either way. Every failure is a DatabaseError with one line.
    """
    try:
        _sqlite_opens(engine)
        async with engine.connect() as conn:
            revision, has_tables = await conn.run_sync(_schema_state)
    except (OSError, DBAPIError, TimeoutError, sqlite3.Error) as exc:
        inner = getattr(exc, "orig", None) or exc
        what = "is unreachable" if isinstance(inner, (OSError, TimeoutError)) else "cannot be used"
        raise DatabaseError(f"the database at {safe_url(str(engine.url))} {what}: {_reason(exc)}") from None
    head = head_revision()
    if revision == head:
        return
    script = ScriptDirectory.from_config(alembic_config())
    if revision is not None and _unknown(script, revision):
        raise DatabaseError(
            f"the database schema is at revision {revision}, newer than this vserver knows (up to {head}): "
            "run the vserver version that wrote it, or restore a backup"
        )
    if revision is None and has_tables:
        raise DatabaseError(
            "the database has tables but no vfed schema revision (alembic_version): point database_url at "
            "a vfed database or an empty one"
        )
    if revision is not None and not upgrade_schema:
        raise DatabaseError(
            f"the database schema is at revision {revision}, this vserver needs {head}: run `vserver db "
            "upgrade` (after a backup: `vserver backup`), or start with `vserver start --upgrade`"
        )
    try:
        await upgrade(engine)
    except (OSError, DBAPIError, TimeoutError) as exc:
        raise DatabaseError(
            f"migrating the database schema from revision {revision or '(empty)'} to {head} failed: "
            f"{_reason(exc)}"
        ) from None


def _sqlite_opens(engine: AsyncEngine) -> None:
    """Open a SQLite database once synchronously: a file that cannot be opened fails here, not in aiosqlite's
    worker thread (which, failing, answers a future of the event loop after `asyncio.run` closed it and prints
    a traceback)."""
    if engine.url.get_backend_name() != "sqlite":
        return
    args, params = engine.url.get_dialect()().create_connect_args(engine.url)
    database = args[0] if args else ":memory:"
    sqlite3.connect(database, uri=bool(params.get("uri")), timeout=1).close()


def _unknown(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is None
    except (CommandError, RevisionError):
        return True


def _reason(exc: BaseException) -> str:
    """A driver's error on one line, without the SQLAlchemy boilerplate around it."""
    inner = getattr(exc, "orig", None) or exc
    text = " ".join(str(inner).split()) or type(inner).__name__
    return text[:300]
