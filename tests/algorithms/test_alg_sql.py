"""SQL datasets through SQLAlchemy URLs: a real PostgreSQL (async driver asyncpg) and sqlite+aiosqlite."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from alg_helpers import EXAMPLES, partitions, run_wrapper
from sqlalchemy.ext.asyncio import create_async_engine

from vfed.common.payload import decode_result

SUMMARY = [EXAMPLES / "summary_stats"]


async def _store(url: str, frame: pd.DataFrame, table: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(lambda sync: frame.to_sql(table, sync, index=False))
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_postgresql_table_and_query(postgres_url: str, tmp_path: Path) -> None:
    frame = partitions()[0]
    await _store(postgres_url, frame, "patients")
    base = {"DATASETS": "default", "DATASET_DEFAULT_URI": postgres_url, "DATASET_DEFAULT_TYPE": "sql"}
    task = {"method": "partial_stats", "kwargs": {"columns": ["age", "bmi"]}}
    process, output = run_wrapper(
        tmp_path, task, {**base, "DATASET_DEFAULT_TABLE": "patients"}, "summary_stats", SUMMARY
    )
    assert process.returncode == 0, process.stderr
    result = decode_result(output or b"")
    assert result["bmi"]["n"] == frame["bmi"].notna().sum()
    assert result["age"]["mean"] == pytest.approx(frame["age"].mean(), rel=1e-12)
    query = {**base, "DATASET_DEFAULT_QUERY": "SELECT age, bmi FROM patients WHERE event = 1"}
    # age only: the subset's few missing bmi values would be a count under the cell minimum (refused)
    ages = {"method": "partial_stats", "kwargs": {"columns": ["age"]}}
    process, output = run_wrapper(tmp_path, ages, query, "summary_stats", SUMMARY)
    assert process.returncode == 0, process.stderr
    assert decode_result(output or b"")["age"]["n"] == int(frame["event"].sum())


async def test_async_sqlite_url_with_a_single_table(tmp_path: Path) -> None:
    frame = partitions()[1]
    url = f"sqlite+aiosqlite:///{tmp_path / 'data.db'}"
    await _store(url, frame, "only_table")
    env = {"DATASETS": "default", "DATASET_DEFAULT_URI": url, "DATASET_DEFAULT_TYPE": "sql"}
    process, output = run_wrapper(tmp_path, {"method": "partial_stats"}, env, "summary_stats", SUMMARY)
    assert process.returncode == 0, process.stderr
    assert decode_result(output or b"")["cost"]["max"] == pytest.approx(frame["cost"].max())


async def test_database_with_several_tables_needs_a_choice(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'data.db'}"
    await _store(url, partitions()[0], "first")
    await _store(url, partitions()[1], "second")
    env = {"DATASETS": "default", "DATASET_DEFAULT_URI": url, "DATASET_DEFAULT_TYPE": "sql"}
    process, _ = run_wrapper(tmp_path, {"method": "partial_stats"}, env, "summary_stats", SUMMARY)
    assert process.returncode == 2
    assert (
        "holds tables ['first', 'second']: set DATASET_DEFAULT_TABLE or DATASET_DEFAULT_QUERY"
        in process.stderr
    )
