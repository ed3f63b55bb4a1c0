"""Disclosure control: a federated function never computes over fewer than the node's `min_rows` records.

The node sets `VFED_MIN_ROWS` (default 10). The wrapper checks every dataset a federated function receives;
algorithms call `require_min_rows` themselves on any subset they aggregate (after a filter,
a dropna, a grouping). Counts released cell by cell (a table, the levels of a categorical column) follow the
cell rule: no count from 1 to `VFED_MIN_CELL_COUNT` - 1 (default 5) leaves the node; 0 may.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sized
from typing import Any

MIN_ROWS_ENV = "VFED_MIN_ROWS"
DEFAULT_MIN_ROWS = 10
MIN_CELL_COUNT_ENV = "VFED_MIN_CELL_COUNT"
DEFAULT_MIN_CELL_COUNT = 5


class DisclosureError(Exception):
    """An aggregate would be computed over too few records to be shared."""

    def __init__(self, what: str, rows: int, limit: int, setting: str = MIN_ROWS_ENV) -> None:
        super().__init__(
            f"{what} has {rows} records; this node shares aggregates over at least {limit} "
            f"(disclosure control, {setting}={limit})"
        )
        self.what = what
        self.rows = rows
        self.limit = limit


def _limit(environ: Mapping[str, str] | None, name: str, default: int) -> int:
    env = os.environ if environ is None else environ
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from exc
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
    return value


def min_rows(environ: Mapping[str, str] | None = None) -> int:
    """The node's limit (0 turns the check off); a malformed value fails the run, never skips the check."""
    return _limit(environ, MIN_ROWS_ENV, DEFAULT_MIN_ROWS)


def min_cell_count(environ: Mapping[str, str] | None = None) -> int:
    """The node's smallest count a released cell may hold (besides 0); parsed like `min_rows`."""
    return _limit(environ, MIN_CELL_COUNT_ENV, DEFAULT_MIN_CELL_COUNT)


def require_min_rows(data: Sized | int, what: str = "the data", limit: int | None = None) -> int:
    """Raise DisclosureError unless `data` (a DataFrame, any sized thing, or a count) is large enough."""
    rows = data if isinstance(data, int) else len(data)
    threshold = min_rows() if limit is None else limit
    if rows < threshold:
        raise DisclosureError(what, rows, threshold)
    return rows


def require_min_cells(counts: Mapping[Any, int] | Iterable[int], what: str, limit: int | None = None) -> None:
    """Raise DisclosureError when any count (of a mapping's values, or of an iterable) is from 1 to the
    limit - 1; an empty cell (0) may be released."""
    values = counts.values() if isinstance(counts, Mapping) else counts
    threshold = min_cell_count() if limit is None else limit
    small = [int(count) for count in values if 0 < int(count) < threshold]
    if small:
        raise DisclosureError(f"a cell of {what}", min(small), threshold, MIN_CELL_COUNT_ENV)
