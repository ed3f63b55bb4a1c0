"""Federated GLM: linear, logistic and Poisson regression by Newton's method (IRLS) on pooled sufficient
statistics.

Round 0 (`partial_levels`) finds the categorical predictors and their levels at every organization; the
central function agrees one level set per column (the union; the first in sorted order is the reference unless
one is chosen) so that every organization one-hot encodes identically. Then each Newton iteration is one round
of `partial_glm`: each organization returns the gradient and Hessian of its log-likelihood at the current
coefficients; the central function sums them and takes the Newton step. Both are sums over records, so the
iterations are those of a fit on the concatenated data and the coefficients equal the pooled fit.

The first round's information matrix is proportional to X'X in every family, so collinear columns are found
there and named (`CollinearityError`) instead of failing in a solver. Level counts follow the cell rule: an
organization releases only counts of at least `VFED_MIN_CELL_COUNT` and flags a column with a rarer level,
and the fit is refused (`RareLevelError`, a disclosure refusal) rather than run on a level that small.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd

from vfed.algorithms import (
    AlgorithmClient,
    Counts,
    DisclosureError,
    Model,
    Parts,
    central,
    federated,
    min_cell_count,
    require_min_cells,
    require_min_rows,
)

INTERCEPT = "(intercept)"
FITTED_EPS = 10 * np.finfo(float).eps
"""Fitted probabilities (or Poisson means) this close to 0 or 1 are "numerically 0 or 1", as in R's glm."""
DEFAULT_COLLINEARITY_TOLERANCE = 1e-10
"""A column is aliased when the share of its (uncentred) sum of squares that the earlier columns do not
explain is below this."""
_NEGLIGIBLE_SHARE = 1e-6


class Family(StrEnum):
    """The models this example fits; "gaussian" and "binomial" are accepted as their other names."""

    LINEAR = "linear"
    LOGISTIC = "logistic"
    POISSON = "poisson"

    @classmethod
    def _missing_(cls, value: object) -> Family | None:
        return {"gaussian": cls.LINEAR, "binomial": cls.LOGISTIC}.get(str(value).lower())


class CollinearityError(ValueError):
    """Columns of the pooled design are linear combinations of earlier ones: the model is not identified."""

    def __init__(self, aliased: Mapping[str, Sequence[str]]) -> None:
        super().__init__("; ".join(_alias_message(name, parts) for name, parts in aliased.items()))
        self.aliased = {name: list(parts) for name, parts in aliased.items()}


class RareLevelError(DisclosureError):
    """A categorical predictor has a level, or two of them (or one and a binary outcome) a combination,
    rarer than the cell minimum at some organization: the information matrix would carry that count."""

    def __init__(
        self,
        levels: Mapping[str, Sequence[int]],
        cells: Mapping[tuple[str, str], Sequence[int]] | None = None,
    ) -> None:
        problems = {f"categorical predictor {name!r} has a level": orgs for name, orgs in levels.items()}
        for (first, second), orgs in (cells or {}).items():
            problems[f"the cross-classification of {first!r} and {second!r} has a cell"] = orgs
        Exception.__init__(
            self,
            "; ".join(
                f"{problem} rarer than the cell minimum at organization{'s' if len(orgs) > 1 else ''} "
                f"{', '.join(str(o) for o in orgs)}"
                for problem, orgs in problems.items()
            )
            + ": combine or drop rare levels",
        )
        self.levels = {name: list(orgs) for name, orgs in levels.items()}
        self.cells = {pair: list(orgs) for pair, orgs in (cells or {}).items()}
        self.what = "the levels of categorical predictors"
        self.rows = self.limit = 0  # not known here: the organizations keep their counts and limits


def _alias_message(name: str, parts: Sequence[str]) -> str:
    if not parts:
        return f"column {name!r} is zero in every record"
    if list(parts) == [INTERCEPT]:
        return f"column {name!r} is constant"
    others = ", ".join("the intercept" if p == INTERCEPT else repr(p) for p in parts)
    return f"column {name!r} is a linear combination of {others}"


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def level_labels(series: pd.Series) -> pd.Series:
    """Levels as text, the same at every organization: 3.0 and 3 are "3", True is "True"."""
    if pd.api.types.is_float_dtype(series) and bool((series == np.floor(series)).all()):
        series = series.astype("int64")
    return series.astype(str)


