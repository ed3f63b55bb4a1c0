"""A `sql` dataset of 10 million rows extracted to Parquet by the node: rows/s and the extracting process's
peak memory, beside PostgreSQL's own `COPY` of the same rows.

    python bench/sql_extract.py [--json] [--rows 10000000] [--url postgresql://postgres@127.0.0.1:5432/postgres]

In one run on this machine:
- a PostgreSQL: the one `--url` names (a role that may create a database), else one started for the run from
  the local binaries (tests/infra.py); a fresh database holds a table of ROWS rows of five columns (bigint,
  double precision, text, boolean, date), made by the database itself;
- the baseline: `COPY (SELECT * FROM big) TO STDOUT (FORMAT binary)` into a file, in rows/s;
- the node's path (vfed.node.sql_dataset.extract, as the agent runs it before a run's container starts), in a
  process of its own that imported what the agent imports: rows/s, the Parquet file's size, the process's RSS
  before the extraction and its peak (VmHWM) during it. pandas is made absent in that process, as it is in
  the vfed/node image (where installed, pyarrow's first conversion loads it, about 45 MiB more: see
  `--with-pandas`).

Target (issue 21): the agent under 200 MiB RSS for 10 million rows. Not part of `make test`
(tests/node/test_node_sql_dataset.py extracts 1.5 million rows and bounds the growth).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the test harness

TARGET_PEAK_RSS_MIB = 200


@contextlib.contextmanager
def database(url: str | None) -> Iterator[str]:
    """A fresh database's URL, on the named server or on one started here; dropped (or stopped) after."""
    from tests import infra

    if url is None:
        with infra.postgres() as pg:
            yield pg.url(infra.create_database(pg), driver="postgresql")
        return
    import uuid

    from sqlalchemy.engine import make_url
    from tests.node.sql_kit import execute

    name = "vfed_bench_" + uuid.uuid4().hex[:8]
    asyncio.run(execute(url, f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(execute(url, f'DROP DATABASE "{name}"'))


def measure(rows: int, url: str, work: Path, with_pandas: bool) -> dict[str, Any]:
    from tests.node.sql_kit import big_table, copy_seconds, extract_in_child, plain_url

    asyncio.run(big_table(url, rows))
    copy_s = asyncio.run(copy_seconds(url, "SELECT * FROM big", work / "copy.bin"))
    (work / "copy.bin").unlink()
    dataset = {"uri": plain_url(url), "type": "sql", "table": "big"}
    done = extract_in_child(dataset, work / "big.parquet", without_pandas=not with_pandas)
    if done["rows"] != rows:
        raise SystemExit(f"sql_extract: extracted {done['rows']} rows of {rows}")
    return {
        "rows": rows,
        "pandas_loaded": done["pandas_loaded"],
        "extract_rows_per_s": rows / done["seconds"],
        "extract_s": done["seconds"],
        "parquet_mib": done["bytes"] / 2**20,
        "agent_base_rss_mib": done["base_mib"],
        "agent_peak_rss_mib": done["peak_mib"],
        "growth_mib": done["peak_mib"] - done["base_mib"],
        "copy_rows_per_s": rows / copy_s,
        "ratio_vs_copy": copy_s / done["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows of the table (default 10 million)")
    parser.add_argument("--url", help="a PostgreSQL to use (default: one started for the run)")
    parser.add_argument("--with-pandas", action="store_true", help="let the extracting process load pandas")
    args = parser.parse_args()
    if args.rows < 1:
        parser.error("--rows must be at least 1")
    with tempfile.TemporaryDirectory(prefix="vfed-bench-sql-") as d, database(args.url) as url:
        report = measure(args.rows, url, Path(d), args.with_pandas)
    report["targets_met"] = {"agent_peak_rss_mib": report["agent_peak_rss_mib"] <= TARGET_PEAK_RSS_MIB}
    if args.json:
        print(json.dumps(report))
        return
    for key, value in report.items():
        print(f"{key:22s} {value:14.2f}" if isinstance(value, float) else f"{key:22s} {value}")


if __name__ == "__main__":
    main()
