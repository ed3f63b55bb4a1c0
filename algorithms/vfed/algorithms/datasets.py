"""Loading the datasets a node offers a run, from the environment the node sets.

`DATASETS` lists the labels (comma separated); for each label, `DATASET_<LABEL>_URI` and
`DATASET_<LABEL>_TYPE`: csv, parquet (a file path), sqlite (a database file, opened read-only) or sql (a
SQLAlchemy URL). A node sets only file types: its `sql` datasets arrive as parquet, extracted before the
container starts (it has no network). Type sql, and `DATASET_<LABEL>_QUERY` (a SELECT) or
`DATASET_<LABEL>_TABLE` to choose what a database holds, are for running the wrapper outside a node (local
tests); a sqlite file holding a single table needs neither. `<LABEL>` is the label in upper case with
anything but letters and digits turned into `_`.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlparse

if TYPE_CHECKING:
    import pandas as pd
    import sqlalchemy as sa


class DatasetType(StrEnum):
    """The storage formats the SDK reads."""

    CSV = "csv"
    PARQUET = "parquet"
    SQLITE = "sqlite"
    SQL = "sql"


class DatasetError(Exception):
    """A dataset the function needs is not offered, or cannot be read."""


def env_key(label: str) -> str:
    """`DATASET_<LABEL>` prefix of a label's variables."""
    return "DATASET_" + re.sub(r"[^A-Z0-9]", "_", label.upper())


def available_labels(environ: Mapping[str, str] | None = None) -> list[str]:
    """The labels the node offers this run, in its order."""
    env = os.environ if environ is None else environ
    return [label.strip() for label in env.get("DATASETS", "").split(",") if label.strip()]


def _file_path(uri: str) -> str:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    return uri


def _sqlite_engine(path: str) -> sa.Engine:
    import sqlalchemy as sa

    if not Path(path).is_file():
        raise DatasetError(f"sqlite database {path} does not exist")
    # Datasets are mounted read-only: open without ever creating or writing a journal.
    uri = "file:" + quote(str(Path(path).resolve())) + "?mode=ro"
    return sa.create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True))


def _query(label: str, connection: sa.Connection, env: Mapping[str, str]) -> pd.DataFrame:
    import pandas as pd
    import sqlalchemy as sa

    query = env.get(f"{env_key(label)}_QUERY")
    table = env.get(f"{env_key(label)}_TABLE")
    if query:
        return pd.read_sql_query(sa.text(query), connection)
    if not table:
        tables = sa.inspect(connection).get_table_names()
        if len(tables) != 1:
            raise DatasetError(
                f"database dataset {label!r} holds tables {tables}: set "
                f"{env_key(label)}_TABLE or {env_key(label)}_QUERY"
            )
        table = tables[0]
    return pd.read_sql_table(table, connection)


def _read_database(label: str, engine: sa.Engine, env: Mapping[str, str]) -> pd.DataFrame:
    try:
        with engine.connect() as connection:
            return _query(label, connection, env)
    finally:
        engine.dispose()


async def _read_async_database(label: str, uri: str, env: Mapping[str, str]) -> pd.DataFrame:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(uri)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(lambda sync: _query(label, sync, env))
    finally:
        await engine.dispose()


def _read_sql_url(label: str, uri: str, env: Mapping[str, str]) -> pd.DataFrame:
    """A SQLAlchemy URL; an async driver (postgresql+asyncpg, sqlite+aiosqlite) is run to completion here."""
    import sqlalchemy as sa  # only databases pay for SQLAlchemy's import

    if getattr(sa.engine.make_url(uri).get_dialect(), "is_async", False):
        return asyncio.run(_read_async_database(label, uri, env))
    return _read_database(label, sa.create_engine(uri), env)


def _read(label: str, kind: DatasetType, uri: str, env: Mapping[str, str]) -> pd.DataFrame:
    import pandas as pd

    if kind is DatasetType.CSV:
        return pd.read_csv(_file_path(uri))
    if kind is DatasetType.PARQUET:
        return pd.read_parquet(_file_path(uri), engine="pyarrow")
    if kind is DatasetType.SQLITE:
        return _read_database(label, _sqlite_engine(_file_path(uri)), env)
    return _read_sql_url(label, uri, env)


def load_dataset(label: str, environ: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The dataset with this label as a DataFrame; DatasetError says what is missing or unreadable."""
    env = os.environ if environ is None else environ
    offered = available_labels(env)
    if label not in offered:
        raise DatasetError(f"dataset {label!r} is not offered to this run (offered: {offered or 'none'})")
    uri = env.get(f"{env_key(label)}_URI")
    if not uri:
        raise DatasetError(f"dataset {label!r} has no {env_key(label)}_URI")
    raw_type = env.get(f"{env_key(label)}_TYPE", "").strip().lower()
    try:
        kind = DatasetType(raw_type)
    except ValueError:
        known = ", ".join(t.value for t in DatasetType)
        raise DatasetError(f"dataset {label!r} has type {raw_type!r}; known types: {known}") from None
    try:
        return _read(label, kind, uri, env)
    except DatasetError:
        raise
    except Exception as exc:  # pandas, pyarrow and SQLAlchemy raise many types
        raise DatasetError(f"cannot read dataset {label!r} ({kind.value}): {exc}") from exc
