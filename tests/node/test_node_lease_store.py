"""The node's lease reservations (node/vfed/node/lease_store.py) on a real SQLite file, and the `ledger`
doorbell ring; no server, no Docker."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from vfed.common.ledger import NoValidLease
from vfed.node.doorbell import parse
from vfed.node.lease_store import Candidate, LeaseStore

LEASE = "a" * 64
DATASET = "d" * 64


def reserve(store: LeaseStore, run_id: int, epsilon: float | None = None, **terms: object) -> None:
    candidate = Candidate(
        LEASE,
        DATASET,
        terms.get("max_runs"),  # type: ignore[arg-type]
        terms.get("epsilon_cap"),  # type: ignore[arg-type]
        terms.get("ledger_runs", {}),  # type: ignore[arg-type]
    )
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
    reserve(store, 1, max_runs=2, ledger_runs={1: 0.0})  # its own receipt is on the ledger already
    reserve(store, 2, max_runs=2, ledger_runs={1: 0.0})
    with pytest.raises(NoValidLease, match="exhausted"):
        reserve(store, 3, max_runs=2, ledger_runs={1: 0.0})
    assert store.release("srv:2") and not store.facts("srv:2")
    reserve(store, 3, max_runs=2, ledger_runs={1: 0.0})  # run 2 never started: its place is free again


def test_epsilon_caps_count_what_was_reserved_and_refuse_undeclared_methods(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path / "l.sqlite3")
    reserve(store, 1, 0.4, epsilon_cap=1.0, ledger_runs={9: 0.3})
    with pytest.raises(NoValidLease, match="epsilon cap is spent"):
        reserve(store, 2, 0.4, epsilon_cap=1.0, ledger_runs={9: 0.3})
    reserve(store, 3, 0.3, epsilon_cap=1.0, ledger_runs={9: 0.3})
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
