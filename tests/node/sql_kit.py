"""A real PostgreSQL for `sql` datasets: tables, a password-checked reader role, and an extraction in a
process of its own with its peak RSS. Shared by the node's and the operator's tests and by
bench/sql_extract.py.

    python -m tests.node.sql_kit '<json>'   (internal: one extraction, answering rows and RSS as JSON)
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url
from tests import infra

MIB = 1024 * 1024
READER = "vfed_sql_reader"
"""A role whose password PostgreSQL checks (the session's cluster trusts every other role)."""


def plain_url(url: str) -> str:
    """The fixture's `postgresql+asyncpg://` URL as asyncpg and the node's config take it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def execute(url: str, *statements: str) -> None:
    connection = await asyncpg.connect(plain_url(url))
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def reader(pg: infra.Postgres, url: str, folder: Path) -> tuple[str, Path]:
    """(the database's URL for READER, a password file holding READER's new password): READER may read every
    table of the database's public schema, and logs in with a password only (scram-sha-256)."""
    hba = Path(pg.socket_dir).parent / "data" / "pg_hba.conf"
    line = f"host all {READER} 127.0.0.1/32 scram-sha-256\n"
    text = hba.read_text()
    if (
        line not in text
    ):  # first line wins: only READER is asked for a password, every test role stays trusted
        hba.write_text(line + text)
    password = secrets.token_urlsafe(18)
    admin = await asyncpg.connect(plain_url(url))
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", READER)
        verb = "ALTER" if exists else "CREATE"
        await admin.execute(f"{verb} ROLE {READER} LOGIN PASSWORD '{password}'")
        await admin.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {READER}")
        await admin.execute("SELECT pg_reload_conf()")
    finally:
        await admin.close()
    secret = folder / f"{READER}.password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    return make_url(plain_url(url)).set(username=READER).render_as_string(hide_password=False), secret


TYPES_TABLE = """
CREATE TABLE patients (
    id integer PRIMARY KEY,
    small smallint,
    big bigint,
    weight real,
    score double precision,
    cost numeric(12, 2),
    name text,
    code varchar(8),
    smoker boolean,
    born date,
    seen timestamp,
    seen_tz timestamptz,
    tags text[],
    extra jsonb
);
INSERT INTO patients VALUES
    (1, 3, 9000000000, 71.5, 0.25, 1234.56, 'Ann', 'A1', true, '1970-01-02', '2024-05-06 07:08:09.123456',
     '2024-05-06 07:08:09+02', '{a,b}', '{"k": 1}'),
    (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
    (3, -4, -1, -2.5, 1e300, -0.01, 'Zoë "quoted"', '', false, '2099-12-31', '1999-12-31 23:59:59',
     '1999-12-31 23:59:59+00', '{}', '[]');
"""


async def copy_seconds(url: str, query: str, target: Path) -> float:
    """PostgreSQL's own export of the query's rows (`COPY ... TO STDOUT`, binary) to a file: the baseline."""
    connection = await asyncpg.connect(plain_url(url))
    try:
        started = time.monotonic()
        await connection.copy_from_query(query, output=str(target), format="binary")
        return time.monotonic() - started
    finally:
        await connection.close()


async def big_table(url: str, rows: int, table: str = "big") -> None:
    """`rows` rows of five columns (int, float, text, bool, date), made by the database itself."""
    await execute(
        url,
        f"CREATE TABLE {table} (id bigint, x double precision, label text, flag boolean, day date)",
        f"INSERT INTO {table} SELECT g, g * 0.5, 'row-' || g, g % 2 = 0, date '2020-01-01' + (g % 1000) "
        f"FROM generate_series(1, {rows}) AS g",
        f"ANALYZE {table}",
    )


def extract_in_child(
    dataset: dict[str, Any], target: Path, *, without_pandas: bool = False, timeout_s: float = 600
) -> dict[str, Any]:
    """One extraction in a fresh Python process that imported what the agent imports: rows, bytes, seconds,
    and the process's RSS before the extraction (`base_mib`) and at its peak during it (`peak_mib`).
    `without_pandas`: pandas cannot be imported, as in the vfed/node image (installed, pyarrow's first
    conversion loads it: ~45 MiB more)."""
    job = json.dumps({"dataset": dataset, "target": str(target), "without_pandas": without_pandas})
    return infra.json_child("tests.node.sql_kit", job, "the extraction child", timeout_s)


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


class _NoPandas:
    """An import finder that makes pandas absent, as in the vfed/node image (pyarrow then never loads it)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def _child(job: dict[str, Any]) -> dict[str, Any]:
    if job.get("without_pandas"):
        sys.meta_path.insert(0, _NoPandas())  # type: ignore[arg-type]
    import pyarrow as pa
    import pyarrow.parquet

    import vfed.node.agent
    import vfed.node.cli

    del pyarrow, vfed  # loaded before the mark: this process is an agent that extracts

    pa.array([0])  # (pyarrow's first conversion imports pandas when it is installed) - as in an agent that
    # extracted before: what is measured is the extraction's own memory

    from vfed.node.config import DatasetConfig
    from vfed.node.sql_dataset import extract

    dataset = DatasetConfig.model_validate(job["dataset"])
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on
    base = _status_mib("VmRSS")
    started = time.monotonic()
    done = extract("bench", dataset, Path(job["target"]))
    seconds = time.monotonic() - started
    return {
        "pandas_loaded": "pandas" in sys.modules,
        "rows": done.rows,
        "bytes": done.bytes,
        "seconds": seconds,
        "base_mib": base,
        "peak_mib": _status_mib("VmHWM"),
    }


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
