"""Differentially private count and sum with the Laplace mechanism.

Each federated function spends `epsilon` on its dataset and declares so (`epsilon_kwarg`): the node reads the
declaration from the image's manifest, charges its per-dataset budget before the run starts, and refuses the
run once the budget is spent. The algorithm only adds the noise; it never keeps the budget itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from vfed.algorithms import DP, AlgorithmClient, central, federated

MECHANISM = "laplace"


def laplace_noise(scale: float, rng: np.random.Generator | None = None) -> float:
    """One draw of Laplace(0, scale) noise; a fresh OS-seeded generator unless one is given (tests)."""
    generator = rng if rng is not None else np.random.default_rng()
    return float(generator.laplace(0.0, scale))


def _check_epsilon(epsilon: float) -> float:
    value = float(epsilon)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")
    return value


def _release(true_value: float, sensitivity: float, epsilon: float) -> DP:
    """A differentially private part: the node releases it only from a run it charged `epsilon` for."""
    scale = sensitivity / epsilon
    value = {"value": true_value + laplace_noise(scale), "sensitivity": sensitivity, "scale": scale}
    return DP(epsilon=epsilon, mechanism=MECHANISM, value=value)


@federated(datasets=["default"], epsilon_kwarg="epsilon")
def dp_count(df: pd.DataFrame, epsilon: float, column: str | None = None) -> DP:
    """Noisy number of records (or of non-missing values of `column`); sensitivity 1."""
    eps = _check_epsilon(epsilon)
    count = len(df) if column is None else int(df[column].notna().sum())
    return _release(float(count), 1.0, eps)


@federated(datasets=["default"], epsilon_kwarg="epsilon")
def dp_sum(df: pd.DataFrame, column: str, lower: float, upper: float, epsilon: float) -> DP:
    """Noisy sum of `column` clipped to [lower, upper]; sensitivity max(|lower|, |upper|)."""
    eps = _check_epsilon(epsilon)
    if not lower < upper:
        raise ValueError(f"need lower < upper, got [{lower}, {upper}]")
    values = df[column].dropna().to_numpy(dtype=float).clip(lower, upper)
    return _release(float(values.sum()), max(abs(lower), abs(upper)), eps)


@central()
def dp_total(
    client: AlgorithmClient,
    statistic: str,
    epsilon: float,
    column: str | None = None,
    lower: float | None = None,
    upper: float | None = None,
    organizations: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The noisy total over organizations; each spends `epsilon` on its own dataset (parallel composition)."""
    orgs = list(organizations) if organizations else [o.id for o in client.organizations()]
    if statistic == "count":
        kwargs: dict[str, Any] = {"epsilon": epsilon, "column": column}
        parts = client.run_subtask("dp_count", kwargs=kwargs, organizations=orgs)
    elif statistic == "sum":
        if column is None or lower is None or upper is None:
            raise ValueError("a sum needs column, lower and upper")
        kwargs = {"epsilon": epsilon, "column": column, "lower": lower, "upper": upper}
        parts = client.run_subtask("dp_sum", kwargs=kwargs, organizations=orgs)
    else:
        raise ValueError(f"statistic must be 'count' or 'sum', got {statistic!r}")
    return {
        "statistic": statistic,
        "value": float(sum(p["value"] for p in parts)),
        "epsilon_per_dataset": epsilon,
        "variance": float(sum(2 * p["scale"] ** 2 for p in parts)),
        "organizations": orgs,
    }
