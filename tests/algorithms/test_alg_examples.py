"""The example algorithms in-process: federated partials on three organizations' partitions, combined
centrally through `LocalClient`, equal the pooled computation on the concatenated data."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from alg_helpers import example, partitions

from vfed.algorithms import SubtaskFailed
from vfed.algorithms.testing import LocalClient
from vfed.common.payload import decode_result, encode_result

summary_stats = example("summary_stats")
federated_glm = example("federated_glm")
dp_stats = example("dp_stats")


def _client(
    module: object, frames: list[pd.DataFrame], min_rows: int = 10, min_cell_count: int = 5
) -> LocalClient:
    datasets = {i + 1: {"default": f} for i, f in enumerate(frames)}
    return LocalClient(module, datasets, min_rows=min_rows, min_cell_count=min_cell_count)  # type: ignore[arg-type]


def _released(value: object) -> Any:
    """What a federated function's result is once released: the structured parts decoded."""
    return decode_result(encode_result(value))


ARITHMETIC = 0
"""min_cell_count for tests of the pooled arithmetic: equal-width bins over three organizations' normal data
hold a few records in their tails, which disclosure control refuses (test_alg_disclosure tests that)."""


# --- summary statistics ----------------------------------------------------------------------------------


def test_summary_equals_pooled_statistics() -> None:
    frames = partitions()
    pooled = pd.concat(frames, ignore_index=True)
    result = summary_stats.summary(_client(summary_stats, frames, min_cell_count=ARITHMETIC), bins=8)
    assert result["organizations"] == [1, 2, 3]
    for name in ("age", "bmi", "cost", "event"):
        column, got = pooled[name].dropna(), result["columns"][name]
        assert got["rows"] == len(pooled)
        assert got["missing"] == int(pooled[name].isna().sum())
        assert got["count"] == len(column)
        assert got["mean"] == pytest.approx(column.mean(), rel=1e-12)
        assert got["variance"] == pytest.approx(column.var(ddof=1), rel=1e-10)
        assert (got["min"], got["max"]) == (column.min(), column.max())
        expected_counts, expected_edges = np.histogram(column, bins=8)
        assert got["histogram"]["counts"] == expected_counts.tolist()
        np.testing.assert_allclose(got["histogram"]["edges"], expected_edges, rtol=1e-12)
    site = result["columns"]["site"]
    assert site == {
        "rows": len(pooled),
        "missing": 0,
        "count": len(pooled),
        "levels": {"site-0": 120, "site-1": 80, "site-2": 200},
        "suppressed": 0,
    }


def test_summary_with_fixed_edges_takes_them() -> None:
    frames = partitions(seed=3)
    pooled = pd.concat(frames, ignore_index=True)
    edges = {"age": [0.0, 30.0, 45.0, 60.0, 120.0]}
    client = _client(summary_stats, frames, min_cell_count=ARITHMETIC)
    result = summary_stats.summary(client, columns=["age", "bmi"], edges=edges)
    assert (
        result["columns"]["age"]["histogram"]["counts"]
        == np.histogram(pooled["age"], bins=edges["age"])[0].tolist()
    )
    assert "histogram" not in result["columns"]["bmi"]
    assert set(result["columns"]) == {"age", "bmi"}


def test_summary_runs_two_rounds_with_agreed_edges() -> None:
    client = _client(summary_stats, partitions(), min_cell_count=ARITHMETIC)
    summary_stats.summary(client, columns=["age"], bins=4)
    methods = [task_input.method for _, task_input in client.created]
    assert methods == ["partial_stats"] * 3 + ["partial_histogram"] * 3
    edges = {tuple(task_input.kwargs["edges"]["age"]) for _, task_input in client.created[3:]}
    assert len(edges) == 1, "every organization must bin with the same edges"


def test_summary_refuses_a_column_with_too_few_values() -> None:
    frames = partitions()
    frames[1].loc[frames[1].index[5:], "cost"] = np.nan  # 5 values left at organization 2
    with pytest.raises(SubtaskFailed, match=r"DisclosureError: column 'cost' \(non-missing\) has 5 records"):
        summary_stats.summary(_client(summary_stats, frames), columns=["cost"])


def test_summary_refuses_a_small_dataset() -> None:
    frames = partitions(sizes=(50, 6, 50))
    with pytest.raises(SubtaskFailed) as caught:
        summary_stats.summary(_client(summary_stats, frames))
    assert caught.value.run.organization_id == 2
    assert "dataset 'default' has 6 records; this node shares aggregates over at least 10" in str(
        caught.value
    )


def test_partial_stats_on_one_partition_matches_pandas() -> None:
    frame = partitions()[0]
    part = _released(summary_stats.partial_stats(frame, columns=["bmi"]))["bmi"]
    bmi = frame["bmi"].dropna()
    assert part["n"] == len(bmi) and part["missing"] == frame["bmi"].isna().sum()
    assert part["m2"] == pytest.approx(((bmi - bmi.mean()) ** 2).sum())


# --- federated GLM -----------------------------------------------------------------------------------------


def _pooled_design(
    frames: list[pd.DataFrame], outcome: str, predictors: list[str]
) -> tuple[pd.Series, pd.DataFrame]:
    pooled = pd.concat(frames, ignore_index=True)[[outcome, *predictors]].dropna()
    return pooled[outcome], sm.add_constant(pooled[predictors])


