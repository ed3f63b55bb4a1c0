"""The node's lease reservations (node/vfed/node/lease_store.py) on a real SQLite file, and the `ledger`
doorbell ring; no server, no Docker."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vfed.common.api.doorbell import parse
from vfed.common.ledger import DatasetUse, NoValidLease, Receipt
from vfed.node.lease_store import Candidate, LeaseStore
from vfed.node.ledger import NodeLedger

LEASE = "a" * 64
DATASET = "d" * 64
OTHER = "b" * 64


def reserve(
    store: LeaseStore,
    run_id: int,
    epsilon: float | None = None,
    *,
    max_runs: int | None = None,
    epsilon_cap: float | None = None,
    lease: str = LEASE,
) -> None:
    candidate = Candidate(lease, DATASET, max_runs, epsilon_cap)
    store.reserve(
        run_key=f"srv:{run_id}",
        run_id=run_id,
        task_id=run_id,
        image="sha256:" + "1" * 64,
        descriptor=None,
        input_hash=None,
        choices=[("patients", [candidate])],
        epsilon=epsilon,
    )


def test_concurrent_reservations_from_several_processes_never_overshoot(tmp_path: Path) -> None:
    """Eight threads, each with its own connection (as separate processes would have), reserve on a lease
    with max_runs 3: exactly three get it."""
    path = tmp_path / "leases.sqlite3"
    won: list[int] = []
    barrier = threading.Barrier(8)

    def attempt(run_id: int) -> None:
        store = LeaseStore(path)
        barrier.wait()
        try:
            reserve(store, run_id, max_runs=3)
            won.append(run_id)
        except NoValidLease as exc:
            assert "exhausted" in exc.message
        finally:
            store.close()

    LeaseStore(path).close()  # the schema, before the race
    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 3
    assert set(LeaseStore(path).reserved(LEASE)) == set(won)


def test_ledger_receipts_and_local_reservations_count_once(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path / "l.sqlite3")
    assert store.add_ledger_runs([(LEASE, 1, 0.0)]) == 1  # its own receipt is on the ledger already
    reserve(store, 1, max_runs=2)
    reserve(store, 2, max_runs=2)
    with pytest.raises(NoValidLease, match="exhausted"):
        reserve(store, 3, max_runs=2)
    assert store.release("srv:2") and not store.facts("srv:2")
    reserve(store, 3, max_runs=2)  # run 2 never started: its place is free again
    assert store.totals(LEASE) == (2, 0.0)


def test_epsilon_caps_count_what_was_reserved_and_refuse_undeclared_methods(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path / "l.sqlite3")
    store.add_ledger_runs([(LEASE, 9, 0.3)])
    reserve(store, 1, 0.4, epsilon_cap=1.0)
    with pytest.raises(NoValidLease, match="epsilon cap is spent"):
        reserve(store, 2, 0.4, epsilon_cap=1.0)
    reserve(store, 3, 0.3, epsilon_cap=1.0)
    runs, spent = store.totals(LEASE)
    assert runs == 3 and spent == pytest.approx(1.0)
    with pytest.raises(NoValidLease, match="declares no epsilon"):
        reserve(store, 4, None, epsilon_cap=5.0)


def test_a_started_run_keeps_its_reservation_and_queues_one_receipt(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    store = LeaseStore(path)
    reserve(store, 1, max_runs=1)
    store.started("srv:1", 100)
    assert not store.release("srv:1"), "a run that started keeps what it reserved"
    store.close()
    again = LeaseStore(path)  # a restart
    assert [f.run_id for f in again.running()] == [1]
    with pytest.raises(NoValidLease):
        reserve(again, 2, max_runs=1)


def test_the_ledger_doorbell_ring_is_parsed() -> None:
    ring = parse(
        json.dumps({"event": "ledger", "collaboration_id": 3, "seq": 17, "run_id": None, "task_id": None})
    )
    assert ring is not None and ring.event == "ledger"
    assert (ring.seq, ring.collaboration_id, ring.run_id) == (17, 3, None)


def test_runs_known_only_from_receipts_on_the_ledger_count(tmp_path: Path) -> None:
    """The store was lost, or another node of the organization ran them: receipts alone fill the lease."""
    store = LeaseStore(tmp_path / "l.sqlite3")
    assert store.add_ledger_runs([(LEASE, 1, 0.25), (LEASE, 2, None), (OTHER, 1, 0.5)]) == 3
    with pytest.raises(NoValidLease, match=r"exhausted \(2 of 2"):
        reserve(store, 3, max_runs=2)
    with pytest.raises(NoValidLease, match=r"0\.25 of 0\.5 used"):
        reserve(store, 3, 0.3, epsilon_cap=0.5)
    reserve(store, 3, 0.25, epsilon_cap=0.5)
    assert store.totals(LEASE) == (3, 0.5) and store.totals(OTHER) == (1, 0.5)
    assert store.reserved(LEASE) == {3: 0.25}


def test_a_run_reserved_here_and_on_the_ledger_counts_once_in_either_order(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path / "l.sqlite3")
    reserve(store, 1, 0.5, epsilon_cap=1.0)
    store.add_ledger_runs([(LEASE, 1, 0.5)])  # its receipt, seen after the reservation
    store.add_ledger_runs([(LEASE, 2, 0.25)])  # a receipt seen before the run's reservation (a lost store)
    reserve(store, 2, 0.25, epsilon_cap=1.0)
    assert store.totals(LEASE) == (2, 0.75)
    with pytest.raises(NoValidLease, match=r"0\.75 of 1 used"):
        reserve(store, 3, 0.5, epsilon_cap=1.0)
    # A run already counted does not take a second place: run 4's receipt fills max_runs 3, and run 4 itself
    # (its store lost, the run offered again) still gets its reservation.
    store.add_ledger_runs([(LEASE, 4, 0.0)])
    reserve(store, 4, max_runs=3)
    assert store.totals(LEASE) == (3, 0.75)


def test_a_released_reservation_stays_counted_when_its_run_is_on_the_ledger(tmp_path: Path) -> None:
    """A reservation is given back only for a run the ledger does not know; one it knows keeps its place, with
    its receipt's epsilon."""
    store = LeaseStore(tmp_path / "l.sqlite3")
    reserve(store, 1, 0.5, epsilon_cap=1.0)
    reserve(store, 2, 0.25, epsilon_cap=1.0)
    store.add_ledger_runs([(LEASE, 1, 0.125)])
    assert store.release("srv:1") and store.release("srv:2")
    assert store.reserved(LEASE) == {}
    assert store.totals(LEASE) == (1, 0.125)
    store.add_ledger_runs([(LEASE, 1, 0.125)])  # fed again: nothing changes
    assert store.totals(LEASE) == (1, 0.125)


