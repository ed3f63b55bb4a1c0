"""How a benchmark prints what it measured: one JSON object with --json, else one aligned line per key."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def emit(results: Mapping[str, Any], as_json: bool) -> None:
    """Print `results`: a JSON object (`--json`, the keys the issue names), else `key  value` lines."""
    if as_json:
        print(json.dumps(results))
        return
    width = max((len(key) for key in results), default=0) + 2
    for key, value in results.items():
        print(f"{key:{width}s}{value:12.2f}" if isinstance(value, float) else f"{key:{width}s}{value}")
