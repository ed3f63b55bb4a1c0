"""Structured outputs: the parts' shapes, the rules the node checks them with, and what researchers get."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vfed.common import disclosure
from vfed.common.disclosure import (
    DP,
    Aggregate,
    Counts,
    DisclosureRefused,
    Histogram,
    Limits,
    MalformedParts,
    Model,
    Parts,
    Rule,
)
from vfed.common.payload import PayloadError, decode_result, encode_result

LIMITS = Limits(min_rows=10, min_cell_count=5, max_glm_saturation=0.33)


def _refused(value: object, limits: Limits = LIMITS) -> Rule:
    document = disclosure.load(encode_result(value))
    assert document is not None
    with pytest.raises(DisclosureRefused) as caught:
        disclosure.check(document, limits)
    return caught.value.rule


def _passes(value: object, limits: Limits = LIMITS) -> object:
    data = encode_result(value)
    document = disclosure.load(data)
    assert document is not None
    disclosure.check(document, limits)
    return decode_result(data)


def test_counts_zero_and_large_cells_pass_small_ones_are_refused() -> None:
    assert _passes(Counts(cells={"a": 12, "b": 0, "c": 5})) == {"a": 12, "b": 0, "c": 5}
    assert _refused(Counts(cells={"a": 12, "b": 4})) is Rule.MIN_CELL_COUNT
    assert _refused(Counts(cells={"x": {"a": 7, "b": 1}, "y": {"a": 9, "b": 30}})) is Rule.MIN_CELL_COUNT
    assert _refused(Counts(cells=[[10, 10], [10, 2]])) is Rule.MIN_CELL_COUNT
    assert _passes(Counts(cells={"a": 1}), Limits(min_cell_count=1)) == {"a": 1}


def test_histogram_bins_are_cells() -> None:
    edges = [0.0, 1.0, 2.0, 3.0]
    assert _passes(Parts(age=Histogram(edges=edges, counts=[6, 0, 9]))) == {
        "age": {"edges": edges, "counts": [6, 0, 9]}
    }
    assert _refused(Parts(age=Histogram(edges=edges, counts=[6, 3, 9]))) is Rule.MIN_CELL_COUNT


def test_aggregates_need_min_rows_and_their_counts_are_cells() -> None:
    value = Aggregate(n=12, value={"mean": 1.5, "m2": 3.0}, counts={"rows": 14, "missing": 2})
    assert _refused(Parts(age=value)) is Rule.MIN_CELL_COUNT
    fine = Aggregate(n=12, value={"mean": 1.5}, counts={"rows": 12, "missing": 0})
    assert _passes(Parts(age=fine)) == {"age": {"n": 12, "rows": 12, "missing": 0, "mean": 1.5}}
    assert _refused(Aggregate(n=9, value=2.0)) is Rule.MIN_ROWS
    assert _passes(Aggregate(n=10, value=2.0)) == 2.0
    assert _passes(Aggregate(n=0, value=None)) is None  # over no records: nothing to disclose


def test_models_are_checked_for_rows_and_saturation() -> None:
    values = {"gradient": [0.1, 0.2, 0.3], "hessian": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "rss": 2.0}
    assert _passes(Model(n=10, parameters=3, values=values)) == {"n": 10, **values}
    assert _refused(Model(n=9, parameters=3, values=values), Limits(min_rows=2)) is Rule.GLM_SATURATION
    assert _refused(Model(n=8, parameters=2, values={}), Limits(min_rows=10)) is Rule.MIN_ROWS
    assert _passes(Model(n=20, parameters=3, values=values), Limits(max_glm_saturation=0.15)) is not None
    assert (
        _refused(Model(n=19, parameters=3, values=values), Limits(max_glm_saturation=0.15))
        is Rule.GLM_SATURATION
    )


def test_a_model_that_understates_its_parameters_is_malformed() -> None:
    lie = {"kind": "model", "n": 100, "parameters": 2, "values": {"rows": [1.0, 2.0, 3.0]}}
    with pytest.raises(MalformedParts, match="more than the 2 declared"):
        disclosure.load(json.dumps({"vfed": 1, "format": "parts", "parts": {"m": lie}}).encode())
    with pytest.raises(ValueError, match="more than the 2 declared"):
        Model(n=100, parameters=2, values={"rows": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError):
        Model(n=100, parameters=2, values={"rows": ["a", "b"]})


def test_dp_parts_need_the_epsilon_the_node_charged() -> None:
    release = DP(epsilon=0.5, value={"value": 41.3, "scale": 2.0})
    assert _refused(release) is Rule.DP_BUDGET
    assert _refused(Parts(a=release, b=release), Limits(epsilon=0.5)) is Rule.DP_BUDGET
    assert _passes(release, Limits(epsilon=0.5)) == {
        "value": 41.3,
        "scale": 2.0,
        "epsilon": 0.5,
        "mechanism": "laplace",
    }


@pytest.mark.parametrize(
    "document",
    [
        {"vfed": 1, "format": "parts", "parts": {}},
        {"vfed": 1, "format": "parts", "parts": {"a": {"kind": "counts", "cells": [1.5]}}},
        {"vfed": 1, "format": "parts", "parts": {"a": {"kind": "counts", "cells": [-1]}}},
        {"vfed": 1, "format": "parts", "parts": {"a": {"kind": "counts", "cells": {"a": "x"}}}},
        {"vfed": 1, "format": "parts", "parts": {"a": {"kind": "counts", "cells": "text"}}},
        {"vfed": 1, "format": "parts", "parts": {"a": {"kind": "secret", "rows": []}}},
        {"vfed": 1, "format": "parts", "parts": {"a": {"kind": "aggregate", "n": 50, "value": ["row"]}}},
        {"vfed": 1, "format": "parts", "parts": {"a": {"kind": "aggregate", "n": 50, "value": 1, "x": 2}}},
        {
            "vfed": 1,
            "format": "parts",
            "parts": {"a": {"kind": "histogram", "edges": [0, 1], "counts": [5, 5]}},
        },
        {"vfed": 1, "format": "parts", "parts": {"a": {"kind": "dp", "epsilon": 1, "value": "Ann"}}},
        {"vfed": 1, "format": "parts", "parts": {"a\n": {"kind": "counts", "cells": [5]}}},
    ],
)
def test_malformed_structured_documents(document: dict[str, object]) -> None:
    data = json.dumps(document).encode()
    with pytest.raises(MalformedParts):
        disclosure.load(data)
    with pytest.raises(PayloadError):
        decode_result(data)


def test_other_outputs_are_not_structured() -> None:
    assert disclosure.load(encode_result({"a": 1})) is None
    assert disclosure.load(b"\x00\x01not json") is None
    assert disclosure.load(b'{"format": "json", "value": 3}') is None


def test_the_client_reads_a_structured_result_file_as_plain_values(tmp_path: Path) -> None:
    from vfed.client.results import load_result_file

    path = tmp_path / "organization-1-run-2.json"
    path.write_bytes(encode_result(Parts(age=Aggregate(n=40, value={"mean": 51.5}, counts={"missing": 0}))))
    assert load_result_file(path) == {"age": {"n": 40, "missing": 0, "mean": 51.5}}