def test_totals_survive_a_restart_that_feeds_every_receipt_again_and_are_built_for_an_old_store(
    tmp_path: Path,
) -> None:
    path = tmp_path / "l.sqlite3"
    store = LeaseStore(path)
    store.add_ledger_runs([(LEASE, r, 0.01) for r in range(1, 51)])
    for r in range(40, 61):
        reserve(store, r, 0.01)
    assert store.release("srv:60")
    expected = store.totals(LEASE)
    assert expected[0] == 59 and expected[1] == pytest.approx(0.59)
    store.close()
    again = LeaseStore(path)  # a restart: the ledger feeds every receipt of its local copy again
    assert again.add_ledger_runs([(LEASE, r, 0.01) for r in range(1, 51)]) == 0
    assert again.totals(LEASE) == expected
    # A store from before the totals: built once from its reservations and ledger runs.
    db = again._conn()
    db.execute("DROP TABLE lease_totals")
    db.execute("DELETE FROM meta WHERE key = 'lease_totals'")
    again.close()
    old = LeaseStore(path)
    runs, epsilon = old.totals(LEASE)
    assert runs == expected[0] and epsilon == pytest.approx(expected[1])
    with pytest.raises(NoValidLease, match=r"exhausted \(59 of 59"):
        reserve(old, 61, max_runs=59)


