"""aiosqlite with one thread hand-off per statement, for SQLAlchemy's aiosqlite dialect.

SQLAlchemy drives aiosqlite cursor by cursor: create, execute, fetch, close, each a round trip to the
connection's worker thread (~1 ms apiece on a busy 2-core machine), plus a rollback when a connection
goes back to the pool. Here a cursor runs execute + fetch + close in one worker call, and commit or
rollback with no transaction open costs nothing. On a WAL database a SELECT never waits for a lock, and
neither does a statement of a transaction that already wrote (it holds the write lock: the driver opens a
transaction only in front of its first write), so those run right on the event loop (tens of microseconds)
with no hand-off. What may wait for the write lock (a transaction's first write, DDL and PRAGMA outside a
transaction) or for the disk (commit, which may checkpoint) still runs in the worker thread, so a busy
database never blocks the loop. Statements and their results are unchanged.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import aiosqlite

_Result = tuple[Any, int, int | None, list[Any]]


def _run(conn: sqlite3.Connection, many: bool, sql: str, params: Any) -> _Result:
    """In the worker thread: the whole statement, its rows read and its cursor closed."""
    cur = conn.executemany(sql, params) if many else conn.execute(sql, params)
    try:
        rows = cur.fetchall() if cur.description else []
        return cur.description, cur.rowcount, cur.lastrowid, rows
    finally:
        cur.close()


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
        result: _Result
        if not many and self._conn.in_loop(sql):
            result = _run(self._conn._conn, False, sql, params)
        else:
            result = await self._conn._execute(_run, self._conn._conn, many, sql, params)  # type: ignore[no-untyped-call]
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
    conn._thread.daemon = True  # as SQLAlchemy does for aiosqlite: a forgotten connection must not hang exit
    return conn
