"""The agent's local journal (SQLite) of claimed runs, so a restart neither loses nor repeats a result.

Each run moves through stages; every stage is written before the next step starts:
claimed -> started (container handle) -> exited (exit code) -> sealed (encrypted output on disk)
-> uploaded (result blob id) -> row deleted once the server has the final status.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL,
    job_id INTEGER NOT NULL,
    stage TEXT NOT NULL,
    handle TEXT,
    exit_code INTEGER,
    reason TEXT,
    final_status TEXT,
    result_blob_id TEXT,
    deadline REAL,
    updated_at REAL NOT NULL,
    output_rules TEXT
)
"""
_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
_DESCRIPTORS = """
CREATE TABLE IF NOT EXISTS descriptors (
    digest TEXT NOT NULL,
    run_key TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (digest, run_key)
)
"""
_DESCRIPTORS_BY_RUN = "CREATE INDEX IF NOT EXISTS descriptors_by_run ON descriptors (run_key)"


class Stage(StrEnum):
    CLAIMED = "claimed"
    STARTED = "started"
    EXITED = "exited"
    SEALED = "sealed"
    UPLOADED = "uploaded"


@dataclass(frozen=True)
class Entry:
    """One unfinished run as the journal last saw it."""

    run_id: int
    task_id: int
    job_id: int
    stage: Stage
    handle: str | None
    exit_code: int | None
    reason: str | None
    final_status: str | None
    result_blob_id: str | None
    deadline: float | None
    output_rules: str | None = None
    """The disclosure rules the run's output is held to (vfed.node.disclosure.OutputRules, as JSON)."""


class Journal:
    """Small synchronous SQLite store; each call is one short transaction on a local file.

    Calls are safe from any thread (one lock around the connection): the claim's write goes to a thread, so
    the loop sets the run up during its fsync (the runner waits for it before the container is created).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
        if "output_rules" not in columns:  # a journal of an agent older than disclosure control
            self._db.execute("ALTER TABLE runs ADD COLUMN output_rules TEXT")
        self._db.execute(_META)
        self._db.execute(_DESCRIPTORS)
        self._db.execute(_DESCRIPTORS_BY_RUN)
        # Made once per journal: the containers this agent starts carry it, so recovery adopts (or removes)
        # only those, never the runs of another agent that has the same node name on the same engine.
        self._db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('agent_id', ?)", (secrets.token_hex(8),)
        )
        row = self._db.execute("SELECT value FROM meta WHERE key = 'agent_id'").fetchone()
        self.agent_id: str = row[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement, its rows fetched under the lock."""
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def meta(self, key: str) -> str | None:
        rows = self._exec("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        self._exec("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def drop_meta(self, key: str) -> None:
        self._exec("DELETE FROM meta WHERE key = ?", (key,))

    def forget_all(self) -> list[Entry]:
        """Drop every unfinished run (they belong to a server that no longer knows them); answer them."""
        entries = self.unfinished()
        self._exec("DELETE FROM runs")
        return entries

    def claimed(self, run_id: int, task_id: int, job_id: int) -> None:
        self._exec(
            "INSERT OR REPLACE INTO runs (run_id, task_id, job_id, stage, updated_at) VALUES (?, ?, ?, ?, ?)",
            (run_id, task_id, job_id, Stage.CLAIMED, time.time()),
        )

    def started(self, run_id: int, handle: str, deadline: float, output_rules: str | None = None) -> None:
        self._update(run_id, stage=Stage.STARTED, handle=handle, deadline=deadline, output_rules=output_rules)

    def exited(self, run_id: int, exit_code: int | None, final_status: str, reason: str | None) -> None:
        self._update(
            run_id, stage=Stage.EXITED, exit_code=exit_code, final_status=final_status, reason=reason
        )

    def sealed(self, run_id: int) -> None:
        self._update(run_id, stage=Stage.SEALED)

    def uploaded(self, run_id: int, result_blob_id: str) -> None:
        self._update(run_id, stage=Stage.UPLOADED, result_blob_id=result_blob_id)

    def done(self, run_id: int) -> None:
        self._exec("DELETE FROM runs WHERE run_id = ?", (run_id,))

    def get(self, run_id: int) -> Entry | None:
        rows = self._select("WHERE run_id = ?", (run_id,))
        return rows[0] if rows else None

    def unfinished(self) -> list[Entry]:
        return self._select("ORDER BY run_id", ())

    def accept_descriptor(self, digest: str, run_key: str, expires_at: float, now: float) -> str | None:
        """Remember that this run executes this descriptor, until it expires; answer the other run that
        already did (a replay), else None. The same run again (a resumed run) is not a replay."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM descriptors WHERE expires_at < ?", (now,))
                row = self._db.execute(
                    "SELECT run_key FROM descriptors WHERE digest = ? AND run_key != ? LIMIT 1",
                    (digest, run_key),
                ).fetchone()
                if row is None:
                    self._db.execute(
                        "INSERT OR IGNORE INTO descriptors (digest, run_key, accepted_at, expires_at)"
                        " VALUES (?, ?, ?, ?)",
                        (digest, run_key, now, expires_at),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return str(row[0]) if row is not None else None

    def accepted_descriptor(self, run_key: str) -> tuple[str, float] | None:
        """(digest, accepted_at) of the descriptor this run was accepted with, if it was."""
        rows = self._exec(
            "SELECT digest, accepted_at FROM descriptors WHERE run_key = ? ORDER BY accepted_at DESC LIMIT 1",
            (run_key,),
        )
        return (str(rows[0][0]), float(rows[0][1])) if rows else None

    def _update(self, run_id: int, **fields: object) -> None:
        names = ", ".join(f"{k} = ?" for k in fields)
        self._exec(
            f"UPDATE runs SET {names}, updated_at = ? WHERE run_id = ?",
            (*fields.values(), time.time(), run_id),
        )

    def _select(self, where: str, args: tuple[object, ...]) -> list[Entry]:
        rows = self._exec(
            "SELECT run_id, task_id, job_id, stage, handle, exit_code, reason, final_status, result_blob_id,"
            f" deadline, output_rules FROM runs {where}",
            args,
        )
        return [Entry(r[0], r[1], r[2], Stage(r[3]), r[4], r[5], r[6], r[7], r[8], r[9], r[10]) for r in rows]