def test_a_reservation_reads_the_same_few_rows_whatever_the_runs_on_its_lease(tmp_path: Path) -> None:
    """Counted in SQLite's virtual machine steps: a reservation after 2,000 runs on the lease (reserved here
    and on the ledger) costs what one after 20 does; no statement it runs scans a table."""

    def steps(store: LeaseStore, run_id: int) -> tuple[int, list[str]]:
        db = store._conn()
        count = [0]
        statements: list[str] = []

        def step() -> int:
            count[0] += 1
            return 0

        db.set_progress_handler(step, 1)
        db.set_trace_callback(statements.append)
        try:
            reserve(store, run_id, 0.001, max_runs=10**6, epsilon_cap=10.0**6)
        finally:
            db.set_progress_handler(None, 1)
            db.set_trace_callback(None)
        return count[0], statements

    def filled(name: str, runs: int) -> LeaseStore:
        store = LeaseStore(tmp_path / name)
        store.add_ledger_runs([(LEASE, r, 0.001) for r in range(1, runs + 1)])
        for r in range(1, runs + 1):
            reserve(store, r, 0.001)
        return store

    few, many = filled("few.sqlite3", 20), filled("many.sqlite3", 2000)
    few_steps, _ = steps(few, 10**5)
    many_steps, statements = steps(many, 10**5)
    assert many_steps <= few_steps + 20, (few_steps, many_steps)
    db = many._conn()
    for sql in statements:
        if sql.split()[0].upper() in {"SELECT", "INSERT", "UPDATE", "DELETE"}:
            plan = " | ".join(str(r[3]) for r in db.execute("EXPLAIN QUERY PLAN " + sql))
            assert "SCAN" not in plan, (sql, plan)


def test_the_node_ledger_feeds_only_new_receipts_and_skips_what_the_store_took_before_a_restart(
    tmp_path: Path,
) -> None:
    """`NodeLedger.feed_receipts` over a stand-in for its verified state: receipts are fed once; after a
    restart (a new NodeLedger, every receipt verified again from the local copy) the ones the store noted are
    skipped, unless the chain at the noted place differs (then all are fed again, ignored where known)."""

    def receipt(seq: int, run: int, lease: str | None, epsilon: float | None) -> Receipt:
        uses = [DatasetUse(label="patients", lease=lease, epsilon=epsilon)]
        return Receipt(seq, f"{seq:064x}", SimpleNamespace(run=run, datasets=uses))  # type: ignore[arg-type]

    class State:
        def __init__(self, receipts: list[Receipt], salt: str = "") -> None:
            self.receipts = receipts
            self.salt = salt

        def hash_at(self, seq: int) -> str:
            return f"h{seq}{self.salt}"

    fed: list[list[tuple[str, int, float | None]]] = []

    class Spy(LeaseStore):
        def add_ledger_runs(self, runs: Any, *, mark: tuple[str, str] | None = None) -> int:
            rows = list(runs)
            fed.append(rows)
            return super().add_ledger_runs(rows, mark=mark)

    def node_ledger(state: State) -> NodeLedger:
        ledger = NodeLedger.__new__(NodeLedger)
        ledger.view = SimpleNamespace(state=state)  # type: ignore[assignment]
        ledger.collaboration_id, ledger.leases, ledger._fed = 1, store, 0
        return ledger

    store = Spy(tmp_path / "l.sqlite3")
    receipts = [receipt(3, 1, LEASE, 0.5), receipt(5, 2, None, None), receipt(8, 3, OTHER, None)]
    state = State(receipts[:2])
    ledger = node_ledger(state)
    ledger.feed_receipts()
    state.receipts = receipts
    ledger.feed_receipts()
    ledger.feed_receipts()  # nothing new: no call
    assert fed == [[(LEASE, 1, 0.5)], [(OTHER, 3, None)]]
    assert store.totals(LEASE) == (1, 0.5) and store.totals(OTHER) == (1, 0.0)
    fed.clear()
    node_ledger(State(receipts)).feed_receipts()  # a restart on the same chain
    assert fed == []
    node_ledger(State([*receipts, receipt(9, 4, LEASE, 0.25)])).feed_receipts()  # and one more receipt
    assert fed == [[(LEASE, 4, 0.25)]]
    fed.clear()
    node_ledger(State(receipts, salt="x")).feed_receipts()  # another chain at the noted place: all again
    assert fed == [[(LEASE, 1, 0.5), (OTHER, 3, None)]]
    assert store.totals(LEASE) == (2, 0.75) and store.totals(OTHER) == (1, 0.0)
