"""Summary statistics per column: count, mean, variance, min, max, missing counts and a histogram.

Each organization returns partial moments (count, mean, sum of squared deviations, min, max, missing); the
central function pools them exactly (Chan et al.'s parallel update), agrees histogram edges from the pooled
min/max (or takes fixed edges), and asks for bin counts in a second round. The result equals the statistics
of the concatenated data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from vfed.algorithms import Aggregate, AlgorithmClient, Counts, Parts, central, federated, require_min_rows

DEFAULT_BINS = 10


def _columns(df: pd.DataFrame, columns: Sequence[str] | None) -> list[str]:
    chosen = list(df.columns) if columns is None else list(columns)
    unknown = [c for c in chosen if c not in df.columns]
    if unknown:
        raise KeyError(f"no such columns: {unknown}")
    return [str(c) for c in chosen]


def _numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


@federated(datasets=["default"])
def partial_stats(df: pd.DataFrame, columns: Sequence[str] | None = None) -> Parts:
    """Per column: rows and missing; for numeric columns n, mean, m2 (squared deviations), min, max."""
    result: dict[str, Any] = {}
    for name in _columns(df, columns):
        series = df[name]
        values = series.dropna()
        entry: dict[str, Any] = {"rows": len(series), "missing": int(series.isna().sum())}
        if _numeric(series):
            if len(values):
                require_min_rows(len(values), f"column {name!r} (non-missing)")
            array = values.to_numpy(dtype=float)
            mean = float(array.mean()) if len(array) else 0.0
            entry |= {
                "n": len(array),
                "mean": mean,
                "m2": float(((array - mean) ** 2).sum()),
                "min": float(array.min()) if len(array) else None,
                "max": float(array.max()) if len(array) else None,
            }
        result[name] = entry
    return Parts({name: _part(entry) for name, entry in result.items()})


def _part(entry: dict[str, Any]) -> Aggregate | Counts:
    """A column's entry as the node checks it: rows and missing are counts, the rest statistics over n."""
    counts = {"rows": entry.pop("rows"), "missing": entry.pop("missing")}
    if "n" not in entry:
        return Counts(cells=counts)
    return Aggregate(n=entry.pop("n"), value=entry, counts=counts)


@federated(datasets=["default"])
def partial_histogram(df: pd.DataFrame, edges: Mapping[str, Sequence[float]]) -> Parts:
    """Counts per bin for the agreed edges (numpy semantics: the last bin includes its right edge)."""
    counts: dict[str, list[int]] = {}
    for name, column_edges in edges.items():
        values = df[_columns(df, [name])[0]].dropna().to_numpy(dtype=float)
        hist, _ = np.histogram(values, bins=np.asarray(column_edges, dtype=float))
        counts[name] = [int(c) for c in hist]
    return Parts({name: Counts(cells=bins) for name, bins in counts.items()})


def combine_stats(partials: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pool the organizations' partial moments into the statistics of the concatenated data."""
    combined: dict[str, dict[str, Any]] = {}
    for name in partials[0]:
        parts = [p[name] for p in partials]
        entry: dict[str, Any] = {
            "rows": sum(p["rows"] for p in parts),
            "missing": sum(p["missing"] for p in parts),
        }
        if "n" in parts[0]:
            entry |= _pool_moments([p for p in parts if p["n"] > 0])
        combined[name] = entry
    return combined


def _pool_moments(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    n = sum(p["n"] for p in parts)
    if n == 0:
        return {"count": 0, "mean": None, "variance": None, "min": None, "max": None}
    mean = sum(p["n"] * p["mean"] for p in parts) / n
    m2 = sum(p["m2"] + p["n"] * (p["mean"] - mean) ** 2 for p in parts)
    return {
        "count": n,
        "mean": mean,
        "variance": m2 / (n - 1) if n > 1 else None,
        "min": min(p["min"] for p in parts),
        "max": max(p["max"] for p in parts),
    }


def histogram_edges(stats: Mapping[str, Mapping[str, Any]], bins: int) -> dict[str, list[float]]:
    """Equal-width edges over the pooled range of each numeric column with data."""
    edges: dict[str, list[float]] = {}
    for name, entry in stats.items():
        if entry.get("count"):
            low, high = float(entry["min"]), float(entry["max"])
            if low == high:
                low, high = low - 0.5, high + 0.5
            edges[name] = [float(e) for e in np.linspace(low, high, bins + 1)]
    return edges


def combine_histograms(partials: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, list[int]]:
    """Bin counts of the concatenated data: the sum of the organizations' counts."""
    return {
        name: [int(sum(c)) for c in zip(*(p[name] for p in partials), strict=True)] for name in partials[0]
    }


@central()
def summary(
    client: AlgorithmClient,
    columns: Sequence[str] | None = None,
    bins: int = DEFAULT_BINS,
    edges: Mapping[str, Sequence[float]] | None = None,
    organizations: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Pooled summary statistics over the organizations (default: all of the collaboration)."""
    if bins < 1:
        raise ValueError("bins must be at least 1")
    orgs = list(organizations) if organizations else [o.id for o in client.organizations()]
    stats = combine_stats(
        client.run_subtask("partial_stats", kwargs={"columns": columns}, organizations=orgs)
    )
    chosen = {k: list(v) for k, v in edges.items()} if edges else histogram_edges(stats, bins)
    if chosen:
        counts = combine_histograms(
            client.run_subtask("partial_histogram", kwargs={"edges": chosen}, organizations=orgs)
        )
        for name, column_edges in chosen.items():
            stats[name]["histogram"] = {"edges": column_edges, "counts": counts[name]}
    return {"organizations": orgs, "columns": stats}
