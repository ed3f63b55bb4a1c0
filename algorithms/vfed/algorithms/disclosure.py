"""Disclosure control in the SDK: the node's rules, applied early so an author gets a clear error.

The node sets `VFED_MIN_ROWS` (default 10), `VFED_MIN_CELL_COUNT` (default 5) and
`VFED_MAX_GLM_SATURATION` (default 0.33), the same numbers it checks the run's output with. The wrapper checks
every dataset a federated function receives against min_rows, and a structured output (`Parts`, or one part,
vfed.common.disclosure) against every rule before writing it. Algorithms call `require_min_rows` themselves on
any subset they aggregate (after a filter, a dropna, a grouping). Counts released cell by cell (a table, the
levels of a categorical column) follow the cell rule: no count from 1 to `VFED_MIN_CELL_COUNT` - 1 leaves the
node; 0 may (`require_min_cells`).

The node does not rely on any of this: it decodes the output and applies the rules again itself.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sized
from typing import Any

from vfed.common import disclosure

MIN_ROWS_ENV = "VFED_MIN_ROWS"
DEFAULT_MIN_ROWS = 10
MIN_CELL_COUNT_ENV = "VFED_MIN_CELL_COUNT"
DEFAULT_MIN_CELL_COUNT = 5
MAX_GLM_SATURATION_ENV = "VFED_MAX_GLM_SATURATION"
DEFAULT_MAX_GLM_SATURATION = 0.33
EPSILON_GRANTED_ENV = "VFED_EPSILON_GRANTED"


class DisclosureError(Exception):
    """A result would disclose too much to be shared: an aggregate over too few records, a count too small,
    a model too saturated. `rule` is the rule's name as the node reports it (`min-rows`, ...)."""

    def __init__(
        self,
        what: str,
        rows: int,
        limit: int,
        setting: str = MIN_ROWS_ENV,
        *,
        rule: str | None = None,
        message: str | None = None,
    ) -> None:
        super().__init__(
            message
            or f"{what} has {rows} records; this node shares aggregates over at least {limit} "
            f"(disclosure control, {setting}={limit})"
        )
        self.what = what
        self.rows = rows
        self.limit = limit
        cells = setting == MIN_CELL_COUNT_ENV
        self.rule = rule or (disclosure.Rule.MIN_CELL_COUNT if cells else disclosure.Rule.MIN_ROWS).value


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


def max_glm_saturation(environ: Mapping[str, str] | None = None) -> float:
    """The most model parameters per record the node releases, in (0, 1]; malformed fails the run."""
    env = os.environ if environ is None else environ
    raw = env.get(MAX_GLM_SATURATION_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_GLM_SATURATION
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{MAX_GLM_SATURATION_ENV} must be a number, got {raw!r}") from exc
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"{MAX_GLM_SATURATION_ENV} must be in (0, 1], got {raw!r}")
    return value


def limits(environ: Mapping[str, str] | None = None) -> disclosure.Limits:
    """Every limit the node set for this run, with the epsilon it charged (if any)."""
    env = os.environ if environ is None else environ
    granted = env.get(EPSILON_GRANTED_ENV, "").strip()
    return disclosure.Limits(
        min_rows=min_rows(env),
        min_cell_count=min_cell_count(env),
        max_glm_saturation=max_glm_saturation(env),
        epsilon=float(granted) if granted else None,
    )


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


def require_disclosable(value: object, limit: disclosure.Limits | None = None) -> None:
    """Raise DisclosureError when `value` is structured (`Parts`, one part) and breaks a rule the node
    checks; MalformedParts when its parts are not valid; other values pass (the node decides about them)."""
    document = disclosure.as_document(value)
    if document is None:
        return
    try:
        disclosure.check(document, limits() if limit is None else limit)
    except disclosure.DisclosureRefused as exc:
        message = f"disclosure control ({exc.rule.value}): {exc.detail}"
        raise DisclosureError("the result", 0, 0, rule=exc.rule.value, message=message) from None