def dummy_name(column: str, level: str) -> str:
    """The name of the indicator column of one level."""
    return f"{column}[{level}]"


def _complete(df: pd.DataFrame, outcome: str, predictors: Sequence[str]) -> pd.DataFrame:
    missing = [c for c in (outcome, *predictors) if c not in df.columns]
    if missing:
        raise KeyError(f"no such columns: {missing}")
    data = df[[outcome, *predictors]].dropna()
    require_min_rows(data, "complete records for the model")
    return data


def encoded_levels(
    predictors: Sequence[str], levels: Mapping[str, Iterable[str]], intercept: bool
) -> dict[str, list[str]]:
    """The levels that get an indicator column: all but the reference (the first), except that without an
    intercept the first categorical predictor keeps all of its levels (R's coding), so that no level's
    mean is forced to 0."""
    encoded: dict[str, list[str]] = {}
    for name in predictors:
        if name in levels:
            agreed = list(levels[name])
            encoded[name] = agreed if not intercept and not encoded else agreed[1:]
    return encoded


def _design(
    data: pd.DataFrame,
    predictors: Sequence[str],
    levels: Mapping[str, Sequence[str]],
    intercept: bool,
) -> np.ndarray:
    """The design matrix: numeric predictors as they are, categorical ones as indicators of their agreed
    levels (`encoded_levels`). Level counts are checked against the cell rule here too, because the
    information matrix carries them whether or not the central function asked for levels first."""
    columns: list[np.ndarray] = [np.ones(len(data))] if intercept else []
    encoded = encoded_levels(predictors, levels, intercept)
    for name in predictors:
        series = data[name]
        if name in levels:
            labels = level_labels(series)
            if not labels.isin(list(levels[name])).all():
                raise ValueError(f"column {name!r} has a level outside the agreed levels")
            require_min_cells(labels.value_counts().to_dict(), f"the levels of column {name!r}")
            columns.extend((labels == level).to_numpy(dtype=float) for level in encoded[name])
        elif _is_numeric(series):
            values = series.to_numpy(dtype=float)
            if not np.isfinite(values).all():
                raise ValueError(f"column {name!r} has infinite values")
            columns.append(values)
        else:
            raise ValueError(f"column {name!r} is not numeric and has no agreed levels")
    return np.column_stack(columns) if columns else np.empty((len(data), 0))


def _crossed(outcome: str, categorical: Sequence[str], binary_outcome: bool) -> list[str]:
    """The columns whose pairwise cross-classification the information matrix reveals: the categorical
    predictors, and a 0/1 outcome with them (its gradient counts the events per level). Numeric predictors
    are not cells."""
    return [*([outcome] if binary_outcome and categorical else []), *categorical]


def _small_cells(
    labels: Mapping[str, pd.Series],
    outcome: str,
    categorical: Sequence[str],
    binary_outcome: bool,
    limit: int,
) -> list[tuple[str, str]]:
    """Pairs of columns with a combination of levels seen from 1 to limit - 1 times."""
    crossed = _crossed(outcome, categorical, binary_outcome)
    small: list[tuple[str, str]] = []
    for i, first in enumerate(crossed):
        for second in crossed[i + 1 :]:
            counts = pd.DataFrame({"a": labels[first], "b": labels[second]}).value_counts()
            if ((counts > 0) & (counts < limit)).any():
                small.append((first, second))
    return small


def _labels(data: pd.DataFrame, names: Iterable[str]) -> dict[str, pd.Series]:
    return {name: level_labels(data[name]) for name in names}


