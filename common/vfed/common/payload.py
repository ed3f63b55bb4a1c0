"""The bytes that travel between researcher, node, proxy and algorithm: task inputs and run results.

No pickle anywhere: inputs are JSON, results are JSON (plain values, or the structured parts of
vfed.common.disclosure that a node checks before release) or Parquet (tables), and the bytes themselves say
which. pandas/pyarrow are imported only when a table is encoded or decoded, so the node,
server and proxy can use this module without them.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 1
PARQUET_MAGIC = b"PAR1"
JSON_CONTENT_TYPE = "application/json"
PARQUET_CONTENT_TYPE = "application/vnd.apache.parquet"


class PayloadError(ValueError):
    """Bytes that are not a vfed payload (truncated, not JSON/Parquet, wrong version)."""


class AlgorithmError(Exception):
    """An algorithm's run ended in an exception; decoding its output raises this with the details."""

    def __init__(self, type: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.traceback = traceback


class TaskInput(BaseModel):
    """What an algorithm run is asked to do: call `method(*args, **kwargs)`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field(min_length=1, max_length=200)
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    def to_json(self) -> bytes:
        """The wire form (UTF-8 JSON); NaN and infinities are refused because JSON has none."""
        return json.dumps(self.model_dump(), allow_nan=False, separators=(",", ":"), default=_plain).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> TaskInput:
        """Parse and validate the wire form; raises pydantic.ValidationError on bad input."""
        return cls.model_validate_json(data)


def _is_dataframe(value: object) -> bool:
    # Checked by module name first so that plain values never trigger a pandas import.
    if not type(value).__module__.startswith("pandas"):
        return False
    import pandas as pd

    return isinstance(value, pd.DataFrame | pd.Series)


_UNENCODABLE = (
    "cannot encode a {} as a result: return JSON-like values "
    "(dict, list, str, int, float, bool, None, numpy values) or a pandas DataFrame"
)


def _plain(value: Any) -> Any:
    """json.dumps fallback: numpy arrays and scalars as plain Python (numpy is never imported here)."""
    if type(value).__module__ == "numpy":
        for attr in ("tolist", "item"):
            convert = getattr(value, attr, None)
            if callable(convert):
                return convert()
    raise TypeError(_UNENCODABLE.format(type(value).__name__))


def _to_jsonable(value: Any) -> Any:
    """Plain Python from numpy scalars/arrays and nested containers; non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_jsonable(v) for v in value]
    if type(value).__module__ == "numpy":
        return _to_jsonable(_plain(value))
    raise TypeError(_UNENCODABLE.format(type(value).__name__))


def _encode_table(value: Any) -> bytes:
    import pandas as pd

    frame = value.to_frame() if isinstance(value, pd.Series) else value
    buffer = io.BytesIO()
    frame.to_parquet(buffer, engine="pyarrow")
    return buffer.getvalue()


def encode_result(value: Any) -> bytes:
    """A result as bytes: a structured document for `Parts` or one part (vfed.common.disclosure), Parquet
    for a DataFrame (a Series becomes a one-column frame), JSON otherwise."""
    if type(value).__module__ == "vfed.common.disclosure":
        from vfed.common import disclosure

        structured = disclosure.as_document(value)
        if structured is not None:
            return disclosure.encode(structured)
    if _is_dataframe(value):
        return _encode_table(value)
    document = {"vfed": FORMAT_VERSION, "format": "json", "value": value}
    try:  # fast path: the json module walks the value in C
        return json.dumps(document, allow_nan=False, separators=(",", ":"), default=_plain).encode()
    except ValueError:  # a NaN or infinity somewhere: rewrite them as null
        document["value"] = _to_jsonable(value)
        return json.dumps(document, allow_nan=False, separators=(",", ":")).encode()


def encode_error(exc_type: str, message: str, traceback: str = "", rule: str | None = None) -> bytes:
    """The output of a failed run: what went wrong (with `rule`: the disclosure rule that refused it, which
    the node may name in the run's reason), readable by the researcher."""
    error = {"type": exc_type, "message": message, "traceback": traceback}
    if rule is not None:
        error["rule"] = rule
    document = {"vfed": FORMAT_VERSION, "format": "error", "error": error}
    return json.dumps(document, separators=(",", ":")).encode()


def is_parquet(data: bytes) -> bool:
    """Parquet files start and end with the PAR1 magic."""
    return len(data) >= 8 and data[:4] == PARQUET_MAGIC and data[-4:] == PARQUET_MAGIC


def result_content_type(data: bytes) -> str:
    """The HTTP content type of encoded result bytes."""
    return PARQUET_CONTENT_TYPE if is_parquet(data) else JSON_CONTENT_TYPE


def _decode_table(data: bytes) -> Any:
    import pandas as pd

    try:
        return pd.read_parquet(io.BytesIO(data), engine="pyarrow")
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise PayloadError(f"unreadable Parquet result: {exc}") from exc


def _load_document(data: bytes) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"result is neither Parquet nor JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("vfed") != FORMAT_VERSION:
        raise PayloadError(f"not a vfed result document (expected version {FORMAT_VERSION})")
    return document


def decode_result(data: bytes) -> Any:
    """The value an algorithm returned (a DataFrame for tables); raises AlgorithmError for an error output."""
    if is_parquet(data):
        return _decode_table(data)
    document = _load_document(data)
    kind = document.get("format")
    if kind == "json":
        return document.get("value")
    if kind == "parts":
        from vfed.common import disclosure

        try:
            return disclosure.decoded(disclosure.parse(document))
        except disclosure.MalformedParts as exc:
            raise PayloadError(f"malformed structured result: {exc}") from exc
    if kind == "error":
        error = document.get("error")
        if not isinstance(error, dict):
            raise PayloadError("error output without an 'error' object")
        raise AlgorithmError(
            str(error.get("type", "Error")), str(error.get("message", "")), str(error.get("traceback", ""))
        )
    raise PayloadError(f"unknown result format {kind!r}")
