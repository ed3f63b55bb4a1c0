"""The shared payload format: task inputs and results as JSON or Parquet, never pickle."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from vfed.common.payload import (
    JSON_CONTENT_TYPE,
    PARQUET_CONTENT_TYPE,
    AlgorithmError,
    PayloadError,
    TaskInput,
    decode_result,
    encode_error,
    encode_result,
    result_content_type,
)


def test_task_input_round_trips_through_json() -> None:
    original = TaskInput(method="partial_stats", args=[1, "a"], kwargs={"columns": ["age"], "bins": 5})
    wire = original.to_json()
    assert json.loads(wire) == {
        "method": "partial_stats",
        "args": [1, "a"],
        "kwargs": {"columns": ["age"], "bins": 5},
    }
    assert TaskInput.from_json(wire) == original


@pytest.mark.parametrize(
    "wire",
    [
        b'{"args": []}',
        b'{"method": "", "args": []}',
        b'{"method": "m", "extra": 1}',
        b'{"method": "m", "args": 3}',
        b"\x80",
    ],
)
def test_task_input_rejects_bad_documents(wire: bytes) -> None:
    with pytest.raises(ValidationError):
        TaskInput.from_json(wire)


def test_task_input_refuses_nan() -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        TaskInput(method="m", kwargs={"x": float("nan")}).to_json()


def test_plain_values_are_a_json_document() -> None:
    value = {"n": 3, "mean": 1.5, "items": [1, 2, None], "ok": True, "name": "x"}
    data = encode_result(value)
    assert json.loads(data) == {"vfed": 1, "format": "json", "value": value}
    assert result_content_type(data) == JSON_CONTENT_TYPE
    assert decode_result(data) == value


def test_numpy_values_become_plain_json() -> None:
    value = {"a": np.arange(3), "b": np.float64(2.5), "c": np.int64(7), "d": np.bool_(True), "e": (1, 2)}
    assert decode_result(encode_result(value)) == {"a": [0, 1, 2], "b": 2.5, "c": 7, "d": True, "e": [1, 2]}


def test_non_finite_floats_become_null() -> None:
    assert decode_result(encode_result([float("nan"), float("inf"), 1.0])) == [None, None, 1.0]


def test_unencodable_values_are_refused_with_a_reason() -> None:
    with pytest.raises(TypeError, match="cannot encode a set"):
        encode_result({"s": {1, 2}})


def test_dataframe_is_parquet_and_round_trips() -> None:
    frame = pd.DataFrame({"x": [1.0, 2.5, np.nan], "name": ["a", "b", "c"], "n": [1, 2, 3]})
    data = encode_result(frame)
    assert data[:4] == b"PAR1" and data[-4:] == b"PAR1"
    assert result_content_type(data) == PARQUET_CONTENT_TYPE
    pd.testing.assert_frame_equal(decode_result(data), frame)


def test_series_becomes_a_one_column_table() -> None:
    decoded = decode_result(encode_result(pd.Series([1, 2, 3], name="count")))
    assert list(decoded.columns) == ["count"] and decoded["count"].tolist() == [1, 2, 3]


def test_error_output_raises_algorithm_error_with_its_fields() -> None:
    data = encode_error("ZeroDivisionError", "division by zero", "Traceback...\nZeroDivisionError")
    assert result_content_type(data) == JSON_CONTENT_TYPE
    with pytest.raises(AlgorithmError) as caught:
        decode_result(data)
    assert (caught.value.type, caught.value.message) == ("ZeroDivisionError", "division by zero")
    assert caught.value.traceback.endswith("ZeroDivisionError")
    assert str(caught.value) == "ZeroDivisionError: division by zero"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json", "neither Parquet nor JSON"),
        (b'{"format": "json", "value": 1}', "not a vfed result"),
        (b'{"vfed": 1, "format": "pickle"}', "unknown result format"),
        (b'{"vfed": 1, "format": "error"}', "without an 'error' object"),
        (b"PAR1garbagePAR1", "unreadable Parquet"),
        (b"[1, 2]", "not a vfed result"),
    ],
)
def test_garbage_is_a_payload_error(data: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason):
        decode_result(data)


def test_plain_values_never_import_pandas() -> None:
    """The node, server and proxy use this module without pandas: a plain result must not load it."""
    code = (
        "import sys; from vfed.common.payload import encode_result, decode_result, TaskInput;"
        "decode_result(encode_result({'a': [1, 2.0]})); TaskInput(method='m').to_json();"
        "print('pandas' in sys.modules, 'pyarrow' in sys.modules)"
    )
    answer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert answer.stdout.split() == ["False", "False"]
