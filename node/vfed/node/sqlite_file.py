"""The agent's small SQLite files beside its journal (`ledger.sqlite3`, `leases.sqlite3`), opened alike."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def connect(path: Path, schema: str, *, timeout: float = 5.0) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), usable from the agent's threads, in WAL
    mode with `synchronous=NORMAL`: durable across a crash of the agent, not a power cut (what these files
    hold is read again from the server or the journal then). The schema is applied (idempotent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(schema)
    return db
