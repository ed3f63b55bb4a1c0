"""Summary statistics per column: count, mean, variance, min, max, missing counts and a histogram for numeric
columns; counts per level for categorical ones.

Each organization returns partial moments (count, mean, sum of squared deviations, min, max, missing); the
central function pools them exactly (Chan et al.'s parallel update), agrees histogram edges from the pooled
min/max (or takes fixed edges), and asks for bin counts in a second round. The result equals the statistics
of the concatenated data.

Level counts follow the cell rule (`VFED_MIN_CELL_COUNT`): an organization suppresses every level rarer than
the minimum, and then as many of its smallest other levels as it takes for the suppressed records to number
at least the minimum and to span two levels or more, so that no small count can be recovered by subtracting
the released ones from the column's count. Suppressed levels are not named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from vfed.algorithms import (
    Aggregate,
    AlgorithmClient,
    Counts,
    Parts,
    central,
    federated,
    min_cell_count,
    require_min_rows,
)

DEFAULT_BINS = 10


def _columns(df: pd.DataFrame, columns: Sequence[str] | None) -> list[str]:
    chosen = list(df.columns) if columns is None else list(columns)
    unknown = [c for c in chosen if c not in df.columns]
    if unknown:
        raise KeyError(f"no such columns: {unknown}")
    return [str(c) for c in chosen]


def _numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def level_labels(series: pd.Series) -> pd.Series:
    """Levels as text, the same at every organization: 3.0 and 3 are "3", True is "True"."""
    if pd.api.types.is_float_dtype(series) and bool((series == np.floor(series)).all()):
        series = series.astype("int64")
    return series.astype(str)


def suppress_small_cells(counts: Mapping[str, int], limit: int) -> dict[str, int]:
    """The level counts that may be released: none from 1 to limit - 1, and the suppressed total (the
    column's count minus the released ones) either 0 or at least `limit` and spread over two levels or more;
    the smallest levels are suppressed first (ties by name)."""
    hidden = {level for level, count in counts.items() if 0 < count < limit}
    if hidden:
        shown = sorted((count, level) for level, count in counts.items() if level not in hidden)
        while shown and (len(hidden) < 2 or sum(counts[level] for level in hidden) < limit):
            hidden.add(shown.pop(0)[1])
    return {level: int(count) for level, count in sorted(counts.items()) if level not in hidden}


@federated(datasets=["default"])
def partial_stats(
    df: pd.DataFrame, columns: Sequence[str] | None = None, categorical: Sequence[str] = ()
) -> Parts:
    """Per column: rows and missing; for numeric columns n, mean, m2 (squared deviations), min, max; for
    categorical ones (declared, or text, boolean, category) n and the level counts the cell rule releases."""
    result: dict[str, Any] = {}
    limit = min_cell_count()
    for name in _columns(df, columns):
        series = df[name]
        values = series.dropna()
        entry: dict[str, Any] = {"rows": len(series), "missing": int(series.isna().sum())}
        if len(values):
            require_min_rows(len(values), f"column {name!r} (non-missing)")
        if name in categorical or not _numeric(series):
            counts = {str(k): int(v) for k, v in level_labels(values).value_counts().items()}
            entry |= {"n": len(values), "levels": suppress_small_cells(counts, limit)}
        else:
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
    """A column's entry as the node checks it: a categorical column's are all counts (rows, missing, n and
    the released levels); a numeric column's rows and missing are counts, the rest statistics over n."""
    if "levels" in entry:
        return Counts(cells=entry)
    counts = {"rows": entry.pop("rows"), "missing": entry.pop("missing")}
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
        kinds = {"levels" in p for p in parts}
        if len(kinds) > 1:
            raise ValueError(
                f"column {name!r} is numeric at some organizations and categorical at others: "
                "name it in categorical=[...] to count its levels everywhere"
            )
        if kinds == {True}:
            entry |= _pool_levels(parts)
        elif "n" in parts[0]:
            entry |= _pool_moments([p for p in parts if p["n"] > 0])
        combined[name] = entry
    return combined


def _pool_levels(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts per level summed over the organizations that released them; `suppressed` counts the records
    in cells some organization withheld (their levels are not named)."""
    n = sum(int(p["n"]) for p in parts)
    counts: dict[str, int] = {}
    for part in parts:
        for level, count in part["levels"].items():
            counts[level] = counts.get(level, 0) + int(count)
    return {"count": n, "levels": dict(sorted(counts.items())), "suppressed": n - sum(counts.values())}


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
        if entry.get("count") and "levels" not in entry:
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
    categorical: Sequence[str] = (),
) -> dict[str, Any]:
    """Pooled summary statistics over the organizations (default: all of the collaboration). Columns named
    in `categorical` get level counts even when they are numeric."""
    if bins < 1:
        raise ValueError("bins must be at least 1")
    stray = [name for name in categorical if columns is not None and name not in columns]
    if stray:
        raise ValueError(f"categorical columns that are not among the columns: {stray}")
    orgs = list(organizations) if organizations else [o.id for o in client.organizations()]
    kwargs: dict[str, Any] = {"columns": columns}
    if categorical:
        kwargs["categorical"] = list(categorical)
    stats = combine_stats(client.run_subtask("partial_stats", kwargs=kwargs, organizations=orgs))
    chosen = {k: list(v) for k, v in edges.items()} if edges else histogram_edges(stats, bins)
    not_numeric = [name for name in chosen if "levels" in stats.get(name, {})]
    if not_numeric:
        raise ValueError(f"histogram edges given for categorical columns: {not_numeric}")
    if chosen:
        counts = combine_histograms(
            client.run_subtask("partial_histogram", kwargs={"edges": chosen}, organizations=orgs)
        )
        for name, column_edges in chosen.items():
            stats[name]["histogram"] = {"edges": column_edges, "counts": counts[name]}
    return {"organizations": orgs, "columns": stats}
