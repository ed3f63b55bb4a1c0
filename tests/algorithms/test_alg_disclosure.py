"""Disclosure control in the SDK: the node's limits read from the environment, counts checked with
`require_min_cells`, and structured results checked before they are written, in the wrapper (a real
`python -m vfed.algorithms` process) and in LocalClient, on each example: small cells refused, the rest
released."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from alg_helpers import EXAMPLES, example, partitions, run_wrapper

from vfed.algorithms import (
    DisclosureError,
    Parts,
    SubtaskFailed,
    federated,
    min_cell_count,
    require_min_cells,
)
from vfed.algorithms.disclosure import max_glm_saturation
from vfed.algorithms.testing import LocalClient
from vfed.common.payload import AlgorithmError, decode_result

summary_stats = example("summary_stats")
federated_glm = example("federated_glm")
dp_stats = example("dp_stats")


def _csv(tmp_path: object, frame: pd.DataFrame) -> dict[str, str]:
    from pathlib import Path

    path = Path(str(tmp_path)) / "data.csv"
    frame.to_csv(path, index=False)
    return {"DATASETS": "default", "DATASET_DEFAULT_URI": str(path), "DATASET_DEFAULT_TYPE": "csv"}


def test_limits_are_read_like_min_rows() -> None:
    assert min_cell_count({}) == 5
    assert min_cell_count({"VFED_MIN_CELL_COUNT": " 3 "}) == 3
    for bad in ("three", "-1", "2.5"):
        with pytest.raises(ValueError, match="VFED_MIN_CELL_COUNT"):
            min_cell_count({"VFED_MIN_CELL_COUNT": bad})
    assert max_glm_saturation({}) == 0.33
    assert max_glm_saturation({"VFED_MAX_GLM_SATURATION": "0.2"}) == 0.2
    for bad in ("0", "1.5", "nan", "x"):
        with pytest.raises(ValueError, match="VFED_MAX_GLM_SATURATION"):
            max_glm_saturation({"VFED_MAX_GLM_SATURATION": bad})


def test_require_min_cells_allows_zero_and_refuses_one_to_limit_minus_one() -> None:
    require_min_cells({"a": 0, "b": 5, "c": 500}, "the table", limit=5)
    require_min_cells([0, 7], "the bins", limit=5)
    refused = r"a cell of the table has 4 records.*VFED_MIN_CELL_COUNT=5"
    with pytest.raises(DisclosureError, match=refused) as caught:
        require_min_cells({"a": 4, "b": 50}, "the table", limit=5)
    assert caught.value.rule == "min-cell-count"
    require_min_cells([1, 2], "anything", limit=0)  # 0 turns the check off


SUMMARY = [EXAMPLES / "summary_stats"]


def test_the_wrapper_refuses_small_cells_with_exit_3(tmp_path: object) -> None:
    frame = partitions()[0]
    env = _csv(tmp_path, frame)
    youngest = sorted(frame["age"])
    edges = {"age": [0.0, (youngest[2] + youngest[3]) / 2, 200.0]}  # the first bin: the 3 youngest
    task = {"method": "partial_histogram", "kwargs": {"edges": edges}}
    process, output = run_wrapper(tmp_path, task, env, "summary_stats", SUMMARY)  # type: ignore[arg-type]
    assert process.returncode == 3, process.stderr
    with pytest.raises(AlgorithmError, match=r"min-cell-count.*part 'age'") as caught:
        decode_result(output or b"")
    assert caught.value.type == "DisclosureError"
    counts = np.histogram(frame["age"], bins=edges["age"])[0]
    assert 0 < counts.min() < 5, "the test's data must have a small bin"
    lenient = {**env, "VFED_MIN_CELL_COUNT": str(int(counts.min()))}
    process, output = run_wrapper(tmp_path, task, lenient, "summary_stats", SUMMARY)  # type: ignore[arg-type]
    assert process.returncode == 0, process.stderr
    assert decode_result(output or b"") == {"age": counts.tolist()}


def test_the_wrapper_refuses_a_dp_part_the_node_charged_nothing_for(tmp_path: object) -> None:
    env = _csv(tmp_path, partitions()[0])
    task = {"method": "dp_count", "kwargs": {"epsilon": 0.5}}
    path = [EXAMPLES / "dp_stats"]
    process, output = run_wrapper(tmp_path, task, env, "dp_stats", path)  # type: ignore[arg-type]
    assert process.returncode == 3
    with pytest.raises(AlgorithmError, match="dp-budget"):
        decode_result(output or b"")
    granted = {**env, "VFED_EPSILON_GRANTED": "0.5"}
    process, output = run_wrapper(tmp_path, task, granted, "dp_stats", path)  # type: ignore[arg-type]
    assert process.returncode == 0, process.stderr
    assert decode_result(output or b"")["epsilon"] == 0.5


def _client(module: object, frames: list[pd.DataFrame], **limits: object) -> LocalClient:
    return LocalClient(module, {i + 1: {"default": f} for i, f in enumerate(frames)}, **limits)  # type: ignore[arg-type]


def test_summary_with_small_bins_is_refused_and_coarse_bins_pass() -> None:
    frames = partitions()
    with pytest.raises(SubtaskFailed, match=r"min-cell-count"):
        summary_stats.summary(_client(summary_stats, frames), columns=["age"], bins=10)
    result = summary_stats.summary(_client(summary_stats, frames), columns=["age"], bins=2)
    pooled = pd.concat(frames)["age"]
    assert result["columns"]["age"]["histogram"]["counts"] == np.histogram(pooled, bins=2)[0].tolist()


def test_summary_refuses_a_column_with_a_few_missing_values() -> None:
    frames = partitions()
    frames[1].loc[frames[1].index[:3], "age"] = np.nan  # 3 missing at organization 2: a small count
    with pytest.raises(SubtaskFailed, match=r"min-cell-count: part 'age'|min-cell-count\): part 'age'"):
        summary_stats.summary(_client(summary_stats, frames), columns=["age"], bins=2)


def test_glm_saturation_refuses_too_many_parameters_for_the_rows() -> None:
    rng = np.random.default_rng(5)
    frames = []
    for _ in range(2):
        frame = pd.DataFrame(rng.normal(size=(12, 4)), columns=["a", "b", "c", "d"])
        frame["y"] = frame["a"] + rng.normal(size=12)
        frames.append(frame)
    predictors = ["a", "b", "c", "d"]  # 5 parameters over 12 rows: 0.42 per row
    with pytest.raises(SubtaskFailed, match="glm-saturation"):
        federated_glm.glm(_client(federated_glm, frames), outcome="y", predictors=predictors, family="linear")
    lenient = _client(federated_glm, frames, max_glm_saturation=0.5)
    result = federated_glm.glm(lenient, outcome="y", predictors=predictors, family="linear")
    assert set(result["coefficients"]) == {"(intercept)", *predictors}
    fit = federated_glm.glm(_client(federated_glm, frames), outcome="y", predictors=["a"], family="linear")
    assert fit["n"] == 24


def test_dp_parts_pass_locally_with_their_declared_epsilon() -> None:
    result = dp_stats.dp_total(_client(dp_stats, partitions()), statistic="count", epsilon=1.0)
    assert result["epsilon_per_dataset"] == 1.0 and result["value"] > 0


def test_a_plain_result_of_a_function_that_reads_data_is_unchecked() -> None:
    import types

    module = types.ModuleType("plain_algorithm")

    @federated(datasets=["default"])
    def rows(df: pd.DataFrame) -> list[float]:
        return df["age"].tolist()  # raw values: exactly what disclosure control is for

    @federated(datasets=["default"])
    def checked(df: pd.DataFrame) -> Parts:
        from vfed.algorithms import Aggregate

        return Parts(age=Aggregate(n=len(df), value={"mean": float(df["age"].mean())}))

    module.rows = rows  # type: ignore[attr-defined]
    module.checked = checked  # type: ignore[attr-defined]
    client = _client(module, partitions()[:1])
    with pytest.raises(SubtaskFailed, match="unchecked-output"):
        client.run_subtask("rows", organizations=[1])
    [released] = client.run_subtask("checked", organizations=[1])
    assert released["age"]["n"] == 120
    allowed = _client(module, partitions()[:1], unchecked_outputs="allow")
    assert len(allowed.run_subtask("rows", organizations=[1])[0]) == 120