def test_logistic_regression_equals_pooled_statsmodels() -> None:
    frames = partitions()
    predictors = ["age", "bmi"]
    result = federated_glm.glm(_client(federated_glm, frames), outcome="event", predictors=predictors)
    y, x = _pooled_design(frames, "event", predictors)
    reference = sm.Logit(y, x).fit(method="newton", tol=1e-14, maxiter=100, disp=0)
    got = [result["coefficients"][name] for name in ["(intercept)", *predictors]]
    np.testing.assert_allclose(got, reference.params.to_numpy(), rtol=0, atol=1e-6)
    errors = [result["standard_errors"][name] for name in ["(intercept)", *predictors]]
    np.testing.assert_allclose(errors, reference.bse.to_numpy(), rtol=1e-6)
    assert result["loglik"] == pytest.approx(reference.llf, rel=1e-9)
    assert result["n"] == len(y) and result["converged"] and result["iterations"] < 15


def test_linear_regression_equals_pooled_statsmodels() -> None:
    frames = partitions(seed=11)
    predictors = ["age", "bmi"]
    client = _client(federated_glm, frames)
    result = federated_glm.glm(client, outcome="cost", predictors=predictors, family="linear")
    y, x = _pooled_design(frames, "cost", predictors)
    reference = sm.OLS(y, x).fit()
    got = [result["coefficients"][name] for name in ["(intercept)", *predictors]]
    np.testing.assert_allclose(got, reference.params.to_numpy(), rtol=0, atol=1e-6)
    errors = [result["standard_errors"][name] for name in ["(intercept)", *predictors]]
    np.testing.assert_allclose(errors, reference.bse.to_numpy(), rtol=1e-8)
    assert result["rss"] == pytest.approx(reference.ssr, rel=1e-9)
    assert result["iterations"] == 2, "Newton on a quadratic converges in one step (plus the check)"
    methods = [task_input.method for _, task_input in client.created]
    assert methods == ["partial_levels"] * 3 + ["partial_glm"] * 6, "a round for the levels, then Newton's"
    rounds = {task_input.kwargs["beta"][0] for _, task_input in client.created[3:]}
    assert len(rounds) == 2


def test_glm_without_intercept() -> None:
    frames = partitions(seed=5)
    result = federated_glm.glm(
        _client(federated_glm, frames), outcome="cost", predictors=["age"], family="linear", intercept=False
    )
    pooled = pd.concat(frames)
    reference = sm.OLS(pooled["cost"], pooled[["age"]]).fit()
    assert result["coefficients"] == {"age": pytest.approx(reference.params["age"], abs=1e-6)}


def test_glm_refuses_a_non_binary_outcome() -> None:
    with pytest.raises(SubtaskFailed, match="needs a 0/1 outcome"):
        federated_glm.glm(_client(federated_glm, partitions()), outcome="cost", predictors=["age"])


def test_glm_applies_disclosure_control_after_dropping_incomplete_records() -> None:
    frames = partitions()
    frames[0].loc[frames[0].index[4:], "bmi"] = np.nan
    with pytest.raises(SubtaskFailed, match="complete records for the model has 4 records"):
        federated_glm.glm(_client(federated_glm, frames), outcome="event", predictors=["age", "bmi"])


# --- differential privacy ----------------------------------------------------------------------------------


def test_laplace_noise_has_the_laplace_distribution() -> None:
    from scipy import stats  # type: ignore[import-untyped]

    rng = np.random.default_rng(2024)
    draws = np.array([dp_stats.laplace_noise(2.0, rng) for _ in range(4000)])
    assert stats.kstest(draws, stats.laplace(scale=2.0).cdf).pvalue > 0.01
    assert draws.var() == pytest.approx(2 * 2.0**2, rel=0.1)


def test_dp_count_and_sum_are_noisy_but_close() -> None:
    frames = partitions()
    pooled = pd.concat(frames)
    client = _client(dp_stats, frames)
    count = dp_stats.dp_total(client, statistic="count", epsilon=1.0)
    # Three Laplace(1) draws: beyond 60 has probability below 1e-20.
    assert abs(count["value"] - len(pooled)) < 60 and count["value"] != len(pooled)
    assert count["variance"] == pytest.approx(3 * 2.0)
    total = dp_stats.dp_total(client, statistic="sum", epsilon=0.5, column="age", lower=0, upper=100)
    assert abs(total["value"] - pooled["age"].clip(0, 100).sum()) < 60 * 200
    assert {task_input.kwargs["epsilon"] for _, task_input in client.created} == {1.0, 0.5}


def test_dp_sum_clips_to_the_declared_range() -> None:
    frame = pd.DataFrame({"x": [1000.0] * 20})
    released = _released(dp_stats.dp_sum(frame, column="x", lower=0, upper=10, epsilon=1e9))
    assert released["value"] == pytest.approx(200.0, abs=1e-6)
    assert released["sensitivity"] == 10 and released["scale"] == pytest.approx(1e-8)


def test_dp_functions_declare_their_epsilon_in_the_manifest() -> None:
    from vfed.algorithms.decorators import manifest_of

    manifest = manifest_of(dp_stats)
    assert manifest.functions["dp_count"].epsilon_kwarg == "epsilon"
    assert manifest.functions["dp_sum"].epsilon_kwarg == "epsilon"
    assert manifest.functions["dp_total"].kind == "central"
    assert manifest.functions["dp_total"].epsilon_kwarg is None


@pytest.mark.parametrize("epsilon", [0, -1, None, "1"])
def test_dp_refuses_a_bad_epsilon(epsilon: object) -> None:
    with pytest.raises(SubtaskFailed, match="EpsilonError"):
        dp_stats.dp_total(_client(dp_stats, partitions()), statistic="count", epsilon=epsilon)


def test_local_client_reports_disclosure_errors_from_the_dataset_check() -> None:
    frames = partitions(sizes=(30, 30, 30))
    with pytest.raises(SubtaskFailed, match="DisclosureError"):
        dp_stats.dp_total(_client(dp_stats, frames, min_rows=31), statistic="count", epsilon=1.0)
