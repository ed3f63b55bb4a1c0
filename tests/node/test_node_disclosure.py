"""The node's disclosure control on a stopped run's output, before sealing: the rules a run is held to (the
node's limits, a dataset's own, the image policy's `unchecked_outputs`), and the verdict on the bytes the
algorithm left, fed here as real files in a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vfed.common.disclosure import DP, Aggregate, Counts, Histogram, Model, Parts
from vfed.common.payload import encode_result
from vfed.node import disclosure
from vfed.node.config import NodeSettings, parse_settings
from vfed.node.disclosure import OutputRules, environment, judge, rules_for
from vfed.node.journal import Journal
from vfed.node.policy import check_run
from vfed.node.runtime.base import OUTPUT_NAME

MAX_BYTES = 1 << 30


def _settings(**extra: object) -> NodeSettings:
    base: dict[str, object] = {
        "api_key": "a.b",
        "data_dir": "/tmp/unused",
        "datasets": {
            "patients": {"uri": "/data/p.csv", "min_cell_count": 10, "max_glm_saturation": 0.1},
            "visits": {"uri": "/data/v.csv", "min_rows": 50},
        },
    }
    return parse_settings({**base, **extra})


def _rules(datasets: list[str], unchecked: bool = False, epsilon: float | None = None) -> OutputRules:
    return rules_for(_settings(), datasets, unchecked, epsilon)


def _output(tmp_path: Path, data: bytes) -> Path:
    (tmp_path / OUTPUT_NAME).write_bytes(data)
    return tmp_path


def test_the_strictest_limits_of_the_datasets_a_run_reads_apply() -> None:
    assert (_rules([]).min_rows, _rules([]).min_cell_count, _rules([]).max_glm_saturation) == (10, 5, 0.33)
    both = _rules(["patients", "visits"])
    assert (both.min_rows, both.min_cell_count, both.max_glm_saturation) == (50, 10, 0.1)
    assert environment(_settings(), ["patients", "visits"]) == {
        "VFED_MIN_ROWS": "50",
        "VFED_MIN_CELL_COUNT": "10",
        "VFED_MAX_GLM_SATURATION": "0.1",
    }


def test_rules_survive_the_journal(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    rules = _rules(["patients"], unchecked=True, epsilon=0.5)
    journal.claimed(7, 1, 1)
    journal.started(7, "docker:x", 0.0, rules.to_json())
    entry = journal.get(7)
    assert entry is not None and entry.output_rules is not None
    assert OutputRules.from_json(entry.output_rules) == rules
    journal.close()


@pytest.mark.parametrize(
    ("value", "datasets", "reason"),
    [
        (Counts(cells={"a": 12, "b": 7}), ["patients"], "disclosure-refused: min-cell-count"),
        (Counts(cells={"a": 12, "b": 7, "c": 0}), ["visits"], None),
        (Counts(cells={"a": 12, "b": 3}), ["visits"], "disclosure-refused: min-cell-count"),
        (Parts(h=Histogram(edges=[0, 1, 2], counts=[7, 8])), ["visits"], None),
        (
            Parts(h=Histogram(edges=[0, 1, 2], counts=[7, 8])),
            ["patients"],
            "disclosure-refused: min-cell-count",
        ),
        (Aggregate(n=40, value=1.0), ["visits"], "disclosure-refused: min-rows"),
        (Aggregate(n=40, value=1.0), ["patients"], None),
        (Model(n=20, parameters=3, values={}), ["patients"], "disclosure-refused: glm-saturation"),
        (Model(n=30, parameters=3, values={}), ["patients"], None),
        (DP(epsilon=1.0, value=3.2), ["patients"], "disclosure-refused: dp-budget"),
        ({"plain": [1, 2, 3]}, ["patients"], "disclosure-refused: unchecked-output"),
        ({"plain": [1, 2, 3]}, [], None),  # read no dataset of this node: nothing of it to disclose
        (Counts(cells={"a": 1}), [], None),
    ],
)
def test_verdicts(tmp_path: Path, value: object, datasets: list[str], reason: str | None) -> None:
    refusal = judge(_output(tmp_path, encode_result(value)), _rules(datasets), MAX_BYTES)
    assert (refusal.reason if refusal else None) == reason


def test_refusals_carry_the_rule_and_never_the_data(tmp_path: Path) -> None:
    value = Parts({"diagnosis (Ann Smith)": Counts(cells={"rare disease X": 2, "flu": 40})})
    refusal = judge(_output(tmp_path, encode_result(value)), _rules(["visits"]), MAX_BYTES)
    assert refusal is not None
    assert refusal.reason == "disclosure-refused: min-cell-count"
    assert "Ann" in refusal.detail  # the node's log names the part; the reason does not
    assert "Ann" not in refusal.reason and "rare" not in refusal.reason and "2" not in refusal.reason


def test_unchecked_outputs_pass_where_the_policy_allows_them(tmp_path: Path) -> None:
    import pandas as pd

    plain = encode_result(pd.DataFrame({"x": [1, 2]}))
    assert judge(_output(tmp_path, plain), _rules(["visits"], unchecked=True), MAX_BYTES) is None
    refusal = judge(_output(tmp_path, plain), _rules(["visits"]), MAX_BYTES)
    assert refusal is not None and refusal.reason == "disclosure-refused: unchecked-output"
    # structured parts are checked even where unchecked outputs are allowed
    small = encode_result(Counts(cells=[2]))
    refusal = judge(_output(tmp_path, small), _rules(["visits"], unchecked=True), MAX_BYTES)
    assert refusal is not None and refusal.reason == "disclosure-refused: min-cell-count"


def test_malformed_and_oversized_structured_outputs(tmp_path: Path) -> None:
    lie = {
        "vfed": 1,
        "format": "parts",
        "parts": {"m": {"kind": "model", "n": 99, "parameters": 1, "values": {"rows": [1, 2]}}},
    }
    refusal = judge(_output(tmp_path, json.dumps(lie).encode()), _rules(["visits"]), MAX_BYTES)
    assert refusal is not None and refusal.reason == "bad-output: malformed structured output"
    big = encode_result(Counts(cells=[50] * 1000))
    small_limit = OutputRules(True, 10, 5, 0.33, False, len(big) - 1)
    refusal = judge(_output(tmp_path, big), small_limit, MAX_BYTES)
    assert refusal is not None and refusal.reason == "disclosure-refused: unchecked-output"


def test_the_image_rule_decides_about_unchecked_outputs() -> None:
    settings = _settings(
        policies={
            "allowed_images": [{"image": "lab/*", "unchecked_outputs": "allow"}, "vfed-examples/*"],
        }
    )
    allowed = check_run(settings, image="lab/x", digest=None, initiators=[(1, 1)])
    assert allowed.allowed and allowed.unchecked_outputs
    example = check_run(settings, image="vfed-examples/y", digest=None, initiators=[(1, 1)])
    assert example.allowed and not example.unchecked_outputs
    node_wide = _settings(policies={"unchecked_outputs": "allow"})
    assert check_run(node_wide, image="any", digest=None, initiators=[(1, 1)]).unchecked_outputs
    assert not check_run(_settings(), image="any", digest=None, initiators=[(1, 1)]).unchecked_outputs


def test_a_run_journaled_without_rules_gets_the_strictest() -> None:
    rules = disclosure.fallback_rules(_settings())
    assert rules.reads_data and not rules.unchecked_allowed and rules.epsilon is None
    assert (rules.min_rows, rules.min_cell_count, rules.max_glm_saturation) == (50, 10, 0.1)


def test_a_journal_of_an_older_agent_gains_the_rules_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "journal.sqlite3"
    with sqlite3.connect(path) as old:  # the runs table as agents before disclosure control made it
        old.execute(
            "CREATE TABLE runs (run_id INTEGER PRIMARY KEY, task_id INTEGER NOT NULL,"
            " job_id INTEGER NOT NULL, stage TEXT NOT NULL, handle TEXT, exit_code INTEGER, reason TEXT,"
            " final_status TEXT,"
            " result_blob_id TEXT, deadline REAL, updated_at REAL NOT NULL)"
        )
        old.execute("INSERT INTO runs VALUES (3, 1, 1, 'started', 'docker:x', NULL, NULL, NULL, NULL, 0, 0)")
    journal = Journal(path)
    entry = journal.get(3)
    assert entry is not None and entry.output_rules is None  # judged by fallback_rules
    journal.started(3, "docker:x", 0.0, _rules(["visits"]).to_json())
    entry = journal.get(3)
    assert entry is not None and OutputRules.from_json(entry.output_rules or "").min_rows == 50
    journal.close()
