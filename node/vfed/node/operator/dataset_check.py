"""`vnode datasets check`: read each configured dataset as an algorithm would, and say what it holds or what
is wrong with it, before a run finds out.

Memory stays bounded whatever a dataset's size: a csv is read in chunks, a parquet file batch by batch, a
sqlite table and a `sql` dataset are counted by their database (a `sql` dataset's first rows are converted as
its extraction converts them, so the column types are those the algorithm gets).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import click

from vfed.common.ledger.metadata import dataset_path
from vfed.node import sql_dataset
from vfed.node.config import DatasetConfig
from vfed.node.operator.common import CONTEXT, load, scope_option, to_scope
from vfed.node.operator.paths import resolve

if TYPE_CHECKING:
    import pandas as pd

CSV_CHUNK_ROWS = 100_000
PARQUET_BATCH_ROWS = 65_536
SQLITE_SAMPLE_ROWS = 1000
NEEDS = "checking needs pandas and pyarrow (pip install 'vfed[algorithms]')"

_HELP = """Read each dataset of the node's config as an algorithm would: rows, columns and their types (as
pandas gives them to the algorithm), and any problem (a missing or unreadable file, a database that refuses
the credentials, an empty table). Exit 1 when any dataset has a problem.

\b
Examples:
  vnode datasets check
  vnode datasets check hospital-a --format json | jq '.[] | select(.problems != [])'
"""


class Problem(Exception):
    """What is wrong with a dataset, in one line."""


@dataclass
class Report:
    label: str
    type: str
    source: str
    rows: int | None = None
    columns: list[dict[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _columns(dtypes: Any) -> list[dict[str, str]]:
    return [{"name": str(name), "type": str(dtype)} for name, dtype in dtypes.items()]


def _merged(first: str, other: str) -> str:
    """The dtype of a whole file whose chunks disagree: numbers widen to float64, anything else to object."""
    if first == other:
        return first
    numbers = ("int", "float", "uint")
    if first.startswith(numbers) and other.startswith(numbers):
        return "float64"
    return "object"


def _csv(report: Report, path: str) -> None:
    import pandas as pd

    rows = 0
    types: dict[str, str] = {}
    try:
        with pd.read_csv(path, chunksize=CSV_CHUNK_ROWS) as chunks:
            for chunk in chunks:
                rows += len(chunk)
                for name, dtype in chunk.dtypes.items():
                    seen = str(dtype)
                    types[str(name)] = _merged(types.get(str(name), seen), seen)
    except pd.errors.EmptyDataError:
        raise Problem("empty: the file holds no table") from None
    report.rows = rows
    report.columns = [{"name": name, "type": dtype} for name, dtype in types.items()]


def _parquet(report: Report, path: str) -> None:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as source:
        report.rows = sum(batch.num_rows for batch in source.iter_batches(batch_size=PARQUET_BATCH_ROWS))
        report.columns = _columns(source.schema_arrow.empty_table().to_pandas().dtypes)


def _sqlite(report: Report, path: str) -> None:
    """As the SDK reads a node's sqlite dataset: its single table (the node names no table or query)."""
    import pandas as pd

    connection = sqlite3.connect("file:" + quote(path) + "?mode=ro", uri=True)
    try:
        tables = [r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        if len(tables) != 1:
            raise Problem(
                f"holds {len(tables)} tables ({', '.join(tables[:5])}): the SDK reads a single table"
            )
        table = '"' + tables[0].replace('"', '""') + '"'
        report.rows = int(connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        sample: pd.DataFrame = pd.read_sql_query(
            f"SELECT * FROM {table} LIMIT {SQLITE_SAMPLE_ROWS}", connection
        )
        report.columns = _columns(sample.dtypes)
    finally:
        connection.close()


def _sql(report: Report, label: str, dataset: DatasetConfig) -> None:
    try:
        seen = sql_dataset.describe(label, dataset)
    except sql_dataset.DatasetUnavailable as exc:
        said = (exc.detail.strip().splitlines() or [""])[0]
        raise Problem(exc.problem if said in ("", exc.problem) else f"{exc.problem} ({said})") from None
    report.rows = seen.rows
    report.columns = _columns(seen.sample.to_pandas().dtypes)


def _read(report: Report, label: str, dataset: DatasetConfig) -> None:
    if dataset.type == "sql":
        _sql(report, label, dataset)
        return
    path = dataset_path(dataset.uri)
    if not path.exists():
        raise Problem(f"missing file: {path}")
    if not path.is_file():
        raise Problem(f"not a file: {path}")
    try:
        import pandas  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError:
        raise Problem(NEEDS) from None
    {"csv": _csv, "parquet": _parquet, "sqlite": _sqlite}[dataset.type](report, str(path.resolve()))


def check(label: str, dataset: DatasetConfig) -> Report:
    """The dataset as an algorithm would find it; problems instead of exceptions."""
    source = sql_dataset.shown_uri(dataset.uri) if dataset.type == "sql" else dataset.uri
    if dataset.type == "sql":
        source += f" table {dataset.table}" if dataset.table is not None else " query"
    report = Report(label, dataset.type, source)
    try:
        _read(report, label, dataset)
    except Problem as problem:
        report.problems.append(str(problem))
    except Exception as exc:  # pandas, pyarrow and sqlite3 raise many types
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        report.problems.append(f"unreadable: {type(exc).__name__}: {first}".rstrip(": "))
    if not report.problems and report.rows == 0:
        report.problems.append("empty: no rows")
    if not report.problems and not report.columns:
        report.problems.append("empty: no columns")
    return report


def _table(reports: list[Report]) -> list[str]:
    lines = [f"{'LABEL':<16} {'TYPE':<8} {'ROWS':>10}  COLUMNS"]
    for r in reports:
        rows = "-" if r.rows is None else str(r.rows)
        columns = ", ".join(f"{c['name']}:{c['type']}" for c in r.columns) or "-"
        lines.append(f"{r.label:<16} {r.type:<8} {rows:>10}  {columns}")
        lines.extend(f"{'':<16} problem: {p}" for p in r.problems)
    return lines


@click.command("check", help=_HELP, context_settings=CONTEXT)
@click.argument("name", required=False)
@scope_option
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def check_command(name: str | None, user_scope: bool, fmt: str) -> None:
    settings = load(resolve(name, to_scope(user_scope)))
    reports = [check(label, dataset) for label, dataset in settings.datasets.items()]
    if fmt == "json":
        click.echo(json.dumps([asdict(r) for r in reports]))
    elif not reports:
        click.echo("the node's config offers no dataset")
    else:
        click.echo("\n".join(_table(reports)))
    if any(r.problems for r in reports):
        raise SystemExit(1)
