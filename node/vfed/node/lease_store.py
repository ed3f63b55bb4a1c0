"""What the node reserved on leases, the facts of each run for its receipt, and the receipts not yet on the
ledger: one SQLite file in the node's data folder (`leases.sqlite3`, beside the privacy budget's).

A run's use of a lease (one run, its epsilon) is reserved in one IMMEDIATE transaction before its container
starts, so concurrent runs (tasks or processes) cannot overshoot a lease's `max_runs` or epsilon cap. The
count is the union of the runs reserved here and the runs of the receipts on the verified ledger, which
`NodeLedger` feeds in (`add_ledger_runs`) as it verifies them: a run known from both counts once, with the
epsilon it reserved here (else its receipt's). Reservations stay after the run: its receipt records what
was spent.

Each lease's count and epsilon are kept as totals (`lease_totals`), changed in the same transaction as the
reservation or receipt that changes them, so a reservation reads a few rows whatever the number of runs on
the lease. Calls are short (a few statements on a local file, WAL): the agent makes them on its loop.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vfed.common.ledger import DatasetUse, NoValidLease
from vfed.common.trust import SignedEntry
from vfed.node import sqlite_file

LEASES_FILE = "leases.sqlite3"
TOLERANCE = 1e-9
_SCHEMA = """
CREATE TABLE IF NOT EXISTS lease_runs (
    run_key TEXT PRIMARY KEY,
    run_id INTEGER NOT NULL,
    task_id INTEGER NOT NULL,
    image TEXT NOT NULL,
    descriptor TEXT,
    input TEXT,
    uses TEXT NOT NULL,
    reserved_at REAL NOT NULL,
    started_at INTEGER,
    result TEXT,
    done INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS reservations (
    lease TEXT NOT NULL,
    run_key TEXT NOT NULL,
    run_id INTEGER NOT NULL,
    epsilon REAL,
    PRIMARY KEY (lease, run_key)
);
CREATE INDEX IF NOT EXISTS reservations_by_run ON reservations (lease, run_id);
CREATE INDEX IF NOT EXISTS reservations_by_key ON reservations (run_key);
CREATE TABLE IF NOT EXISTS ledger_runs (
    lease TEXT NOT NULL,
    run_id INTEGER NOT NULL,
    epsilon REAL,
    PRIMARY KEY (lease, run_id)
);
CREATE TABLE IF NOT EXISTS lease_totals (
    lease TEXT PRIMARY KEY,
    runs INTEGER NOT NULL,
    epsilon REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    run_key TEXT NOT NULL UNIQUE,
    entry TEXT NOT NULL,
    queued_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Candidate:
    """A lease whose terms cover the run (what was spent on it is counted in the store)."""

    lease: str
    dataset: str
    max_runs: int | None
    epsilon_cap: float | None


@dataclass(frozen=True)
class RunFacts:
    """What a run's receipt says, gathered when its leases were reserved and while it ran."""

    run_key: str
    run_id: int
    task_id: int
    image: str
    descriptor: str | None
    input: str | None
    uses: list[DatasetUse]
    started_at: int | None
    result: str | None
    done: bool


@dataclass(frozen=True)
class Queued:
    id: int
    run_key: str
    entry: SignedEntry
    attempts: int


class LeaseStore:
    """Reservations, run facts and the receipt queue; safe from any thread (one lock, one connection)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite_file.connect(self.path, _SCHEMA, timeout=30)
            _count_once(db)
            self._db = db
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _rows(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            return self._conn().execute(sql, args).fetchall()

    # -- reservations ---------------------------------------------------------------------------------------
    def reserve(
        self,
        *,
        run_key: str,
        run_id: int,
        task_id: int,
        image: str,
        descriptor: str | None,
        input_hash: str | None,
        choices: Sequence[tuple[str, Sequence[Candidate]]],
        epsilon: float | None,
    ) -> list[DatasetUse]:
        """For each (label, candidates) the first lease with room takes this run (and its epsilon), all or
        none; NoValidLease names every lease that had none. The same run again (a resumed one) is answered
        with what it reserved before."""
        with self._immediate() as db:
            row = db.execute("SELECT uses FROM lease_runs WHERE run_key = ?", (run_key,)).fetchone()
            if row is not None:
                return _uses(str(row[0]))
            uses: list[DatasetUse] = []
            for label, candidates in choices:
                chosen, before, reasons = None, (0, 0.0), []
                for candidate in candidates:
                    counted = _counted(db, candidate.lease, run_id)
                    why = _no_room(db, candidate, counted, epsilon)
                    if why is None:
                        chosen, before = candidate, counted
                        break
                    reasons.append(why)
                if chosen is None:
                    raise NoValidLease(f"dataset {label!r}: " + "; ".join(reasons))
                db.execute(
                    "INSERT INTO reservations (lease, run_key, run_id, epsilon) VALUES (?, ?, ?, ?)",
                    (chosen.lease, run_key, run_id, epsilon),
                )
                _add(db, chosen.lease, before, _counted(db, chosen.lease, run_id))
                uses.append(
                    DatasetUse(label=label, dataset=chosen.dataset, lease=chosen.lease, epsilon=epsilon)
                )
            db.execute(
                "INSERT INTO lease_runs"
                " (run_key, run_id, task_id, image, descriptor, input, uses, reserved_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_key,
                    run_id,
                    task_id,
                    image,
                    descriptor,
                    input_hash,
                    json.dumps([u.model_dump() for u in uses]),
                    time.time(),
                ),
            )
        return uses

    def release(self, run_key: str) -> bool:
        """Give back what a run that never started reserved; False (nothing released) if it started."""
        with self._immediate() as db:
            row = db.execute("SELECT started_at FROM lease_runs WHERE run_key = ?", (run_key,)).fetchone()
            if row is None or row[0] is not None:
                return False
            held = db.execute(
                "SELECT lease, run_id FROM reservations WHERE run_key = ?", (run_key,)
            ).fetchall()
            for lease, run_id in held:
                before = _counted(db, lease, run_id)
                db.execute("DELETE FROM reservations WHERE lease = ? AND run_key = ?", (lease, run_key))
                _add(db, lease, before, _counted(db, lease, run_id))  # still counted if the ledger has it
            db.execute("DELETE FROM lease_runs WHERE run_key = ?", (run_key,))
        return True

    def reserved(self, lease: str) -> dict[int, float | None]:
        """Run id -> epsilon reserved here on this lease."""
        rows = self._rows("SELECT run_id, epsilon FROM reservations WHERE lease = ?", (lease,))
        return {int(str(r[0])): (float(str(r[1])) if r[1] is not None else None) for r in rows}

    def totals(self, lease: str) -> tuple[int, float]:
        """(runs, epsilon) counted on this lease: reserved here or on the ledger, each run once."""
        rows = self._rows("SELECT runs, epsilon FROM lease_totals WHERE lease = ?", (lease,))
        return (int(str(rows[0][0])), float(str(rows[0][1]))) if rows else (0, 0.0)

    def add_ledger_runs(
        self, runs: Iterable[tuple[str, int, float | None]], *, mark: tuple[str, str] | None = None
    ) -> int:
        """Take in (lease, run id, epsilon) of receipts on the verified ledger; how many were new. Idempotent
        (a run already known from the ledger is ignored), set-based (one pass whatever the number), and a
        run reserved here is not counted again. `mark` (meta key, value) is set in the same transaction: how
        far the feeder got."""
        rows = list(runs)
        if not rows and mark is None:
            return 0
        with self._immediate() as db:
            if mark is not None:
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", mark)
            if not rows:
                return 0
            db.execute(
                "CREATE TEMP TABLE IF NOT EXISTS incoming"
                " (lease TEXT NOT NULL, run_id INTEGER NOT NULL, epsilon REAL, PRIMARY KEY (lease, run_id))"
            )
            db.execute("DELETE FROM temp.incoming")
            db.executemany(
                "INSERT OR IGNORE INTO temp.incoming (lease, run_id, epsilon) VALUES (?, ?, ?)", rows
            )
            db.execute(
                "DELETE FROM temp.incoming WHERE EXISTS (SELECT 1 FROM ledger_runs l"
                " WHERE l.lease = incoming.lease AND l.run_id = incoming.run_id)"
            )
            db.execute(
                "INSERT INTO lease_totals (lease, runs, epsilon)"
                " SELECT i.lease, COUNT(*), TOTAL(i.epsilon) FROM temp.incoming i WHERE NOT EXISTS"
                " (SELECT 1 FROM reservations r WHERE r.lease = i.lease AND r.run_id = i.run_id)"
                " GROUP BY i.lease"
                " ON CONFLICT (lease) DO UPDATE SET"
                " runs = runs + excluded.runs, epsilon = epsilon + excluded.epsilon"
            )
            added = db.execute(
                "INSERT INTO ledger_runs (lease, run_id, epsilon)"
                " SELECT lease, run_id, epsilon FROM temp.incoming"
            ).rowcount
            db.execute("DELETE FROM temp.incoming")
        return added

    # -- run facts -------------------------------------------------------------------------------------------
    def started(self, run_key: str, at: int) -> None:
        self._rows(
            "UPDATE lease_runs SET started_at = ? WHERE run_key = ? AND started_at IS NULL",
            (at, run_key),
        )

    def result(self, run_key: str, sha256: str) -> None:
        self._rows("UPDATE lease_runs SET result = ? WHERE run_key = ?", (sha256, run_key))

    def facts(self, run_key: str) -> RunFacts | None:
        rows = self._rows(
            "SELECT run_key, run_id, task_id, image, descriptor, input, uses, started_at, result, done"
            " FROM lease_runs WHERE run_key = ?",
            (run_key,),
        )
        return _facts(rows[0]) if rows else None

    def running(self) -> list[RunFacts]:
        """Runs that started and have no receipt yet (after a restart: the ones still using their leases)."""
        rows = self._rows(
            "SELECT run_key, run_id, task_id, image, descriptor, input, uses, started_at, result, done"
            " FROM lease_runs WHERE started_at IS NOT NULL AND done = 0 ORDER BY run_id"
        )
        return [_facts(r) for r in rows]

    # -- receipts --------------------------------------------------------------------------------------------
    def finish(self, run_key: str, receipt: SignedEntry) -> None:
        """The run is over: its receipt goes into the queue, in the same transaction."""
        with self._immediate() as db:
            db.execute("UPDATE lease_runs SET done = 1 WHERE run_key = ?", (run_key,))
            db.execute(
                "INSERT OR IGNORE INTO outbox (run_key, entry, queued_at) VALUES (?, ?, ?)",
                (run_key, receipt.to_json(), time.time()),
            )

    def queued(self) -> list[Queued]:
        rows = self._rows("SELECT id, run_key, entry, attempts FROM outbox ORDER BY id")
        return [Queued(int(str(r[0])), str(r[1]), SignedEntry.parse(str(r[2])), int(str(r[3]))) for r in rows]

    def delivered(self, queued_id: int) -> None:
        self._rows("DELETE FROM outbox WHERE id = ?", (queued_id,))

    def attempt_failed(self, queued_id: int, error: str) -> None:
        self._rows(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE id = ?", (error[:500], queued_id)
        )

    def meta(self, key: str) -> str | None:
        rows = self._rows("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        self._rows("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


_TOTALS_VERSION = "1"


def _count_once(db: sqlite3.Connection) -> None:
    """A store from before `lease_totals` (or one whose totals were never built): build them once from the
    reservations and ledger runs it holds."""
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'lease_totals'").fetchone()
        if row is None or row[0] != _TOTALS_VERSION:
            _rebuild_totals(db)
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('lease_totals', ?)", (_TOTALS_VERSION,)
            )
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _rebuild_totals(db: sqlite3.Connection) -> None:
    """Every lease's totals from scratch (the same counting as `_counted`, over all runs at once)."""
    db.execute("DELETE FROM lease_totals")
    db.execute(
        "INSERT INTO lease_totals (lease, runs, epsilon)"
        " SELECT lease, COUNT(*), TOTAL(epsilon) FROM ("
        "  SELECT k.lease AS lease, (SELECT r.epsilon FROM reservations r WHERE r.lease = k.lease"
        "   AND r.run_id = k.run_id ORDER BY r.rowid DESC LIMIT 1) AS epsilon"
        "  FROM (SELECT DISTINCT lease, run_id FROM reservations) k"
        "  UNION ALL"
        "  SELECT l.lease, l.epsilon FROM ledger_runs l WHERE NOT EXISTS"
        "   (SELECT 1 FROM reservations r WHERE r.lease = l.lease AND r.run_id = l.run_id)"
        " ) GROUP BY lease"
    )


def _counted(db: sqlite3.Connection, lease: str, run_id: int) -> tuple[int, float]:
    """What one run adds to its lease's totals: (1, the epsilon it reserved here, the latest reservation's if
    several) when reserved here, else (1, its receipt's epsilon) when on the ledger, else nothing."""
    row = db.execute(
        "SELECT epsilon FROM reservations WHERE lease = ? AND run_id = ? ORDER BY rowid DESC LIMIT 1",
        (lease, run_id),
    ).fetchone()
    if row is None:
        row = db.execute(
            "SELECT epsilon FROM ledger_runs WHERE lease = ? AND run_id = ?", (lease, run_id)
        ).fetchone()
    if row is None:
        return 0, 0.0
    return 1, float(row[0]) if row[0] is not None else 0.0


def _add(db: sqlite3.Connection, lease: str, before: tuple[int, float], after: tuple[int, float]) -> None:
    """Change a lease's totals by what one run's count went from and to."""
    runs, epsilon = after[0] - before[0], after[1] - before[1]
    if runs == 0 and epsilon == 0.0:
        return
    db.execute(
        "INSERT INTO lease_totals (lease, runs, epsilon) VALUES (?, ?, ?) ON CONFLICT (lease) DO UPDATE SET"
        " runs = runs + excluded.runs,"
        " epsilon = CASE WHEN runs + excluded.runs = 0 THEN 0.0 ELSE epsilon + excluded.epsilon END",
        (lease, runs, epsilon),
    )


def _totals(db: sqlite3.Connection, lease: str) -> tuple[int, float]:
    row = db.execute("SELECT runs, epsilon FROM lease_totals WHERE lease = ?", (lease,)).fetchone()
    return (int(row[0]), float(row[1])) if row is not None else (0, 0.0)


def _no_room(
    db: sqlite3.Connection, c: Candidate, counted: tuple[int, float], epsilon: float | None
) -> str | None:
    """Why this lease cannot take one more run now, or None. `counted` is what the run itself already counts
    on the lease (reserved under another key, or its receipt on the ledger): it takes no second place, and
    its epsilon is replaced by this reservation's."""
    short = c.lease[:12]
    runs, spent = _totals(db, c.lease)
    own_runs, own_epsilon = counted
    if c.max_runs is not None and runs - own_runs >= c.max_runs:
        return f"lease {short} is exhausted ({runs} of {c.max_runs} runs used)"
    if c.epsilon_cap is not None:
        if epsilon is None:
            return (
                f"lease {short} caps epsilon at {c.epsilon_cap:g} and the method declares no epsilon "
                "(image label vfed.manifest, epsilon_kwarg)"
            )
        spent -= own_epsilon
        if spent + epsilon > c.epsilon_cap + TOLERANCE:
            return (
                f"lease {short}'s epsilon cap is spent: {spent:g} of {c.epsilon_cap:g} used, this run asks "
                f"{epsilon:g}"
            )
    return None


def _uses(text: str) -> list[DatasetUse]:
    return [DatasetUse.model_validate(u) for u in json.loads(text)]


def _facts(row: tuple[object, ...]) -> RunFacts:
    key, run_id, task_id, image, descriptor, input_hash, uses, started_at, result, done = row
    return RunFacts(
        str(key),
        int(str(run_id)),
        int(str(task_id)),
        str(image),
        str(descriptor) if descriptor is not None else None,
        str(input_hash) if input_hash is not None else None,
        _uses(str(uses)),
        int(str(started_at)) if started_at is not None else None,
        str(result) if result is not None else None,
        bool(done),
    )