@federated(datasets=["default"])
def partial_levels(
    df: pd.DataFrame,
    outcome: str,
    predictors: Sequence[str],
    categorical: Sequence[str] = (),
    family: str = Family.LINEAR,
) -> Parts:
    """Which predictors are categorical here (declared, or not numeric: text, boolean, category) and their
    levels among the complete records, with counts. `rare` flags a column with a level rarer than the cell
    minimum (then none of its counts is released, or their sum would give the rare one away); `cells` lists
    the pairs (see `_crossed`) with a rarer combination. Neither rare levels nor rare counts leave."""
    data = _complete(df, outcome, predictors)
    chosen = Family(family)
    check_outcome(chosen, data[outcome].to_numpy(dtype=float), outcome)
    limit = min_cell_count()
    names = [name for name in predictors if name in categorical or not _is_numeric(data[name])]
    binary = chosen is Family.LOGISTIC
    labels = _labels(data, [*names, *([outcome] if binary else [])])
    found: dict[str, dict[str, Any]] = {}
    for name in names:
        counts = {str(k): int(v) for k, v in labels[name].value_counts().items()}
        rare = any(v < limit for v in counts.values())
        found[name] = {"levels": {} if rare else dict(sorted(counts.items())), "rare": rare}
    cells = _small_cells(labels, outcome, names, binary, limit)
    flagged: dict[str, dict[str, bool]] = {}
    for first, second in cells:  # as {first: {second: true}}: parts hold counts and flags, not lists of names
        flagged.setdefault(first, {})[second] = True
    return Parts(n=Counts(cells=len(data)), categorical=Counts(cells=found), cells=Counts(cells=flagged))


def agree_levels(
    partials: Mapping[int, Mapping[str, Any]], reference: Mapping[str, str] | None = None
) -> dict[str, dict[str, int]]:
    """One level set per categorical column (the union over organizations, reference level first, then
    sorted) with pooled counts; RareLevelError when any organization flagged a rare level or cell."""
    rare: dict[str, list[int]] = {}
    cells: dict[tuple[str, str], list[int]] = {}
    pooled: dict[str, dict[str, int]] = {}
    for org, partial in sorted(partials.items()):
        for first, seconds in partial.get("cells", {}).items():
            for second in seconds:
                cells.setdefault((str(first), str(second)), []).append(org)
        for name, entry in partial["categorical"].items():
            if entry["rare"]:
                rare.setdefault(name, []).append(org)
            counts = pooled.setdefault(name, {})
            for level, count in entry["levels"].items():
                counts[level] = counts.get(level, 0) + int(count)
    if rare or cells:
        raise RareLevelError(rare, cells)
    chosen = dict(reference or {})
    unknown = [name for name in chosen if name not in pooled]
    if unknown:
        raise ValueError(f"reference levels given for columns that are not categorical: {unknown}")
    agreed: dict[str, dict[str, int]] = {}
    for name, counts in pooled.items():
        order = sorted(counts)
        first = chosen.get(name, order[0] if order else None)
        if first not in counts:
            raise ValueError(f"reference level {first!r} of column {name!r} is not one of its levels")
        agreed[name] = {level: counts[level] for level in [first, *(lv for lv in order if lv != first)]}
    return agreed


@federated(datasets=["default"])
def partial_glm(
    df: pd.DataFrame,
    outcome: str,
    predictors: Sequence[str],
    beta: Sequence[float],
    family: str = Family.LOGISTIC,
    intercept: bool = True,
    levels: Mapping[str, Sequence[str]] | None = None,
) -> Model:
    """Gradient and Hessian of the log-likelihood at `beta` (the information matrix), the deviance, and
    whether any fitted value is numerically at the boundary (0 or 1 for a probability, 0 for a mean); a
    model part over n rows with one parameter per column of the design (the node's saturation check)."""
    data = _complete(df, outcome, predictors)
    chosen = Family(family)
    check_outcome(chosen, data[outcome].to_numpy(dtype=float), outcome)
    x = _design(data, predictors, levels or {}, intercept)
    names = [name for name in predictors if name in (levels or {})]
    binary = chosen is Family.LOGISTIC
    labels = _labels(data, [*names, *([outcome] if binary else [])])
    for first, second in _small_cells(labels, outcome, names, binary, min_cell_count()):
        require_min_cells(
            pd.DataFrame({"a": labels[first], "b": labels[second]}).value_counts().to_dict(),
            f"the cross-classification of {first!r} and {second!r}",
        )
    y = data[outcome].to_numpy(dtype=float)
    coefficients = np.asarray(beta, dtype=float)
    if coefficients.shape != (x.shape[1],):
        raise ValueError(f"beta has {coefficients.size} values; the model has {x.shape[1]} coefficients")
    eta = x @ coefficients
    if chosen is Family.LINEAR:
        residual = y - eta
        rss = float(residual @ residual)
        return _model(
            x,
            {
                "gradient": (x.T @ residual).tolist(),
                "hessian": (x.T @ x).tolist(),
                "rss": rss,
                "deviance": rss,
                "boundary": False,
            },
        )
    if chosen is Family.LOGISTIC:
        return _model(x, _logistic(x, y, eta))
    return _model(x, _poisson(x, y, eta))


