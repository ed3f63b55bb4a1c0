"""Points in time as the ledger commands take and show them: `30d`, `12h`, `2027-01-31`,
`2027-01-31T12:00`."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from vfed.node.operator.common import BadInput

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^(\d{1,6})([smhdw])$")
FORMS = "a duration (30d, 12h, 2w, 90m) or a UTC date or time (2027-01-31, 2027-01-31T12:00)"


def parse_duration(text: str) -> int | None:
    """Seconds of `N[smhdw]`, or None when the text is not a duration."""
    found = _DURATION.match(text.strip().lower())
    return int(found.group(1)) * _UNITS[found.group(2)] if found else None


def parse_when(text: str, now: float, option: str) -> int:
    """Unix seconds: a duration counts from now; a date is its midnight UTC; a time without zone is UTC.
    BadInput (one line, naming `option`) for anything else."""
    seconds = parse_duration(text)
    if seconds is not None:
        return int(now) + seconds
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadInput(option, f"{text!r} is not {FORMS}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def span(text: str, option: str) -> int:
    """A duration only (`--expiring 7d`)."""
    seconds = parse_duration(text)
    if seconds is None:
        raise BadInput(option, f"{text!r} is not a duration (7d, 12h, 2w, 90m)")
    return seconds


def show(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%MZ")


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
