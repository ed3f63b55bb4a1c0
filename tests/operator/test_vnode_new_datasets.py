"""`vnode new --dataset LABEL=URI[:TYPE]`: only the types the algorithm SDK reads, colons in URIs, the type
from the suffix; and a node config naming another type does not load. Through the real CLI and real files.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from vnode_testlib import Dirs, dirs, vnode

from vfed.algorithms.datasets import DatasetType, load_dataset
from vfed.node.config import DATASET_TYPES, ConfigError, load_settings

__all__ = ["dirs"]

ACCEPTED = "accepted: csv, parquet, sqlite, sql"


def config_path(dirs: Dirs, name: str) -> Path:
    return dirs.user_config / "vfed" / "nodes" / f"{name}.yaml"


def new(name: str, *datasets: str, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    args = ["new", name, "--api-key", "1.secret", "--no-generate-key", *extra]
    for dataset in datasets:
        args += ["--dataset", dataset]
    result = vnode(*args)
    return result.exit_code, result.output


def test_the_node_accepts_exactly_the_types_the_sdk_reads() -> None:
    assert set(DATASET_TYPES) == {t.value for t in DatasetType}


def test_uris_with_colons_and_types_from_suffixes(
    dirs: Dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    colon = tmp_path / "a:b.csv"
    odd = tmp_path / "odd:name"  # no suffix, a colon: exists, so ':name' is not taken for a type
    for path in (colon, odd):
        path.write_text("x\n1\n")
    monkeypatch.chdir(tmp_path)
    code, output = new(
        "colons",
        "db=postgresql://u@db.example:5432/x:sql",
        "inferred=postgresql+psycopg://u@db.example:5432/x",
        f"file={colon}",
        "pq=/data/x.parquet:parquet",
        "pq2=/data/y.PQ",
        "lite=/data/z.sqlite3",
        "upper=/data/A.CSV:CSV",
        "relative=tables/visits.db",
        f"named={odd}:csv",
        "url=file:///data/w.csv",
        extra=("--dataset-table", "db=patients", "--dataset-query", "inferred=SELECT 1"),
    )
    assert code == 0, output
    settings = load_settings(config_path(dirs, "colons"))
    assert {label: (d.uri, d.type) for label, d in settings.datasets.items()} == {
        "db": ("postgresql://u@db.example:5432/x", "sql"),
        "inferred": ("postgresql+psycopg://u@db.example:5432/x", "sql"),
        "file": (str(colon), "csv"),
        "pq": ("/data/x.parquet", "parquet"),
        "pq2": ("/data/y.PQ", "parquet"),
        "lite": ("/data/z.sqlite3", "sqlite"),
        "upper": ("/data/A.CSV", "csv"),
        "relative": (str(tmp_path / "tables" / "visits.db"), "sqlite"),
        "named": (str(odd), "csv"),
        "url": ("file:///data/w.csv", "csv"),
    }


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ("x=/data/x.xlsx:excel", f"type 'excel' is not one the algorithm SDK reads; {ACCEPTED}"),
        ("x=/data/x.json:json", f"type 'json' is not one the algorithm SDK reads; {ACCEPTED}"),
        ("x=/data/omop:omop", f"type 'omop' is not one the algorithm SDK reads; {ACCEPTED}"),
        (
            "x=https://q.example/sparql:sparql",
            f"type 'sparql' is not one the algorithm SDK reads; {ACCEPTED}",
        ),
        ("x=/data/scans:folder", f"type 'folder' is not one the algorithm SDK reads; {ACCEPTED}"),
        (
            "x=/data/x.json",
            "cannot tell the type from the name 'x.json'; add :TYPE (csv, parquet, sqlite, sql)",
        ),
        ("x=/data/noext", "cannot tell the type from the name 'noext'"),
        ("x=/data/x.csv:sql", "a sql dataset is a database URL"),
        ("x=postgresql://u@h:5432/x:csv", "a csv dataset is a file path, not a postgresql:// URL"),
        ("x=https://files.example/x.csv", "cannot tell the type of a https:// URI"),
        ("nolabel", "expected LABEL=URI[:TYPE]"),
    ],
)
def test_refused_datasets_give_one_line_and_write_nothing(dirs: Dirs, dataset: str, expected: str) -> None:
    code, output = new("refused", dataset)
    assert code == 2
    (line,) = output.strip().splitlines()  # one line, no usage text
    assert line.startswith(f"Error: --dataset: {dataset!r}: ")
    assert expected in line
    assert "Traceback" not in output
    assert not config_path(dirs, "refused").exists()


def test_a_folder_is_refused_with_or_without_a_type(dirs: Dirs, tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    code, output = new("folder", f"scans={scans}")
    assert code == 2
    assert output.strip() == (
        f"Error: --dataset: 'scans={scans}': {scans} is a folder; the algorithm SDK reads files "
        "(csv, parquet, sqlite) or a database URL (sql)"
    )
    code, output = new("folder", f"scans={scans}:csv")
    assert code == 2
    assert (
        output.strip()
        == f"Error: --dataset: 'scans={scans}:csv': {scans} is a folder; a csv dataset is a file"
    )
    assert not config_path(dirs, "folder").exists()


def test_a_database_password_is_not_echoed(dirs: Dirs) -> None:
    code, output = new("secret", "db=postgresql://reader:hunter2@db.example/x:csv")
    assert code == 2
    assert "hunter2" not in output
    assert "postgresql://reader:***@db.example/x" in output


def test_a_bad_answer_is_asked_again(dirs: Dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vfed.node.operator.new as new_module

    monkeypatch.setattr(new_module, "interactive", lambda: True)
    table = tmp_path / "t.csv"
    table.write_text("a\n1\n")
    answers = ["asked", "", "5.abc", "x=/data/x.xlsx:excel", f"t={table}", "", "", "", "n"]
    result = vnode("new", input="\n".join(answers) + "\n")
    assert result.exit_code == 0, result.output
    assert (
        "--dataset: 'x=/data/x.xlsx:excel': type 'excel' is not one the algorithm SDK reads" in result.output
    )
    settings = load_settings(config_path(dirs, "asked"))
    assert {label: (d.uri, d.type) for label, d in settings.datasets.items()} == {"t": (str(table), "csv")}


def test_each_inferred_type_is_read_by_the_sdk(dirs: Dirs, tmp_path: Path) -> None:
    """What `vnode new` writes for a csv, parquet and sqlite file, handed to the SDK as the node hands it
    (DATASET_<LABEL>_URI/TYPE), reads back as the same frame."""
    import sqlite3

    frame = pd.DataFrame({"age": [40, 51, 63], "sex": ["f", "m", "f"]})
    frame.to_csv(tmp_path / "people.csv", index=False)
    frame.to_parquet(tmp_path / "people.parquet", engine="pyarrow", index=False)
    with sqlite3.connect(tmp_path / "people.db") as db:
        frame.to_sql("people", db, index=False)
    labels = {"c": "people.csv", "p": "people.parquet", "s": "people.db"}
    code, output = new("sdk", *(f"{label}={tmp_path / name}" for label, name in labels.items()))
    assert code == 0, output
    datasets = load_settings(config_path(dirs, "sdk")).datasets
    assert {label: d.type for label, d in datasets.items()} == {"c": "csv", "p": "parquet", "s": "sqlite"}
    environ = {"DATASETS": ",".join(datasets)}
    for label, d in datasets.items():
        environ[f"DATASET_{label.upper()}_URI"] = d.uri
        environ[f"DATASET_{label.upper()}_TYPE"] = d.type
    for label in datasets:
        pd.testing.assert_frame_equal(load_dataset(label, environ), frame)


@pytest.mark.parametrize("kind", ["excel", "json", "omop", "sparql", "folder"])
def test_a_config_naming_another_type_does_not_load(tmp_path: Path, kind: str) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(
        f"api_key: 1.a\ndata_dir: data\ndatasets:\n  scans: {{uri: /data/scans, type: {kind}}}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert message.startswith("datasets.scans.type: ")
    assert (
        f"{kind!r} is not a dataset type the algorithm SDK reads (one of: csv, parquet, sqlite, sql)"
        in message
    )


def test_the_environment_naming_another_type_is_refused_by_its_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VFED_NODE__API_KEY", "1.a")
    monkeypatch.setenv("VFED_NODE__DATA_DIR", str(tmp_path))
    monkeypatch.setenv("VFED_NODE__DATASETS__SCANS__URI", "/data/x.xlsx")
    monkeypatch.setenv("VFED_NODE__DATASETS__SCANS__TYPE", "excel")
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environment=True)
    assert str(caught.value).startswith("VFED_NODE__DATASETS__SCANS__TYPE: ")
    assert "one of: csv, parquet, sqlite, sql" in str(caught.value)


def test_a_sql_dataset_names_its_table_or_query_and_password_file(
    dirs: Dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = new(
        "sql",
        "stays=postgresql://reader@db.example:5432/clinic",
        "recent=postgresql://reader@db.example:5432/clinic:sql",
        extra=(
            "--dataset-table",
            "stays=public.stays",
            "--dataset-query",
            "recent=SELECT id, ward FROM stays WHERE day > '2024-01-01'",
            "--dataset-password-file",
            "stays=secrets/reader.password",
        ),
    )
    assert code == 0, output
    datasets = load_settings(config_path(dirs, "sql")).datasets
    assert (datasets["stays"].table, datasets["stays"].password_file) == (
        "public.stays",
        tmp_path / "secrets" / "reader.password",
    )
    assert datasets["recent"].query == "SELECT id, ward FROM stays WHERE day > '2024-01-01'"
    assert datasets["recent"].password_file is None


@pytest.mark.parametrize(
    ("datasets", "extra", "code", "expected"),
    [
        (
            ["db=postgresql://r@h/x"],
            [],
            1,
            "datasets.db: Value error, a sql dataset names exactly one of table or query",
        ),
        (
            ["db=postgresql://r@h/x"],
            ["--dataset-table", "db=a", "--dataset-query", "db=SELECT 1"],
            1,
            "a sql dataset names exactly one of table or query",
        ),
        (["f=/data/f.csv"], ["--dataset-table", "f=t"], 1, "datasets.f: Value error, table: only for a sql"),
        (["db=postgresql://r@h/x"], ["--dataset-table", "other=t"], 2, "no --dataset is labelled 'other'"),
        (["db=postgresql://r@h/x"], ["--dataset-table", "db"], 2, "'db': expected LABEL=VALUE"),
        (
            ["db=postgresql://r:hunter2@h/x"],
            ["--dataset-table", "db=t"],
            1,
            "uri: holds a password; put it in password_file",
        ),
    ],
)
def test_sql_keys_that_cannot_work_are_refused(
    dirs: Dirs, datasets: list[str], extra: list[str], code: int, expected: str
) -> None:
    got, output = new("refused", *datasets, extra=tuple(extra))
    assert got == code, output
    (line,) = output.strip().splitlines()
    assert expected in line and "hunter2" not in line
    assert not config_path(dirs, "refused").exists()