def _model(x: np.ndarray, values: dict[str, Any]) -> Model:
    return Model(n=x.shape[0], parameters=x.shape[1], values=values)


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    result: np.ndarray = -np.logaddexp(0.0, -z)
    return result


def check_outcome(family: Family, y: np.ndarray, outcome: str) -> None:
    """A logistic model needs a 0/1 outcome, a Poisson one counts."""
    if family is Family.LOGISTIC and not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"logistic regression needs a 0/1 outcome; {outcome!r} has other values")
    if family is Family.POISSON and ((y < 0).any() or (y != np.floor(y)).any()):
        raise ValueError(f"Poisson regression needs a count outcome; {outcome!r} has other values")


def _logistic(x: np.ndarray, y: np.ndarray, eta: np.ndarray) -> dict[str, Any]:
    p = np.exp(_log_sigmoid(eta))
    loglik = float((y * _log_sigmoid(eta) + (1 - y) * _log_sigmoid(-eta)).sum())
    return {
        "gradient": (x.T @ (y - p)).tolist(),
        "hessian": (x.T @ (x * (p * (1 - p))[:, None])).tolist(),
        "loglik": loglik,
        "deviance": -2 * loglik,
        "boundary": bool(((p < FITTED_EPS) | (p > 1 - FITTED_EPS)).any()),
    }


def _poisson(x: np.ndarray, y: np.ndarray, eta: np.ndarray) -> dict[str, Any]:
    mu = np.exp(eta)
    loglik = float((y * eta - mu).sum() - sum(math.lgamma(v + 1) for v in y))
    ratio = np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0) / mu), 0.0)
    return {
        "gradient": (x.T @ (y - mu)).tolist(),
        "hessian": (x.T @ (x * mu[:, None])).tolist(),
        "loglik": loglik,
        "deviance": float(2 * (ratio - (y - mu)).sum()),
        "boundary": bool((mu < FITTED_EPS).any()),
    }


def aliased_columns(
    information: np.ndarray, names: Sequence[str], tolerance: float = DEFAULT_COLLINEARITY_TOLERANCE
) -> dict[str, list[str]]:
    """Columns that are (numerically) linear combinations of earlier ones, each with the earlier columns
    it is made of: a Cholesky factorisation of the Gram matrix in column order that skips such columns
    (the pivoting of R's lm). A column's remainder is compared with its own sum of squares, so the test
    does not depend on the columns' units."""
    diagonal = np.diag(information)
    scale = float(diagonal.max()) if diagonal.size else 0.0
    kept: list[int] = []
    factor = np.zeros((0, 0))
    aliased: dict[str, list[str]] = {}
    for j, name in enumerate(names):
        own = float(diagonal[j])
        if own <= scale * np.finfo(float).eps:
            aliased[name] = []
            continue
        w = np.linalg.solve(factor, information[kept, j]) if kept else np.zeros(0)
        remainder = own - float(w @ w)
        if remainder <= tolerance * own:
            combination = np.linalg.solve(factor.T, w)
            shares = np.abs(combination) * np.sqrt(diagonal[kept] / own)
            aliased[name] = [names[k] for k, s in zip(kept, shares, strict=True) if s > _NEGLIGIBLE_SHARE]
            continue
        grown = np.zeros((len(kept) + 1, len(kept) + 1))
        grown[: len(kept), : len(kept)] = factor
        grown[len(kept), : len(kept)] = w
        grown[len(kept), len(kept)] = math.sqrt(remainder)
        factor = grown
        kept.append(j)
    return aliased


