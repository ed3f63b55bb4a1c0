"""Federated GLM: linear and logistic regression by Newton's method (IRLS) on pooled sufficient statistics.

Each organization returns the gradient and Hessian of its log-likelihood at the current coefficients; the
central function sums them and takes the Newton step. Because both are sums over records, the iterations are
those of a fit on the concatenated data, so the coefficients equal the pooled fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd

from vfed.algorithms import AlgorithmClient, Model, central, federated, require_min_rows

INTERCEPT = "(intercept)"


class Family(StrEnum):
    """The models this example fits."""

    LINEAR = "linear"
    LOGISTIC = "logistic"


def _design(
    df: pd.DataFrame, outcome: str, predictors: Sequence[str], intercept: bool
) -> tuple[np.ndarray, np.ndarray]:
    missing = [c for c in (outcome, *predictors) if c not in df.columns]
    if missing:
        raise KeyError(f"no such columns: {missing}")
    data = df[[outcome, *predictors]].dropna()
    require_min_rows(data, "complete records for the model")
    x = data[list(predictors)].to_numpy(dtype=float)
    if intercept:
        x = np.column_stack([np.ones(len(data)), x])
    return x, data[outcome].to_numpy(dtype=float)


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    result: np.ndarray = -np.logaddexp(0.0, -z)
    return result


@federated(datasets=["default"])
def partial_glm(
    df: pd.DataFrame,
    outcome: str,
    predictors: Sequence[str],
    beta: Sequence[float],
    family: str = Family.LOGISTIC,
    intercept: bool = True,
) -> Model:
    """Gradient, Hessian (of the negative log-likelihood's curvature) and fit measure at `beta`, as a model
    part over n rows with one parameter per column of the design (the node's saturation check)."""
    x, y = _design(df, outcome, predictors, intercept)
    coefficients = np.asarray(beta, dtype=float)
    if coefficients.shape != (x.shape[1],):
        raise ValueError(f"beta has {coefficients.size} values; the model has {x.shape[1]} coefficients")
    eta = x @ coefficients
    if Family(family) is Family.LINEAR:
        residual = y - eta
        return Model(
            n=len(y),
            parameters=x.shape[1],
            values={
                "gradient": (x.T @ residual).tolist(),
                "hessian": (x.T @ x).tolist(),
                "rss": float(residual @ residual),
            },
        )
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"logistic regression needs a 0/1 outcome; {outcome!r} has other values")
    p = np.exp(_log_sigmoid(eta))
    weights = p * (1 - p)
    return Model(
        n=len(y),
        parameters=x.shape[1],
        values={
            "gradient": (x.T @ (y - p)).tolist(),
            "hessian": (x.T @ (x * weights[:, None])).tolist(),
            "loglik": float((y * _log_sigmoid(eta) + (1 - y) * _log_sigmoid(-eta)).sum()),
        },
    )


def newton_step(partials: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """The pooled Newton step and the pooled information matrix (the Hessian summed over organizations)."""
    gradient = np.sum([np.asarray(p["gradient"], dtype=float) for p in partials], axis=0)
    hessian = np.sum([np.asarray(p["hessian"], dtype=float) for p in partials], axis=0)
    return np.linalg.solve(hessian, gradient), hessian


def fit_summary(
    family: Family,
    names: Sequence[str],
    beta: np.ndarray,
    hessian: np.ndarray,
    partials: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """Coefficients with standard errors from the pooled information matrix."""
    n = int(sum(p["n"] for p in partials))
    covariance = np.linalg.inv(hessian)
    extra: dict[str, float] = {}
    if family is Family.LINEAR:
        rss = float(sum(p["rss"] for p in partials))
        covariance = covariance * rss / (n - len(beta))
        extra["rss"] = rss
    else:
        extra["loglik"] = float(sum(p["loglik"] for p in partials))
    errors = np.sqrt(np.diag(covariance))
    return {
        "family": family.value,
        "n": n,
        "coefficients": dict(zip(names, beta.tolist(), strict=True)),
        "standard_errors": dict(zip(names, errors.tolist(), strict=True)),
        **extra,
    }


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
) -> dict[str, Any]:
    """Fit the model over the organizations' data: one federated round per Newton iteration."""
    chosen = Family(family)
    orgs = list(organizations) if organizations else [o.id for o in client.organizations()]
    names = ([INTERCEPT] if intercept else []) + list(predictors)
    beta = np.zeros(len(names))
    kwargs: dict[str, Any] = {"outcome": outcome, "predictors": list(predictors), "family": chosen.value}
    kwargs["intercept"] = intercept
    for iteration in range(1, max_iterations + 1):
        partials = client.run_subtask(
            "partial_glm", kwargs={**kwargs, "beta": beta.tolist()}, organizations=orgs
        )
        step, hessian = newton_step(partials)
        beta = beta + step
        if np.max(np.abs(step)) < tolerance * (1 + np.max(np.abs(beta))):
            return fit_summary(chosen, names, beta, hessian, partials) | {
                "iterations": iteration,
                "converged": True,
            }
    return fit_summary(chosen, names, beta, hessian, partials) | {
        "iterations": max_iterations,
        "converged": False,
    }
