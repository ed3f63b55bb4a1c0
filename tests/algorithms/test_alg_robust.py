"""The example algorithms on awkward data, in-process over several organizations' DataFrames: collinear,
constant and categorical predictors, rare levels, perfectly separated outcomes, and categorical columns in
summary statistics under the cell rule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from alg_helpers import example, partitions

from vfed.algorithms import DisclosureError, SubtaskFailed, min_cell_count, require_min_cells
from vfed.algorithms.testing import LocalClient
from vfed.common.disclosure import as_document, decoded

federated_glm = example("federated_glm")
summary_stats = example("summary_stats")


def _client(module: object, frames: list[pd.DataFrame], min_cell_count: int = 5) -> LocalClient:
    """Organizations 1, 2, ... holding the frames, with the node's output check at `min_cell_count`."""
    datasets = {i + 1: {"default": f} for i, f in enumerate(frames)}
    return LocalClient(module, datasets, min_cell_count=min_cell_count)  # type: ignore[arg-type]


def _plain(value: object) -> Any:
    """What a federated function returned, as the central function receives it (structured parts decoded)."""
    document = as_document(value)
    return value if document is None else decoded(document)


def _regions(seed: int = 2) -> list[pd.DataFrame]:
    """Three organizations with a text predictor `region` (level "c" absent at the second) and a numeric
    code `stage` (integers at two organizations, floats with gaps at the third)."""
    frames = partitions(seed=seed)
    rng = np.random.default_rng(seed)
    for index, frame in enumerate(frames):
        n = len(frame)
        choices = ["a", "b"] if index == 1 else ["a", "b", "c"]
        frame["region"] = rng.choice(choices, size=n)
        frame["stage"] = rng.integers(1, 4, size=n)
        effect = frame["region"].map({"a": 0.0, "b": 150.0, "c": -300.0}) + 80.0 * frame["stage"]
        frame["cost"] = frame["cost"] + effect
        logit = -8 + 0.08 * frame["age"] + 0.12 * frame["bmi"] + 0.6 * (frame["region"] == "b")
        frame["event"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    frames[2]["stage"] = frames[2]["stage"].astype(float)
    frames[2].loc[frames[2].index[:7], "stage"] = np.nan
    return frames


def _pooled(
    frames: list[pd.DataFrame], outcome: str, predictors: list[str], reference: Mapping[str, str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The design of the concatenated data, encoded independently of the algorithm: pandas dummies of
    the categorical columns with the given reference dropped."""
    data = pd.concat(frames, ignore_index=True)[[outcome, *predictors]].dropna()
    parts, names = [np.ones(len(data))], ["(intercept)"]
    for name in predictors:
        if name in reference:
            labels = data[name].map(lambda v: str(int(v)) if isinstance(v, float) else str(v))
            dummies = pd.get_dummies(labels, dtype=float)
            for level in sorted(c for c in dummies.columns if c != reference[name]):
                parts.append(dummies[level].to_numpy())
                names.append(f"{name}[{level}]")
        else:
            parts.append(data[name].to_numpy(dtype=float))
            names.append(name)
    return np.column_stack(parts), data[outcome].to_numpy(dtype=float), names


def _logistic_irls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    beta = np.zeros(x.shape[1])
    for _ in range(50):
        p = 1 / (1 + np.exp(-(x @ beta)))
        step = np.linalg.solve(x.T @ (x * (p * (1 - p))[:, None]), x.T @ (y - p))
        beta = beta + step
        if np.abs(step).max() < 1e-12:
            break
    return beta


# --- collinearity ------------------------------------------------------------------------------------------


def test_an_exactly_collinear_column_is_named() -> None:
    frames = partitions()
    for frame in frames:
        frame["dose"] = frame["age"] + 2 * frame["bmi"]
    with pytest.raises(federated_glm.CollinearityError) as caught:
        federated_glm.glm(_client(federated_glm, frames), outcome="event", predictors=["age", "bmi", "dose"])
    assert str(caught.value) == "column 'dose' is a linear combination of 'age', 'bmi'"
    assert caught.value.aliased == {"dose": ["age", "bmi"]}


def test_a_nearly_collinear_column_is_named_and_a_merely_correlated_one_is_not() -> None:
    frames = partitions(seed=4)
    rng = np.random.default_rng(4)
    for frame in frames:
        frame["near"] = frame["age"] - frame["bmi"] + rng.normal(0, 1e-7, len(frame))
        frame["correlated"] = frame["age"] - frame["bmi"] + rng.normal(0, 1.0, len(frame))
    with pytest.raises(
        federated_glm.CollinearityError, match="'near' is a linear combination of 'age', 'bmi'"
    ):
        federated_glm.glm(
            _client(federated_glm, frames), outcome="cost", predictors=["age", "bmi", "near"], family="linear"
        )
    fit = federated_glm.glm(
        _client(federated_glm, frames),
        outcome="cost",
        predictors=["age", "bmi", "correlated"],
        family="linear",
    )
    assert fit["converged"] and set(fit["coefficients"]) == {"(intercept)", "age", "bmi", "correlated"}


def test_a_constant_column_is_named_unless_it_varies_somewhere() -> None:
    frames = partitions()
    for frame in frames:
        frame["unit"] = 7.0
        frame["zero"] = 0.0
    with pytest.raises(federated_glm.CollinearityError) as caught:
        federated_glm.glm(
            _client(federated_glm, frames), outcome="event", predictors=["age", "unit", "bmi", "zero"]
        )
    assert str(caught.value) == "column 'unit' is constant; column 'zero' is zero in every record"
    frames[1]["unit"] = 8.0  # constant at each organization, but not over the pooled data
    fit = federated_glm.glm(_client(federated_glm, frames), outcome="event", predictors=["age", "unit"])
    assert fit["converged"] and fit["warnings"] == []


def test_an_indicator_that_duplicates_a_level_is_named() -> None:
    frames = _regions()
    for frame in frames:
        frame["is_b"] = (frame["region"] == "b").astype(float)
    with pytest.raises(
        federated_glm.CollinearityError, match=r"column 'region\[b\]' is a linear combination of 'is_b'"
    ):
        federated_glm.glm(
            _client(federated_glm, frames), outcome="cost", predictors=["is_b", "region"], family="linear"
        )


# --- categorical predictors ---------------------------------------------------------------------------------


def test_categorical_predictors_equal_the_pooled_linear_fit() -> None:
    frames = _regions()
    client = _client(federated_glm, frames)
    fit = federated_glm.glm(
        client,
        outcome="cost",
        predictors=["age", "region", "stage"],
        family="gaussian",
        categorical=["stage"],
    )
    x, y, names = _pooled(frames, "cost", ["age", "region", "stage"], {"region": "a", "stage": "1"})
    expected, *_ = np.linalg.lstsq(x, y, rcond=None)
    assert list(fit["coefficients"]) == names == [
        "(intercept)", "age", "region[b]", "region[c]", "stage[2]", "stage[3]"
    ]  # fmt: skip
    np.testing.assert_allclose(list(fit["coefficients"].values()), expected, rtol=1e-9, atol=1e-6)
    pooled = pd.concat(frames, ignore_index=True).dropna(subset=["cost", "age", "region", "stage"])
    assert fit["levels"]["region"] == {
        "reference": "a",
        "counts": {level: int((pooled["region"] == level).sum()) for level in ("a", "b", "c")},
    }
    assert fit["levels"]["stage"]["counts"] == {str(s): int((pooled["stage"] == s).sum()) for s in (1, 2, 3)}
    # every organization encoded with the same agreed levels, the reference first
    agreed = [t.kwargs["levels"] for _, t in client.created if t.method == "partial_glm"]
    assert all(a == {"region": ["a", "b", "c"], "stage": ["1", "2", "3"]} for a in agreed)


def test_categorical_logistic_fit_with_a_chosen_reference_equals_pooled_irls() -> None:
    frames = _regions(seed=9)
    fit = federated_glm.glm(
        _client(federated_glm, frames),
        outcome="event",
        predictors=["age", "bmi", "region"],
        family="binomial",
        reference={"region": "b"},
    )
    x, y, names = _pooled(frames, "event", ["age", "bmi", "region"], {"region": "b"})
    assert list(fit["coefficients"]) == names and names[3:] == ["region[a]", "region[c]"]
    np.testing.assert_allclose(list(fit["coefficients"].values()), _logistic_irls(x, y), atol=1e-7, rtol=0)
    assert fit["converged"] and not fit["separation"] and fit["warnings"] == []
    assert fit["levels"]["region"]["reference"] == "b"


def test_without_an_intercept_the_first_categorical_keeps_every_level() -> None:
    frames = _regions(seed=6)
    fit = federated_glm.glm(
        _client(federated_glm, frames),
        outcome="cost",
        predictors=["age", "region", "stage"],
        family="linear",
        intercept=False,
        categorical=["stage"],
    )
    data = pd.concat(frames, ignore_index=True)[["cost", "age", "region", "stage"]].dropna()
    stage = data["stage"].astype(int)
    x = np.column_stack(
        [data["age"], *((data["region"] == r) for r in "abc"), *((stage == s) for s in (2, 3))]
    ).astype(float)
    expected, *_ = np.linalg.lstsq(x, data["cost"].to_numpy(), rcond=None)
    assert list(fit["coefficients"]) == [
        "age", "region[a]", "region[b]", "region[c]", "stage[2]", "stage[3]"
    ]  # fmt: skip
    np.testing.assert_allclose(list(fit["coefficients"].values()), expected, rtol=1e-9, atol=1e-6)
    assert fit["levels"]["region"]["reference"] is None and fit["levels"]["stage"]["reference"] == "1"


def test_a_categorical_predictor_with_one_level_is_constant() -> None:
    frames = _regions()
    for frame in frames:
        frame["country"] = "nl"
    with pytest.raises(federated_glm.CollinearityError, match=r"^column 'country' is constant$"):
        federated_glm.glm(
            _client(federated_glm, frames), outcome="cost", predictors=["age", "country"], family="linear"
        )
    with pytest.raises(ValueError, match=r"categorical columns that are not predictors: \['stage'\]"):
        federated_glm.glm(
            _client(federated_glm, frames), outcome="cost", predictors=["age"], categorical=["stage"]
        )


def test_an_unknown_reference_level_is_refused() -> None:
    with pytest.raises(ValueError, match="reference level 'z' of column 'region' is not one of its levels"):
        federated_glm.glm(
            _client(federated_glm, _regions()), outcome="cost", predictors=["region"], family="linear",
            reference={"region": "z"},
        )  # fmt: skip


def test_a_level_rarer_than_the_cell_minimum_is_refused_without_its_count() -> None:
    frames = _regions()
    frames[0].loc[frames[0].index[:4], "region"] = "d"  # 4 records of "d" at organization 1 only
    with pytest.raises(federated_glm.RareLevelError) as caught:
        federated_glm.glm(
            _client(federated_glm, frames), outcome="cost", predictors=["region"], family="linear"
        )
    message = str(caught.value)
    assert message == (
        "categorical predictor 'region' has a level rarer than the cell minimum at organization 1: "
        "combine or drop rare levels"
    )
    assert "4" not in message and "'d'" not in message
    frames[2].loc[frames[2].index[:2], "region"] = "e"
    with pytest.raises(federated_glm.RareLevelError, match="minimum at organizations 1, 3: combine"):
        federated_glm.glm(
            _client(federated_glm, frames), outcome="cost", predictors=["region"], family="linear"
        )
    assert isinstance(caught.value, DisclosureError), "the wrapper reports it as disclosure-refused"
    # what organization 1 released: no level counts at all (their sum would give the rare one away)
    released = _plain(federated_glm.partial_levels(frames[0], "cost", ["region"]))
    assert not released.pop("cells")  # no combination counted either
    assert released == {
        "n": len(frames[0]),
        "categorical": {"region": {"levels": {}, "rare": True}},
    }


def test_a_rare_combination_of_two_categorical_predictors_is_refused() -> None:
    frames = _regions()
    for frame in frames:
        frame["smoker"] = np.where(frame["region"] == "c", "no", np.where(frame.index % 2 == 0, "yes", "no"))
    frames[2].loc[frames[2].index[frames[2]["region"] == "c"][:3], "smoker"] = (
        "yes"  # 3 smokers in c at org 3
    )
    client = _client(federated_glm, frames)
    with pytest.raises(federated_glm.RareLevelError) as caught:
        federated_glm.glm(client, outcome="cost", predictors=["region", "smoker"], family="linear")
    assert str(caught.value) == (
        "the cross-classification of 'region' and 'smoker' has a cell rarer than the cell minimum at "
        "organization 3: combine or drop rare levels"
    )
    assert caught.value.cells == {("region", "smoker"): [3]} and caught.value.levels == {}
    # the node refuses the same cell when a central function skips the levels round
    with pytest.raises(DisclosureError, match="cross-classification of 'region' and 'smoker' has 3 records"):
        federated_glm.partial_glm(
            frames[2], "cost", ["region", "smoker"], [0.0] * 4, family="linear",
            levels={"region": ["a", "b", "c"], "smoker": ["no", "yes"]},
        )  # fmt: skip


def test_a_level_with_few_events_is_refused_in_a_logistic_model() -> None:
    frames = _regions()
    for frame in frames:
        frame["event"] = frame["event"].where(frame["region"] != "c", 0)
    frames[0].loc[frames[0].index[frames[0]["region"] == "c"][:2], "event"] = 1  # 2 events in c at org 1
    with pytest.raises(federated_glm.RareLevelError, match="cross-classification of 'event' and 'region'"):
        federated_glm.glm(_client(federated_glm, frames), outcome="event", predictors=["age", "region"])
    # a linear model of the same data releases sums over levels, not counts of the outcome: it runs
    fit = federated_glm.glm(
        _client(federated_glm, frames), outcome="event", predictors=["region"], family="linear"
    )
    assert fit["converged"]


def test_the_node_refuses_a_rare_level_even_when_asked_to_encode_it() -> None:
    frame = _regions()[0]
    frame.loc[frame.index[:4], "region"] = "d"
    with pytest.raises(DisclosureError, match="VFED_MIN_CELL_COUNT=5"):
        federated_glm.partial_glm(
            frame, "cost", ["region"], [0.0] * 4, family="linear", levels={"region": ["a", "b", "c", "d"]}
        )
    with pytest.raises(ValueError, match="column 'region' has a level outside the agreed levels"):
        federated_glm.partial_glm(
            frame, "cost", ["region"], [0.0] * 3, family="linear", levels={"region": ["a", "b", "c"]}
        )


def test_the_cell_minimum_is_the_nodes_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = _regions()
    frames[0].loc[frames[0].index[:4], "region"] = "d"
    monkeypatch.setenv("VFED_MIN_CELL_COUNT", "3")
    fit = federated_glm.glm(
        _client(federated_glm, frames, min_cell_count=3),
        outcome="cost",
        predictors=["region"],
        family="linear",
    )
    assert fit["levels"]["region"]["counts"]["d"] == 4 and "region[d]" in fit["coefficients"]


def test_an_undeclared_numeric_code_stays_numeric_and_booleans_are_categorical() -> None:
    frames = _regions()
    for frame in frames:
        frame["smoker"] = frame["bmi"].fillna(0) > 27
    fit = federated_glm.glm(
        _client(federated_glm, frames), outcome="cost", predictors=["stage", "smoker"], family="linear"
    )
    assert list(fit["coefficients"]) == ["(intercept)", "stage", "smoker[True]"]
    assert fit["levels"]["smoker"]["reference"] == "False"


# --- convergence and separation ----------------------------------------------------------------------------


def _separated(quasi: bool) -> list[pd.DataFrame]:
    rng = np.random.default_rng(3)
    frames = []
    for n in (60, 80, 70):
        x, z = rng.normal(0, 1, n), rng.normal(0, 1, n)
        if quasi:  # x > 1 always has the event; elsewhere the outcome depends on z
            y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
            y[x > 1] = 1
            frames.append(pd.DataFrame({"high": (x > 1).astype(float), "z": z, "y": y}))
        else:
            frames.append(pd.DataFrame({"x": x, "z": z, "y": (x > 0).astype(int)}))
    return frames


def test_perfect_separation_is_reported() -> None:
    fit = federated_glm.glm(
        _client(federated_glm, _separated(quasi=False)), outcome="y", predictors=["x", "z"]
    )
    assert fit["separation"] is True and fit["converged"] is False
    assert "x" in fit["diverging"]
    assert fit["warnings"][0].startswith(
        "(quasi-)perfect separation (fitted probabilities numerically 0 or 1): "
        "the maximum likelihood estimates do not exist; diverging: "
    )
    assert fit["warnings"][1].startswith("the fit did not converge in 25 iterations")


def test_quasi_complete_separation_names_the_diverging_coefficient() -> None:
    fit = federated_glm.glm(
        _client(federated_glm, _separated(quasi=True)), outcome="y", predictors=["high", "z"]
    )
    assert fit["separation"] is True and fit["converged"] is False
    assert fit["diverging"] == ["high"], "z and the intercept have finite estimates"
    assert abs(fit["deviance_change"]) < 1e-6


def test_convergence_is_reported() -> None:
    fit = federated_glm.glm(_client(federated_glm, partitions()), outcome="event", predictors=["age", "bmi"])
    assert fit["converged"] is True and fit["separation"] is False and fit["diverging"] == []
    assert 3 <= fit["iterations"] < 15 and fit["warnings"] == []
    assert abs(fit["deviance_change"]) < 1e-6 and fit["deviance"] == pytest.approx(-2 * fit["loglik"])
    short = federated_glm.glm(
        _client(federated_glm, partitions()), outcome="event", predictors=["age", "bmi"], max_iterations=2
    )
    assert short["converged"] is False and short["iterations"] == 2 and short["separation"] is False
    assert short["warnings"] == [
        f"the fit did not converge in 2 iterations (last deviance change {short['deviance_change']:.3g})"
    ]


def test_poisson_regression_equals_pooled_statsmodels() -> None:
    frames = _regions(seed=5)
    rng = np.random.default_rng(5)
    for frame in frames:
        frame["visits"] = rng.poisson(np.exp(0.5 + 0.01 * frame["age"] + 0.3 * (frame["region"] == "c")))
    fit = federated_glm.glm(
        _client(federated_glm, frames), outcome="visits", predictors=["age", "region"], family="poisson"
    )
    x, y, _ = _pooled(frames, "visits", ["age", "region"], {"region": "a"})
    reference = sm.GLM(y, x, family=sm.families.Poisson()).fit(tol=1e-14)
    np.testing.assert_allclose(list(fit["coefficients"].values()), reference.params, atol=1e-7, rtol=0)
    np.testing.assert_allclose(list(fit["standard_errors"].values()), reference.bse, rtol=1e-6)
    assert fit["deviance"] == pytest.approx(reference.deviance, rel=1e-8)
    assert fit["loglik"] == pytest.approx(reference.llf, rel=1e-9)


def test_bad_arguments_fail_before_any_round() -> None:
    client = _client(federated_glm, partitions())
    with pytest.raises(ValueError, match="'tweedie' is not a valid Family"):
        federated_glm.glm(client, outcome="event", predictors=["age"], family="tweedie")
    with pytest.raises(ValueError, match="must be distinct"):
        federated_glm.glm(client, outcome="event", predictors=["age", "age"])
    assert client.created == []


def test_a_text_outcome_fails_the_subtask() -> None:
    with pytest.raises(SubtaskFailed, match="Poisson regression needs a count outcome"):
        federated_glm.glm(
            _client(federated_glm, partitions()), outcome="cost", predictors=["age"], family="poisson"
        )


# --- summary statistics of categorical columns -------------------------------------------------------------


def _with_diagnosis(counts: list[dict[str, int]]) -> list[pd.DataFrame]:
    frames = []
    for index, levels in enumerate(counts):
        values = [level for level, count in levels.items() for _ in range(count)]
        missing = 5  # a count like any other: 1 to 4 would refuse the column's summary
        frame = pd.DataFrame(
            {"diagnosis": values + [None] * missing, "stage": np.arange(len(values) + missing) % 3}
        )
        frame["age"] = 40.0 + index
        frames.append(frame)
    return frames


def test_level_counts_below_the_cell_minimum_are_not_released() -> None:
    counts = [
        {"flu": 50, "cold": 30, "rare": 3, "asthma": 20},  # "rare" hidden; then the smallest other, asthma
        {"flu": 40, "cold": 2, "asthma": 6},  # cold hidden (2 < 5): asthma too, so the total is 8
        {"flu": 12, "cold": 9},  # nothing to hide
    ]
    frames = _with_diagnosis(counts)
    partials = [_plain(summary_stats.partial_stats(f, columns=["diagnosis"]))["diagnosis"] for f in frames]
    assert [p["levels"] for p in partials] == [{"cold": 30, "flu": 50}, {"flu": 40}, {"cold": 9, "flu": 12}]
    for partial, levels in zip(partials, counts, strict=True):
        assert partial["missing"] == 5 and partial["n"] == sum(levels.values())
        hidden = partial["n"] - sum(partial["levels"].values())
        assert hidden == 0 or hidden >= 5, "the released counts must not give a small total away"
        assert set(partial) == {"rows", "missing", "n", "levels"}

    result = summary_stats.summary(_client(summary_stats, frames), columns=["diagnosis", "age"])
    assert result["columns"]["diagnosis"] == {
        "rows": sum(len(f) for f in frames),
        "missing": 15,
        "count": 172,
        "levels": {"cold": 39, "flu": 102},
        "suppressed": 31,
    }
    assert "histogram" not in result["columns"]["diagnosis"] and "histogram" in result["columns"]["age"]


def test_suppression_never_lets_a_small_count_be_derived() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        limit = int(rng.integers(2, 11))
        counts = {f"l{i}": int(c) for i, c in enumerate(rng.integers(0, 3 * limit, size=rng.integers(1, 8)))}
        released = summary_stats.suppress_small_cells(counts, limit)
        hidden = {level for level in counts if level not in released}
        total = sum(counts[level] for level in hidden)
        assert all(
            counts[level] == count and (count >= limit or count == 0) for level, count in released.items()
        )
        assert total == 0 or (total >= limit and len(hidden) >= 2) or released == {}, (counts, limit)
        assert not any(0 < counts[level] < limit for level in released)


def test_a_numeric_code_declared_categorical_is_counted_by_level(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = _with_diagnosis([{"flu": 12, "cold": 9}, {"flu": 7, "cold": 8}])
    result = summary_stats.summary(_client(summary_stats, frames), columns=["stage"], categorical=["stage"])
    stage = pd.concat(frames)["stage"]
    assert result["columns"]["stage"]["levels"] == {str(s): int((stage == s).sum()) for s in (0, 1, 2)}
    monkeypatch.setenv("VFED_MIN_CELL_COUNT", "0")  # the node turned the cell rule off
    result = summary_stats.summary(
        _client(summary_stats, _with_diagnosis([{"flu": 12, "x": 1}] * 2), min_cell_count=0),
        columns=["diagnosis"],
    )
    assert result["columns"]["diagnosis"]["levels"] == {"flu": 24, "x": 2}


def test_a_column_numeric_at_one_organization_and_text_at_another_is_refused() -> None:
    frames = _with_diagnosis([{"flu": 12, "cold": 9}, {"flu": 7, "cold": 8}])
    frames[1]["stage"] = frames[1]["stage"].astype(str)
    with pytest.raises(ValueError, match=r"column 'stage' is numeric at some organizations and categorical"):
        summary_stats.summary(_client(summary_stats, frames), columns=["stage"])
    with pytest.raises(ValueError, match=r"categorical columns that are not among the columns: \['age'\]"):
        summary_stats.summary(_client(summary_stats, frames), columns=["stage"], categorical=["age"])
    with pytest.raises(ValueError, match=r"histogram edges given for categorical columns: \['diagnosis'\]"):
        summary_stats.summary(
            _client(summary_stats, frames), columns=["diagnosis"], edges={"diagnosis": [0, 1]}
        )


# --- the cell rule in the SDK -------------------------------------------------------------------------------


def test_min_cell_count_reads_the_node_setting() -> None:
    assert min_cell_count({}) == 5
    assert min_cell_count({"VFED_MIN_CELL_COUNT": " 11 "}) == 11
    assert min_cell_count({"VFED_MIN_CELL_COUNT": "0"}) == 0
    for bad in ("five", "-1", "2.5"):
        with pytest.raises(ValueError, match="VFED_MIN_CELL_COUNT must"):
            min_cell_count({"VFED_MIN_CELL_COUNT": bad})


def test_require_min_cells_refuses_counts_from_one_to_the_limit() -> None:
    require_min_cells({"a": 0, "b": 5, "c": 40}, "a table", limit=5)
    require_min_cells([], "an empty table", limit=5)
    require_min_cells([1, 2], "anything", limit=0)
    with pytest.raises(DisclosureError) as caught:
        require_min_cells([0, 7, 4, 2], "the levels of 'x'", limit=5)
    assert caught.value.rows == 2 and caught.value.limit == 5
    assert str(caught.value).startswith("a cell of the levels of 'x' has 2 records")
    with pytest.raises(DisclosureError):
        require_min_cells({"only": 1}, "a table", limit=2)
