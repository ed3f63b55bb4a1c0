"""The node's privacy budget ledger (node/vfed/node/privacy.py) on a real SQLite file."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from alg_helpers import example

from vfed.algorithms.decorators import manifest_of
from vfed.common.manifest import Manifest
from vfed.common.payload import TaskInput
from vfed.node.privacy import BudgetRefused, BudgetStore, authorize, parse_manifest

DP_MANIFEST = manifest_of(example("dp_stats"))
SUMMARY_MANIFEST = manifest_of(example("summary_stats"))


def _count(epsilon: object) -> TaskInput:
    return TaskInput(method="dp_count", kwargs={"epsilon": epsilon})


def test_charges_until_the_budget_is_spent_then_refuses(tmp_path: Path) -> None:
    ledger = BudgetStore(tmp_path / "privacy.sqlite")
    budgets = {"default": 1.0}
    for run in ("r1", "r2", "r3"):
        ledger.charge(run, ["default"], 0.3, budgets, initiator="org 7")
    assert ledger.spent("default") == pytest.approx(0.9)
    with pytest.raises(BudgetRefused) as caught:
        ledger.charge("r4", ["default"], 0.3, budgets)
    assert str(caught.value) == (
        "privacy budget of dataset 'default' exhausted: 0.9 of 1 epsilon spent, this run asks 0.3 (0.1 left)"
    )
    ledger.charge("r5", ["default"], 0.1, budgets)  # exactly the rest still fits
    assert ledger.spent("default") == pytest.approx(1.0)
    assert [c.run_id for c in ledger.charges("default")] == ["r1", "r2", "r3", "r5"]
    assert ledger.charges()[0].initiator == "org 7"


def test_spending_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "node" / "privacy.sqlite"
    BudgetStore(path).charge("r1", ["a"], 0.8, {"a": 1.0})
    restarted = BudgetStore(path)
    assert restarted.spent("a") == pytest.approx(0.8)
    with pytest.raises(BudgetRefused, match="exhausted"):
        restarted.charge("r2", ["a"], 0.5, {"a": 1.0})


def test_charging_a_run_again_costs_nothing_more(tmp_path: Path) -> None:
    ledger = BudgetStore(tmp_path / "p.sqlite")
    first = ledger.charge("r1", ["a"], 0.4, {"a": 1.0})
    again = ledger.charge("r1", ["a"], 0.4, {"a": 1.0})
    assert first == again and ledger.spent("a") == pytest.approx(0.4)


def test_all_datasets_or_none(tmp_path: Path) -> None:
    ledger = BudgetStore(tmp_path / "p.sqlite")
    budgets = {"a": 5.0, "b": 1.0}
    ledger.charge("r1", ["b"], 0.9, budgets)
    with pytest.raises(BudgetRefused, match="dataset 'b' exhausted"):
        ledger.charge("r2", ["a", "b"], 0.5, budgets)
    assert ledger.spent("a") == 0.0, "a refused run charges nothing on any dataset"


def test_a_dataset_without_budget_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BudgetRefused, match="dataset 'x' has no privacy budget configured"):
        BudgetStore(tmp_path / "p.sqlite").charge("r", ["x"], 0.1, {})


def test_concurrent_runs_cannot_overspend(tmp_path: Path) -> None:
    """Ten threads, each with its own connection, race for a budget that fits four charges."""
    ledger = BudgetStore(tmp_path / "p.sqlite")
    ledger.spent("d")  # create the schema before the race
    outcomes: list[bool] = []
    barrier = threading.Barrier(10)

    def attempt(index: int) -> None:
        barrier.wait()
        try:
            BudgetStore(ledger.path).charge(f"run-{index}", ["d"], 0.25, {"d": 1.0})
            outcomes.append(True)
        except BudgetRefused:
            outcomes.append(False)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(True) == 4 and outcomes.count(False) == 6
    assert ledger.spent("d") == pytest.approx(1.0)


def test_authorize_charges_the_declared_epsilon(tmp_path: Path) -> None:
    ledger = BudgetStore(tmp_path / "p.sqlite")
    granted = authorize(
        ledger,
        run_id="r1",
        task_input=_count(0.25),
        manifest=DP_MANIFEST,
        datasets=["default", "open"],
        budgets={"default": 1.0, "open": None},
    )
    assert granted == 0.25
    assert ledger.spent("default") == 0.25 and ledger.spent("open") == 0.0


def test_authorize_refuses_an_exhausted_budget_across_jobs(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite"
    for run in range(4):
        authorize(
            BudgetStore(path),
            run_id=f"job{run}",
            task_input=_count(0.5),
            manifest=DP_MANIFEST,
            datasets=["default"],
            budgets={"default": 2.0},
        )
    with pytest.raises(BudgetRefused, match=r"exhausted: 2 of 2 epsilon spent, this run asks 0\.5"):
        authorize(
            BudgetStore(path),
            run_id="job5",
            task_input=_count(0.5),
            manifest=DP_MANIFEST,
            datasets=["default"],
            budgets={"default": 2.0},
        )


def test_unbudgeted_datasets_need_no_declaration(tmp_path: Path) -> None:
    granted = authorize(
        BudgetStore(tmp_path / "p.sqlite"),
        run_id="r",
        task_input=TaskInput(method="partial_stats"),
        manifest=None,
        datasets=["default"],
        budgets={"default": None},
    )
    assert granted is None


@pytest.mark.parametrize(
    ("task_input", "manifest", "reason"),
    [
        (TaskInput(method="partial_stats"), SUMMARY_MANIFEST, "does not declare the epsilon it spends"),
        (_count(0.1), None, "does not declare the epsilon it spends"),
        (TaskInput(method="dp_count"), DP_MANIFEST, "keyword argument 'epsilon' (epsilon) is required"),
        (_count(-1), DP_MANIFEST, "must be a positive finite number"),
        (_count(True), DP_MANIFEST, "must be a number"),
        (_count("0.1"), DP_MANIFEST, "must be a number"),
    ],
)
def test_authorize_refusals_say_why(
    tmp_path: Path, task_input: TaskInput, manifest: Manifest | None, reason: str
) -> None:
    ledger = BudgetStore(tmp_path / "p.sqlite")
    with pytest.raises(BudgetRefused) as caught:
        authorize(
            ledger,
            run_id="r",
            task_input=task_input,
            manifest=manifest,
            datasets=["default"],
            budgets={"default": 1.0},
        )
    assert reason in str(caught.value)
    assert ledger.spent("default") == 0.0


def test_manifest_label_parsing() -> None:
    label = DP_MANIFEST.model_dump_json()
    assert parse_manifest(label) == DP_MANIFEST
    assert parse_manifest(None) is None and parse_manifest("") is None
    with pytest.raises(BudgetRefused, match="not a valid manifest"):
        parse_manifest("{broken")
    with pytest.raises(BudgetRefused, match="not a valid manifest"):
        parse_manifest(json.dumps({"functions": {"f": {"kind": "sideways"}}}))
