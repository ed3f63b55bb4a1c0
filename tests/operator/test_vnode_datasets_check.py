"""`vnode datasets check`: every configured dataset read as an algorithm would (real files, a real sqlite
file, the session's real PostgreSQL with a password role), its rows, columns and problems; exit 1 on any
problem."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from tests import infra
from tests.node.sql_kit import TYPES_TABLE, execute, reader
from vnode_testlib import Dirs, dirs, new_node, vnode

__all__ = ["dirs"]


def with_datasets(dirs: Dirs, name: str, datasets: dict[str, Any]) -> None:
    """A node made by `vnode new`, its config's datasets then replaced by these."""
    new_node(name, "1.secret", "--no-generate-key")
    path = dirs.user_config / "vfed" / "nodes" / f"{name}.yaml"
    config = yaml.safe_load(path.read_text())
    config["datasets"] = datasets
    path.write_text(yaml.safe_dump(config))


def files(folder: Path) -> dict[str, Path]:
    made = {name: folder / name for name in ("a.csv", "b.parquet", "c.sqlite", "header.csv", "empty.csv")}
    made["a.csv"].write_text("age,weight,city\n40,70.5,Gent\n51,,Leuven\n")
    table = pa.table(
        {"id": pa.array([1, 2, 3], pa.int64()), "score": [0.5, None, 2.0], "name": ["x", "y", None]}
    )
    pq.write_table(table, made["b.parquet"], row_group_size=2)
    with sqlite3.connect(made["c.sqlite"]) as connection:
        connection.execute("CREATE TABLE visits (id INTEGER, cost REAL, ward TEXT)")
        connection.executemany("INSERT INTO visits VALUES (?, ?, ?)", [(1, 2.5, "A"), (2, 3.5, "B")])
    connection.close()
    made["header.csv"].write_text("age,weight\n")
    made["empty.csv"].write_text("")
    two = made["two.sqlite"] = folder / "two.sqlite"
    with sqlite3.connect(two) as connection:
        connection.execute("CREATE TABLE x (a INTEGER)")
        connection.execute("CREATE TABLE y (b INTEGER)")
    connection.close()
    junk = made["junk.parquet"] = folder / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    return made


@pytest.mark.postgres
def test_good_and_broken_datasets(
    dirs: Dirs, postgres_server: infra.Postgres, postgres_url: str, tmp_path: Path
) -> None:
    asyncio.run(execute(postgres_url, TYPES_TABLE))
    url, password = asyncio.run(reader(postgres_server, postgres_url, tmp_path))
    wrong = tmp_path / "wrong.password"
    wrong.write_text("wrong\n")
    made = files(tmp_path)
    good = {
        "a": {"uri": str(made["a.csv"]), "type": "csv"},
        "b": {"uri": str(made["b.parquet"]), "type": "parquet"},
        "c": {"uri": str(made["c.sqlite"]), "type": "sqlite"},
        "db": {"uri": url, "type": "sql", "table": "patients", "password_file": str(password)},
        "q": {
            "uri": url,
            "type": "sql",
            "query": "SELECT id, cost FROM patients WHERE id < 3",
            "password_file": str(password),
        },
    }
    with_datasets(dirs, "fine", good)
    result = vnode("datasets", "check", "fine", "--format", "json")
    assert result.exit_code == 0, result.output
    reports = {r["label"]: r for r in json.loads(result.output)}
    assert {label: (r["rows"], r["problems"]) for label, r in reports.items()} == {
        "a": (2, []),
        "b": (3, []),
        "c": (2, []),
        "db": (3, []),
        "q": (2, []),
    }
    assert reports["a"]["columns"][:2] == [
        {"name": "age", "type": "int64"},
        {"name": "weight", "type": "float64"},
    ]
    assert [c["name"] for c in reports["b"]["columns"]] == ["id", "score", "name"]
    assert reports["b"]["columns"][0]["type"] == "int64"
    assert [c["type"] for c in reports["c"]["columns"]][:2] == ["int64", "float64"]
    db_types = {c["name"]: c["type"] for c in reports["db"]["columns"]}
    assert (
        db_types["id"] == "int32"
        and db_types["cost"] == "float64"
        and db_types["smoker"] in ("bool", "object")
    )
    assert reports["db"]["source"].endswith("table patients") and "wrong" not in reports["db"]["source"]
    assert reports["q"]["columns"] == [{"name": "id", "type": "int32"}, {"name": "cost", "type": "float64"}]
    table = vnode("datasets", "check", "fine")
    assert table.exit_code == 0
    assert table.output.splitlines()[0].split() == ["LABEL", "TYPE", "ROWS", "COLUMNS"]
    assert any(line.split()[:3] == ["db", "sql", "3"] for line in table.output.splitlines())

    broken = {
        "missing": {"uri": str(tmp_path / "nowhere.csv"), "type": "csv"},
        "header": {"uri": str(made["header.csv"]), "type": "csv"},
        "empty": {"uri": str(made["empty.csv"]), "type": "csv"},
        "junk": {"uri": str(made["junk.parquet"]), "type": "parquet"},
        "two": {"uri": str(made["two.sqlite"]), "type": "sqlite"},
        "locked": {"uri": url, "type": "sql", "table": "patients", "password_file": str(wrong)},
        "notable": {"uri": url, "type": "sql", "table": "nope", "password_file": str(password)},
        "a": good["a"],
    }
    with_datasets(dirs, "broken", broken)
    result = vnode("datasets", "check", "broken", "--format", "json")
    assert result.exit_code == 1
    problems = {r["label"]: r["problems"] for r in json.loads(result.output)}
    assert problems["missing"] == [f"missing file: {tmp_path / 'nowhere.csv'}"]
    assert problems["header"] == ["empty: no rows"]
    assert problems["empty"] == ["empty: the file holds no table"]
    (junk,) = problems["junk"]
    assert junk.startswith("unreadable: ArrowInvalid")
    assert problems["two"] == ["holds 2 tables (x, y): the SDK reads a single table"]
    (locked,) = problems["locked"]
    assert locked.startswith("the database refused the credentials (")
    assert "password authentication failed" in locked  # the operator's own terminal: the database's words
    assert problems["notable"][0].startswith("its table does not exist")
    assert problems["a"] == []
    table = vnode("datasets", "check", "broken")
    assert table.exit_code == 1
    assert "problem: missing file:" in table.output and "Traceback" not in table.output


def test_a_node_without_datasets(dirs: Dirs) -> None:
    with_datasets(dirs, "bare", {})
    result = vnode("datasets", "check", "bare")
    assert (result.exit_code, result.output.strip()) == (0, "the node's config offers no dataset")
    assert json.loads(vnode("datasets", "check", "bare", "--format", "json").output) == []
