"""`vfed.algorithms.testing.local_datasets`: dataset files read for `LocalClient` by the loader a node's run
uses, so a local test sees the DataFrames the image will see."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from vfed.algorithms.datasets import DatasetError
from vfed.algorithms.testing import local_datasets


def test_files_are_read_by_their_type(tmp_path: Path) -> None:
    frame = pd.DataFrame({"id": [1, 2, 3], "value": [1.5, None, 3.0], "group": ["a", "b", "a"]})
    frame.to_csv(tmp_path / "one.csv", index=False)
    frame.to_parquet(tmp_path / "two.parquet")
    with sqlite3.connect(tmp_path / "three.db") as db:
        frame.to_sql("patients", db, index=False)
    frames = local_datasets(
        {
            1: {"default": tmp_path / "one.csv"},
            2: {"default": str(tmp_path / "two.parquet"), "extra": tmp_path / "one.csv"},
            3: {"default": tmp_path / "three.db"},
        }
    )
    assert sorted(frames) == [1, 2, 3] and sorted(frames[2]) == ["default", "extra"]
    for org in (1, 2, 3):
        pd.testing.assert_frame_equal(frames[org]["default"], frame)


def test_a_file_that_cannot_be_read_says_which(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("id,value\n1,2\n")
    with pytest.raises(DatasetError, match="has type 'txt'; known types: csv, parquet, sqlite, sql"):
        local_datasets({1: {"default": tmp_path / "notes.txt"}})
    frames = local_datasets({1: {"default": tmp_path / "notes.txt"}}, kind="csv")  # the type given wins
    assert frames[1]["default"].to_dict("list") == {"id": [1], "value": [2]}
    with pytest.raises(DatasetError, match="cannot read dataset 'default' \\(csv\\)"):
        local_datasets({1: {"default": tmp_path / "missing.csv"}})
