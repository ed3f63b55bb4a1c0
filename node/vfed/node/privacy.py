"""The node's differential-privacy budget: epsilon per dataset, charged before a run starts, never refunded.

The budget is the node's, not the algorithm's: an algorithm only declares (in its image manifest) which
keyword argument holds the epsilon a method spends. The store is a SQLite file in the node's data folder,
so spending survives restarts; check-and-charge is one IMMEDIATE transaction, so concurrent runs (threads or
processes) cannot overspend. A dataset with a budget serves only methods that declare their epsilon.

Calls are blocking and short (a few SQLite statements): the agent calls them through `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from vfed.common.manifest import EpsilonError, Manifest, declared_epsilon
from vfed.common.payload import TaskInput

TOLERANCE = 1e-9
_SCHEMA = """
CREATE TABLE IF NOT EXISTS privacy_charges (
    id INTEGER PRIMARY KEY,
    dataset TEXT NOT NULL,
    run_id TEXT NOT NULL,
    epsilon REAL NOT NULL CHECK (epsilon > 0),
    budget REAL NOT NULL,
    initiator TEXT,
    charged_at TEXT NOT NULL,
    UNIQUE (dataset, run_id)
);
CREATE INDEX IF NOT EXISTS privacy_charges_dataset ON privacy_charges (dataset);
"""


class BudgetRefused(Exception):
    """The run may not start: its privacy cost cannot be charged. The message is the run's reason."""


@dataclass(frozen=True)
class Charge:
    """Epsilon spent on one dataset by one run."""

    dataset: str
    run_id: str
    epsilon: float
    budget: float
    initiator: str | None
    charged_at: str


class BudgetStore:
    """Spent epsilon per dataset, in a SQLite file that outlives the agent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ready = False

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # One connection per call: safe from any thread, and the file lock serializes processes.
        if not self._ready:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        with closing(connection):
            if not self._ready:
                connection.executescript(_SCHEMA)
                self._ready = True
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    @staticmethod
    def _spent(connection: sqlite3.Connection, dataset: str) -> float:
        row = connection.execute(
            "SELECT COALESCE(SUM(epsilon), 0) FROM privacy_charges WHERE dataset = ?", (dataset,)
        ).fetchone()
        return float(row[0])

    def spent(self, dataset: str) -> float:
        """Epsilon charged on this dataset so far."""
        with self._transaction() as connection:
            return self._spent(connection, dataset)

    def charges(self, dataset: str | None = None) -> list[Charge]:
        """The charges, oldest first (for `vnode` reports and audits)."""
        query = "SELECT dataset, run_id, epsilon, budget, initiator, charged_at FROM privacy_charges"
        params: tuple[str, ...] = ()
        if dataset is not None:
            query, params = query + " WHERE dataset = ?", (dataset,)
        with self._transaction() as connection:
            rows = connection.execute(query + " ORDER BY id", params).fetchall()
        return [Charge(*row) for row in rows]

    def charge(
        self,
        run_id: str,
        datasets: Sequence[str],
        epsilon: float,
        budgets: Mapping[str, float],
        initiator: str | None = None,
    ) -> list[Charge]:
        """Charge `epsilon` on every dataset, all or none; BudgetRefused names the dataset that is spent.

        Charging the same run again (the agent restarted mid-run) charges nothing more.
        """
        if not epsilon > 0:
            raise BudgetRefused(f"epsilon must be positive, got {epsilon!r}")
        now = datetime.now(UTC).isoformat()
        with self._transaction() as connection:
            for dataset in datasets:
                if dataset not in budgets:
                    raise BudgetRefused(f"dataset {dataset!r} has no privacy budget configured")
                already = connection.execute(
                    "SELECT 1 FROM privacy_charges WHERE dataset = ? AND run_id = ?", (dataset, run_id)
                ).fetchone()
                if already:
                    continue
                spent, budget = self._spent(connection, dataset), budgets[dataset]
                if spent + epsilon > budget + TOLERANCE:
                    raise BudgetRefused(
                        f"privacy budget of dataset {dataset!r} exhausted: {spent:g} of {budget:g} epsilon "
                        f"spent, this run asks {epsilon:g} ({max(budget - spent, 0):g} left)"
                    )
                connection.execute(
                    "INSERT INTO privacy_charges (dataset, run_id, epsilon, budget, initiator, charged_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (dataset, run_id, epsilon, budget, initiator, now),
                )
        return [c for c in self.charges() if c.run_id == run_id and c.dataset in datasets]


def parse_manifest(label: str | None) -> Manifest | None:
    """The manifest from the image label `vfed.manifest`; None when absent. Malformed is refused."""
    if not label:
        return None
    try:
        return Manifest.model_validate(json.loads(label))
    except (ValueError, ValidationError) as exc:
        raise BudgetRefused(f"the image's vfed.manifest label is not a valid manifest: {exc}") from exc


def authorize(
    store: BudgetStore,
    *,
    run_id: str,
    task_input: TaskInput,
    manifest: Manifest | None,
    datasets: Sequence[str],
    budgets: Mapping[str, float | None],
    initiator: str | None = None,
) -> float | None:
    """Charge the run's epsilon on its budgeted datasets before it starts; the epsilon granted, or None.

    Datasets without a budget cost nothing. A budgeted dataset refuses methods whose epsilon is not declared
    in the image manifest: otherwise any method could read it without spending.
    """
    limited = {d: float(b) for d in datasets if (b := budgets.get(d)) is not None}
    if not limited:
        return None
    method = task_input.method
    spec = manifest.functions.get(method) if manifest is not None else None
    if spec is None or spec.epsilon_kwarg is None:
        raise BudgetRefused(
            f"dataset(s) {sorted(limited)} are protected by a privacy budget and method {method!r} does not "
            "declare the epsilon it spends (image label vfed.manifest, @federated(epsilon_kwarg=...))"
        )
    try:
        epsilon = declared_epsilon(spec, task_input)
    except EpsilonError as exc:
        raise BudgetRefused(str(exc)) from exc
    if epsilon is None:  # not reached: spec.epsilon_kwarg is set, so declared_epsilon returned or raised
        raise BudgetRefused(f"method {method!r} declares no epsilon")
    store.charge(run_id, sorted(limited), epsilon, limited, initiator)
    return epsilon
