"""`python -m vfed.algorithms` as the node runs it: a subprocess with INPUT_FILE, OUTPUT_FILE and DATASET_*
variables pointing at real CSV, Parquet and SQLite files."""

from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from alg_helpers import EXAMPLES, example, partitions, run_wrapper, sdk_pythonpath

from vfed.common.manifest import Manifest
from vfed.common.payload import AlgorithmError, decode_result, encode_result

SUMMARY = [EXAMPLES / "summary_stats"]
CRASHY = textwrap.dedent(
    """
    from vfed.algorithms import federated, central

    @federated(datasets=["default"])
    def explode(df, divisor):
        return len(df) / divisor

    @federated(datasets=["default"])
    def as_table(df):
        return df.describe()

    @federated(datasets=["left", "right"])
    def both(left, right):
        return {"left": len(left), "right": len(right)}

    @federated(datasets=["default"])
    def unencodable(df):
        return {1, 2}

    def undeclared(df):
        return "must never run"
    """
)


def _csv(tmp_path: Path, frame: pd.DataFrame, name: str = "data.csv") -> dict[str, str]:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return {"DATASETS": "default", "DATASET_DEFAULT_URI": str(path), "DATASET_DEFAULT_TYPE": "csv"}


@pytest.fixture
def crashy(tmp_path: Path) -> Path:
    folder = tmp_path / "algorithm"
    folder.mkdir()
    (folder / "crashy.py").write_text(CRASHY)
    return folder


def test_federated_function_on_csv(tmp_path: Path) -> None:
    frame = partitions()[0]
    task = {"method": "partial_stats", "args": [], "kwargs": {"columns": ["age", "bmi"]}}
    process, output = run_wrapper(tmp_path, task, _csv(tmp_path, frame), "summary_stats", SUMMARY)
    assert process.returncode == 0, process.stderr
    assert output is not None
    expected = decode_result(
        encode_result(example("summary_stats").partial_stats(frame, columns=["age", "bmi"]))
    )
    result = decode_result(output)
    assert result["age"]["n"] == expected["age"]["n"] == len(frame)
    assert result["bmi"]["mean"] == pytest.approx(expected["bmi"]["mean"], rel=1e-12)
    assert "running partial_stats" in process.stderr


def test_federated_function_on_parquet_returns_parquet(tmp_path: Path, crashy: Path) -> None:
    frame = partitions()[1]
    path = tmp_path / "data.parquet"
    frame.to_parquet(path)
    env = {"DATASETS": "default", "DATASET_DEFAULT_URI": f"file://{path}", "DATASET_DEFAULT_TYPE": "parquet"}
    process, output = run_wrapper(tmp_path, {"method": "as_table"}, env, "crashy", [crashy])
    assert process.returncode == 0, process.stderr
    assert output is not None and output[:4] == b"PAR1"
    pd.testing.assert_frame_equal(decode_result(output), frame.describe())


def test_sqlite_dataset_by_table_query_and_single_table(tmp_path: Path) -> None:
    frame = partitions()[2]
    database = tmp_path / "data.db"
    with sqlite3.connect(database) as connection:
        frame.to_sql("patients", connection, index=False)
    task = {"method": "partial_stats", "kwargs": {"columns": ["age"]}}
    base = {"DATASETS": "default", "DATASET_DEFAULT_URI": str(database), "DATASET_DEFAULT_TYPE": "sqlite"}
    process, output = run_wrapper(tmp_path, task, base, "summary_stats", SUMMARY)
    assert process.returncode == 0, process.stderr
    assert decode_result(output or b"")["age"]["n"] == len(frame)
    query = {**base, "DATASET_DEFAULT_QUERY": "SELECT age FROM patients WHERE age > 50"}
    process, output = run_wrapper(tmp_path, task, query, "summary_stats", SUMMARY)
    assert process.returncode == 0, process.stderr
    assert decode_result(output or b"")["age"]["n"] == int((frame["age"] > 50).sum())
    url = {**base, "DATASET_DEFAULT_URI": f"sqlite:///{database}", "DATASET_DEFAULT_TYPE": "sql"}
    process, output = run_wrapper(
        tmp_path, task, {**url, "DATASET_DEFAULT_TABLE": "patients"}, "summary_stats", SUMMARY
    )
    assert process.returncode == 0, process.stderr
    assert decode_result(output or b"")["age"]["max"] == pytest.approx(frame["age"].max())
    assert database.stat().st_size > 0