class _Pooled:
    """The organizations' partial results of one iteration, summed."""

    def __init__(self, partials: Sequence[Mapping[str, Any]]) -> None:
        self.n = int(sum(p["n"] for p in partials))
        self.gradient = np.sum([np.asarray(p["gradient"], dtype=float) for p in partials], axis=0)
        self.hessian = np.sum([np.asarray(p["hessian"], dtype=float) for p in partials], axis=0)
        self.deviance = float(sum(p["deviance"] for p in partials))
        self.loglik = float(sum(p["loglik"] for p in partials)) if "loglik" in partials[0] else None
        self.rss = float(sum(p["rss"] for p in partials)) if "rss" in partials[0] else None
        self.boundary = any(bool(p.get("boundary")) for p in partials)


def _standard_errors(pooled: _Pooled, family: Family, parameters: int) -> list[float | None]:
    try:
        covariance = np.linalg.inv(pooled.hessian)
    except np.linalg.LinAlgError:
        return [None] * parameters
    if family is Family.LINEAR and pooled.rss is not None:
        dof = pooled.n - parameters
        covariance = covariance * (pooled.rss / dof if dof > 0 else math.nan)
    variances = np.diag(covariance)
    return [math.sqrt(v) if math.isfinite(v) and v >= 0 else None for v in variances.tolist()]


def convergence_report(
    family: Family,
    pooled: _Pooled,
    converged: bool,
    iterations: int,
    change: float | None,
    moving: Sequence[str],
) -> dict[str, Any]:
    """How the iterations ended. Separation (logistic) or a zero-count cell (Poisson) shows as fitted values
    at the boundary, or as coefficients that keep moving while the deviance no longer does: then the
    maximum likelihood estimates do not exist and the coefficients still moving are named."""
    stalled = change is not None and abs(change) < 1e-8 * (abs(pooled.deviance) + 0.1)
    suspect = family is not Family.LINEAR and not converged and (pooled.boundary or stalled)
    diverging = list(moving) if suspect else []
    separation = family is not Family.LINEAR and (pooled.boundary or bool(diverging))
    notes: list[str] = []
    if separation:
        cause = "(quasi-)perfect separation" if family is Family.LOGISTIC else "a zero-count cell"
        fitted = "probabilities numerically 0 or 1" if family is Family.LOGISTIC else "means numerically 0"
        sign = f"fitted {fitted}" if pooled.boundary else "the deviance converged, coefficients did not"
        which = f"; diverging: {', '.join(repr(m) for m in diverging)}" if diverging else ""
        notes.append(f"{cause} ({sign}): the maximum likelihood estimates do not exist{which}")
    if not converged:
        last = "" if change is None else f" (last deviance change {change:.3g})"
        notes.append(f"the fit did not converge in {iterations} iterations{last}")
    return {
        "iterations": iterations,
        "converged": converged,
        "deviance_change": change,
        "separation": separation,
        "diverging": diverging,
        "warnings": notes,
    }


def fit_result(
    family: Family,
    names: Sequence[str],
    beta: np.ndarray,
    pooled: _Pooled,
    levels: Mapping[str, Mapping[str, Any]],
    convergence: Mapping[str, Any],
) -> dict[str, Any]:
    """The result document: coefficients with standard errors from the pooled information matrix, fit
    measures, the agreed levels and how the iterations ended."""
    errors = _standard_errors(pooled, family, len(beta))
    fit: dict[str, Any] = {"deviance": pooled.deviance}
    if pooled.rss is not None:
        fit["rss"] = pooled.rss
    if pooled.loglik is not None:
        fit["loglik"] = pooled.loglik
    return {
        "family": family.value,
        "n": pooled.n,
        "coefficients": dict(zip(names, beta.tolist(), strict=True)),
        "standard_errors": dict(zip(names, errors, strict=True)),
        **fit,
        "levels": {name: dict(entry) for name, entry in levels.items()},
        **convergence,
    }


