"""Disclosure control: a federated function never computes over fewer than the node's `min_rows` records.

The node sets `VFED_MIN_ROWS` (default 10). The wrapper checks every dataset a federated function receives;
algorithms call `require_min_rows` themselves on any subset they aggregate (after a filter,
a dropna, a grouping).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sized

MIN_ROWS_ENV = "VFED_MIN_ROWS"
DEFAULT_MIN_ROWS = 10


class DisclosureError(Exception):
    """An aggregate would be computed over too few records to be shared."""

    def __init__(self, what: str, rows: int, limit: int) -> None:
        super().__init__(
            f"{what} has {rows} records; this node shares aggregates over at least {limit} "
            f"(disclosure control, {MIN_ROWS_ENV}={limit})"
        )
        self.what = what
        self.rows = rows
        self.limit = limit


def min_rows(environ: Mapping[str, str] | None = None) -> int:
    """The node's limit (0 turns the check off); a malformed value fails the run, never skips the check."""
    env = os.environ if environ is None else environ
    raw = env.get(MIN_ROWS_ENV, "").strip()
    if not raw:
        return DEFAULT_MIN_ROWS
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{MIN_ROWS_ENV} must be a whole number, got {raw!r}") from exc
    if value < 0:
        raise ValueError(f"{MIN_ROWS_ENV} must not be negative, got {value}")
    return value


def require_min_rows(data: Sized | int, what: str = "the data", limit: int | None = None) -> int:
    """Raise DisclosureError unless `data` (a DataFrame, any sized thing, or a count) is large enough."""
    rows = data if isinstance(data, int) else len(data)
    threshold = min_rows() if limit is None else limit
    if rows < threshold:
        raise DisclosureError(what, rows, threshold)
    return rows