def test_two_datasets_arrive_in_declared_order(tmp_path: Path, crashy: Path) -> None:
    left, right = tmp_path / "l.csv", tmp_path / "r.csv"
    pd.DataFrame({"x": range(12)}).to_csv(left, index=False)
    pd.DataFrame({"x": range(15)}).to_csv(right, index=False)
    env = {
        "DATASETS": "right,left",
        "DATASET_LEFT_URI": str(left),
        "DATASET_LEFT_TYPE": "csv",
        "DATASET_RIGHT_URI": str(right),
        "DATASET_RIGHT_TYPE": "csv",
    }
    process, output = run_wrapper(tmp_path, {"method": "both"}, env, "crashy", [crashy])
    assert process.returncode == 0, process.stderr
    assert decode_result(output or b"") == {"left": 12, "right": 15}


def test_exception_gives_error_output_and_traceback_in_log(tmp_path: Path, crashy: Path) -> None:
    env = _csv(tmp_path, pd.DataFrame({"x": range(20)}))
    process, output = run_wrapper(tmp_path, {"method": "explode", "args": [0]}, env, "crashy", [crashy])
    assert process.returncode == 1
    assert "Traceback (most recent call last)" in process.stderr
    assert "ZeroDivisionError: division by zero" in process.stderr
    with pytest.raises(AlgorithmError) as caught:
        decode_result(output or b"")
    assert caught.value.type == "ZeroDivisionError"
    assert "in explode" in caught.value.traceback


def test_unencodable_result_is_an_error_output(tmp_path: Path, crashy: Path) -> None:
    env = _csv(tmp_path, pd.DataFrame({"x": range(20)}))
    process, output = run_wrapper(tmp_path, {"method": "unencodable"}, env, "crashy", [crashy])
    assert process.returncode == 1
    with pytest.raises(AlgorithmError, match="cannot encode a set"):
        decode_result(output or b"")


def test_disclosure_control_refuses_a_small_dataset(tmp_path: Path) -> None:
    env = _csv(tmp_path, partitions()[0].head(9))
    process, output = run_wrapper(tmp_path, {"method": "partial_stats"}, env, "summary_stats", SUMMARY)
    assert process.returncode == 3
    assert "traceback" not in process.stderr.lower()
    with pytest.raises(AlgorithmError) as caught:
        decode_result(output or b"")
    assert caught.value.type == "DisclosureError"
    assert caught.value.message == (
        "dataset 'default' has 9 records; this node shares aggregates over at least 10 "
        "(disclosure control, VFED_MIN_ROWS=10)"
    )


def test_node_sets_the_disclosure_limit(tmp_path: Path) -> None:
    env = _csv(tmp_path, partitions()[0].head(40))
    strict = {**env, "VFED_MIN_ROWS": "50"}
    process, output = run_wrapper(tmp_path, {"method": "partial_stats"}, strict, "summary_stats", SUMMARY)
    assert process.returncode == 3
    with pytest.raises(AlgorithmError, match=r"has 40 records; .* at least 50"):
        decode_result(output or b"")
    lenient = {**env, "VFED_MIN_ROWS": "5"}
    task = {"method": "partial_stats", "kwargs": {"columns": ["age"]}}  # bmi: 1 to 4 missing, a small count
    process, output = run_wrapper(tmp_path, task, lenient, "summary_stats", SUMMARY)
    assert process.returncode == 0, process.stderr
    broken = {**env, "VFED_MIN_ROWS": "ten"}
    process, output = run_wrapper(tmp_path, {"method": "partial_stats"}, broken, "summary_stats", SUMMARY)
    assert process.returncode == 2, "a malformed limit must fail the run, never skip the check"