def design_names(
    predictors: Sequence[str], levels: Mapping[str, Iterable[str]], intercept: bool
) -> list[str]:
    """Coefficient names in design order: the intercept, then each predictor or its encoded levels."""
    names = [INTERCEPT] if intercept else []
    encoded = encoded_levels(predictors, levels, intercept)
    for name in predictors:
        if name in encoded:
            if not encoded[name]:
                raise CollinearityError({name: [INTERCEPT]})  # a single level
            names.extend(dummy_name(name, level) for level in encoded[name])
        else:
            names.append(name)
    return names


@central()
def glm(
    client: AlgorithmClient,
    outcome: str,
    predictors: Sequence[str],
    family: str = Family.LOGISTIC,
    intercept: bool = True,
    max_iterations: int = 25,
    tolerance: float = 1e-10,
    organizations: Sequence[int] | None = None,
    categorical: Sequence[str] = (),
    reference: Mapping[str, str] | None = None,
    collinearity_tolerance: float = DEFAULT_COLLINEARITY_TOLERANCE,
) -> dict[str, Any]:
    """Fit the model over the organizations' data: a round for the levels, then one per Newton iteration."""
    chosen = Family(family)
    if len(set(predictors)) != len(predictors) or outcome in predictors:
        raise ValueError("predictors must be distinct and must not include the outcome")
    if max_iterations < 1:
        raise ValueError("max_iterations must be at least 1")
    if not predictors and not intercept:
        raise ValueError("the model has no coefficients: give predictors or an intercept")
    stray = [name for name in categorical if name not in predictors]
    if stray:
        raise ValueError(f"categorical columns that are not predictors: {stray}")
    orgs = list(organizations) if organizations else [o.id for o in client.organizations()]
    common: dict[str, Any] = {"outcome": outcome, "predictors": list(predictors)}
    subtask = client.create_subtask(
        "partial_levels",
        kwargs={**common, "categorical": list(categorical), "family": chosen.value},
        organizations=orgs,
    )
    client.wait(subtask.task_id)
    levels = agree_levels(client.results_by_organization(subtask.task_id), reference)
    names = design_names(predictors, levels, intercept)
    kwargs = {**common, "family": chosen.value, "intercept": intercept}
    if levels:
        kwargs["levels"] = {name: list(counts) for name, counts in levels.items()}
    encoded = encoded_levels(predictors, levels, intercept)
    report = {  # the reference is None for a column coded with all its levels (no intercept)
        name: {"reference": None if encoded[name][:1] == list(c)[:1] else next(iter(c)), "counts": dict(c)}
        for name, c in levels.items()
    }
    return _iterate(
        client, chosen, kwargs, names, report, orgs, max_iterations, tolerance, collinearity_tolerance
    )


def _iterate(
    client: AlgorithmClient,
    family: Family,
    kwargs: Mapping[str, Any],
    names: Sequence[str],
    levels: Mapping[str, Mapping[str, Any]],
    orgs: Sequence[int],
    max_iterations: int,
    tolerance: float,
    collinearity_tolerance: float,
) -> dict[str, Any]:
    """Newton's method to convergence, a singular information matrix or `max_iterations`."""
    beta = np.zeros(len(names))
    step = np.zeros(len(names))
    previous: float | None = None
    converged, iteration = False, 0
    while iteration < max_iterations and not converged:
        iteration += 1
        pooled = _Pooled(
            client.run_subtask("partial_glm", kwargs={**kwargs, "beta": beta.tolist()}, organizations=orgs)
        )
        if iteration == 1:
            aliased = aliased_columns(pooled.hessian, names, collinearity_tolerance)
            if aliased:
                raise CollinearityError(aliased)
        change = None if previous is None else pooled.deviance - previous
        previous = pooled.deviance
        try:
            step = np.linalg.solve(pooled.hessian, pooled.gradient)
        except np.linalg.LinAlgError:
            break
        if not np.isfinite(step).all():
            break
        beta = beta + step
        converged = bool(
            np.max(np.abs(step), initial=0.0) < tolerance * (1 + np.max(np.abs(beta), initial=0.0))
        )
    moving = [n for n, s, b in zip(names, step, beta, strict=True) if abs(s) > 1e-3 * (1 + abs(b))]
    convergence = convergence_report(family, pooled, converged, iteration, change, moving)
    return fit_result(family, names, beta, pooled, levels, convergence)
