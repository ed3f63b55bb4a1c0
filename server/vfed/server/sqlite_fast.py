"""aiosqlite with one thread hand-off per statement, for SQLAlchemy's aiosqlite dialect.

SQLAlchemy drives aiosqlite cursor by cursor: create, execute, fetch, close, each a round trip to the
connection's worker thread (~1 ms apiece on a busy 2-core machine), plus a rollback when a connection
goes back to the pool. Here a cursor runs execute + fetch + close in one worker call, and commit or
rollback with no transaction open costs nothing. On a WAL database a SELECT never waits for a lock, and
neither does a statement of a transaction that already wrote (it holds the write lock: the driver opens a
transaction only in front of its first write), so those run right on the event loop (tens of microseconds)
with no hand-off. A transaction's first write (or DDL, or a PRAGMA outside a transaction) may wait for the
write lock: it is tried on the loop with a zero busy timeout, and only if the lock is taken right now is the
transaction rolled back (it holds nothing yet) and the statement run in the worker thread, where it waits.
Commit, which may checkpoint and so wait for the disk, always runs in the worker thread. A busy database
never blocks the loop; statements and their results are unchanged.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import aiosqlite

_Result = tuple[Any, int, int | None, list[Any]]
_BUSY = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def _run(conn: sqlite3.Connection, many: bool, sql: str, params: Any) -> _Result:
    """In the worker thread: the whole statement, its rows read and its cursor closed."""
    cur = conn.executemany(sql, params) if many else conn.execute(sql, params)
    try:
        rows = cur.fetchall() if cur.description else []
        return cur.description, cur.rowcount, cur.lastrowid, rows
    finally:
        cur.close()


def _try_without_waiting(conn: sqlite3.Connection, sql: str, params: Any, timeout_ms: int) -> _Result | None:
    """A transaction's first write, on the loop, if the write lock is free right now; None when it is not
    (the transaction is rolled back, holding nothing yet, and the caller retries in the worker thread)."""
    conn.execute("PRAGMA busy_timeout=0")
    try:
        return _run(conn, False, sql, params)
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in _BUSY:
            raise
        conn.rollback()
        return None
    finally:
        conn.execute(f"PRAGMA busy_timeout={timeout_ms}")


class FastCursor:
    """The part of aiosqlite's cursor that SQLAlchemy uses, with results already in memory."""

    arraysize = 1

    def __init__(self, conn: FastConnection) -> None:
        self._conn = conn
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self._rows: list[Any] = []

    async def __aenter__(self) -> FastCursor:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def _call(self, many: bool, sql: str, params: Any) -> FastCursor:
        result: _Result | None = None
        conn = self._conn
        if not many and conn.in_loop(sql):
            result = _run(conn._conn, False, sql, params)
        elif not many and conn.reads_in_loop:
            result = _try_without_waiting(conn._conn, sql, params, conn.busy_timeout_ms)
        if result is None:
            result = await conn._execute(_run, conn._conn, many, sql, params)  # type: ignore[no-untyped-call]
        self.description, self.rowcount, self.lastrowid, self._rows = result
        return self

    async def execute(self, sql: str, parameters: Any = None) -> FastCursor:
        return await self._call(False, sql, () if parameters is None else parameters)

    async def executemany(self, sql: str, parameters: Any) -> FastCursor:
        return await self._call(True, sql, parameters)

    async def fetchall(self) -> list[Any]:
        rows, self._rows = self._rows, []
        return rows

    async def fetchone(self) -> Any:
        return self._rows.pop(0) if self._rows else None

    async def fetchmany(self, size: int | None = None) -> Sequence[Any]:
        n = self.arraysize if size is None else size
        rows, self._rows = self._rows[:n], self._rows[n:]
        return rows

    async def close(self) -> None:
        self._rows = []


class FastConnection(aiosqlite.Connection):
    """aiosqlite connection whose cursors and idle commits/rollbacks skip needless worker round trips."""

    reads_in_loop = False  # set once the connection is known to be in WAL mode (see db._sqlite_pragmas)
    busy_timeout_ms = 30_000  # how long a write waits for the lock (in the worker thread); set by connect

    def in_loop(self, sql: str) -> bool:
        """True when `sql` cannot wait for a lock: a read, or any statement once this transaction wrote."""
        conn = self._connection
        if not self.reads_in_loop or conn is None:
            return False
        return conn.in_transaction or sql.lstrip()[:6].upper() == "SELECT"

    def cursor(self) -> FastCursor:  # type: ignore[override]
        return FastCursor(self)

    async def commit(self) -> None:
        if self._connection is not None and self._connection.in_transaction:
            await super().commit()

    async def rollback(self) -> None:
        if self._connection is not None and self._connection.in_transaction:
            await super().rollback()


def connect(database: str, **kwargs: Any) -> FastConnection:
    """Like `aiosqlite.connect`, returning a `FastConnection` (await it, as SQLAlchemy does)."""

    def connector() -> sqlite3.Connection:
        raw: sqlite3.Connection = sqlite3.connect(database, **kwargs)
        return raw

    conn = FastConnection(connector, 64)
    conn.busy_timeout_ms = int(float(kwargs.get("timeout", 5.0)) * 1000)
    conn._thread.daemon = True  # as SQLAlchemy does for aiosqlite: a forgotten connection must not hang exit
    return conn