@pytest.mark.parametrize(
    ("task", "env_update", "message"),
    [
        (b"{not json", {}, "INPUT_FILE is not a valid task input"),
        ({"method": "undeclared"}, {}, "method 'undeclared' is not a declared function of crashy"),
        ({"method": "explode", "pickle": "x"}, {}, "pickle: Extra inputs are not permitted"),
        ({"method": "explode"}, {"DATASETS": ""}, "dataset 'default' is not offered to this run"),
        ({"method": "explode"}, {"DATASET_DEFAULT_TYPE": "xlsx"}, "has type 'xlsx'; known types"),
        (
            {"method": "explode"},
            {"DATASET_DEFAULT_URI": "/nonexistent.csv"},
            "cannot read dataset 'default' (csv)",
        ),
        (
            {"method": "explode"},
            {"VFED_ALGORITHM_MODULE": "no_such_module"},
            "cannot import algorithm module",
        ),
    ],
)
def test_setup_errors_exit_2_with_one_clear_line(
    tmp_path: Path, crashy: Path, task: dict[str, object] | bytes, env_update: dict[str, str], message: str
) -> None:
    env = {**_csv(tmp_path, pd.DataFrame({"x": range(20)})), **env_update}
    process, output = run_wrapper(
        tmp_path, task, env, env_update.get("VFED_ALGORITHM_MODULE", "crashy"), [crashy]
    )
    assert process.returncode == 2
    assert message in process.stderr
    assert "Traceback" not in process.stderr
    with pytest.raises(AlgorithmError) as caught:
        decode_result(output or b"")
    assert message in caught.value.message


def test_missing_input_file_without_output_still_fails_cleanly(tmp_path: Path) -> None:
    process, output = run_wrapper(
        tmp_path, {"method": "x"}, {"INPUT_FILE": str(tmp_path / "nope")}, "summary_stats", SUMMARY
    )
    assert process.returncode == 2
    assert "cannot read INPUT_FILE" in process.stderr
    assert output is not None


def test_central_function_without_a_proxy_is_refused(tmp_path: Path) -> None:
    process, output = run_wrapper(tmp_path, {"method": "summary"}, {}, "summary_stats", SUMMARY)
    assert process.returncode == 2
    assert "no proxy configured" in process.stderr
    with pytest.raises(AlgorithmError, match="PROXY_SOCKET"):
        decode_result(output or b"")


def test_epsilon_is_checked_before_the_run(tmp_path: Path) -> None:
    env = _csv(tmp_path, partitions()[0])
    path = [EXAMPLES / "dp_stats"]
    process, output = run_wrapper(tmp_path, {"method": "dp_count"}, env, "dp_stats", path)
    assert process.returncode == 2
    assert "'epsilon' (epsilon) is required" in process.stderr
    granted = {**env, "VFED_EPSILON_GRANTED": "0.5"}
    task = {"method": "dp_count", "kwargs": {"epsilon": 1.0}}
    process, output = run_wrapper(tmp_path, task, granted, "dp_stats", path)
    assert process.returncode == 2
    assert "epsilon 1 exceeds the 0.5 the node granted" in process.stderr
    task = {"method": "dp_count", "kwargs": {"epsilon": 0.5}}
    process, output = run_wrapper(tmp_path, task, granted, "dp_stats", path)
    assert process.returncode == 0, process.stderr
    assert decode_result(output or b"")["scale"] == 2.0


def test_manifest_lists_declared_functions(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {"PYTHONPATH": sdk_pythonpath(EXAMPLES / "dp_stats"), "PATH": ""}
    answer = subprocess.run(
        [sys.executable, "-m", "vfed.algorithms", "--manifest", "--module", "dp_stats"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    manifest = Manifest.model_validate(json.loads(answer.stdout))
    assert set(manifest.functions) == {"dp_count", "dp_sum", "dp_total"}
    assert manifest.functions["dp_sum"].datasets == ("default",)
