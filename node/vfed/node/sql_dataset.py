"""`sql` datasets: a PostgreSQL table or query extracted to a Parquet file before the run's container starts.

The container has no network, so it cannot reach a database: the agent reads the rows for it, into the run's
own folder, and the algorithm sees a `parquet` dataset. The rows are streamed: a server-side cursor in a
read-only transaction, fetched in batches and written as Parquet row groups, so the agent's memory does not
grow with the table. The work runs in a thread of its own (with its own event loop for asyncpg): the agent's
loop keeps serving meanwhile.

What fails is classified (`DatasetUnavailable.problem`, the node's own words about its configuration); the
database's message (it can quote a value: `invalid input syntax for type integer: "Jane Doe"`) goes to the
node's log only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from vfed.common.secret_file import SecretFileError, read_secret_file
from vfed.node.config import DatasetConfig

if TYPE_CHECKING:
    import asyncpg  # type: ignore[import-untyped]
    import pyarrow as pa

log = logging.getLogger(__name__)

FETCH_ROWS = 10_000
"""Rows per round trip of the cursor: what the agent holds as Python objects at once."""
ROW_GROUP_ROWS = 65_536
"""Rows per Parquet row group: what the agent holds as Arrow columns before they are written (the writer's
own buffers for a row group are of the same order)."""
CONNECT_TIMEOUT_S = 30.0
APPLICATION_NAME = "vfed-node"
EXTRAS_HINT = "pip install 'vfed[sql]'"


class DatasetUnavailable(Exception):
    """The dataset cannot be read. `problem` is safe to report (no data, no password); `detail` is for the
    node's log."""

    def __init__(self, label: str, problem: str, detail: str = "") -> None:
        super().__init__(f"dataset {label}: {problem}")
        self.label = label
        self.problem = problem
        self.detail = detail or problem


@dataclass(frozen=True)
class Column:
    name: str
    source: str
    """The PostgreSQL type's name."""
    arrow: str
    """The Arrow type it is written as."""


@dataclass(frozen=True)
class Extracted:
    rows: int
    columns: list[Column]
    bytes: int
    seconds: float


# -- type mapping --------------------------------------------------------------------------------------------
def _as_float(value: Any) -> Any:
    return None if value is None else float(value)


def _as_text(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _arrow_types() -> dict[str, tuple[pa.DataType, Callable[[Any], Any] | None]]:
    """PostgreSQL type name -> (Arrow type, conversion of each value or None)."""
    import pyarrow as pa

    return {
        "bool": (pa.bool_(), None),
        "int2": (pa.int16(), None),
        "int4": (pa.int32(), None),
        "int8": (pa.int64(), None),
        "oid": (pa.int64(), None),
        "float4": (pa.float32(), None),
        "float8": (pa.float64(), None),
        # numeric: a double, as pandas would compute with it (digits past ~15 are lost; NaN stays NaN)
        "numeric": (pa.float64(), _as_float),
        "text": (pa.string(), None),
        "varchar": (pa.string(), None),
        "bpchar": (pa.string(), None),
        "name": (pa.string(), None),
        "date": (pa.date32(), None),
        "time": (pa.time64("us"), None),
        "timestamp": (pa.timestamp("us"), None),
        "timestamptz": (pa.timestamp("us", tz="UTC"), None),
        "interval": (pa.duration("us"), None),
        "bytea": (pa.binary(), None),
    }


@dataclass(frozen=True)
class _Converter:
    column: Column
    type: pa.DataType
    convert: Callable[[Any], Any] | None

    def array(self, values: Sequence[Any]) -> pa.Array:
        import pyarrow as pa

        if self.convert is not None:
            values = [self.convert(v) for v in values]
        return pa.array(values, type=self.type, from_pandas=False)


async def _converters(label: str, connection: asyncpg.Connection, query: str) -> list[_Converter]:
    """How each column of the query's result is written; a domain by its base type, any other type
    (arrays, enums, json, uuid, ...) as its text. Two columns of one name are refused: Parquet readers
    cannot tell them apart."""
    import pyarrow as pa

    known = _arrow_types()
    statement = await connection.prepare(query)
    out = []
    for attribute in statement.get_attributes():
        source = attribute.type.name
        base = source
        if attribute.type.kind == "domain":
            found = await connection.fetchval(
                "SELECT b.typname FROM pg_type t JOIN pg_type b ON b.oid = t.typbasetype WHERE t.oid = $1",
                attribute.type.oid,
            )
            base = str(found) if found is not None else source
        arrow, convert = known.get(base, (pa.string(), _as_text))
        out.append(_Converter(Column(attribute.name, source, str(arrow)), arrow, convert))
    names = [c.column.name for c in out]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        problem = f"its query returns several columns named {', '.join(repr(n) for n in twice)}"
        raise DatasetUnavailable(label, problem)
    return out


def _batch(converters: list[_Converter], records: Sequence[Any]) -> pa.RecordBatch:
    import pyarrow as pa

    columns = list(zip(*records, strict=True)) if records else [() for _ in converters]
    arrays = [c.array(values) for c, values in zip(converters, columns, strict=True)]
    return pa.RecordBatch.from_arrays(arrays, schema=_schema(converters))


def _schema(converters: list[_Converter]) -> pa.Schema:
    import pyarrow as pa

    return pa.schema([pa.field(c.column.name, c.type) for c in converters])


# -- the database ------------------------------------------------------------------------------------------
def quote_table(table: str) -> str:
    """`schema.name` or `name` as quoted identifiers (a table's name is never spliced into SQL raw)."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in table.split("."))


def source_query(dataset: DatasetConfig) -> str:
    """The SELECT whose rows are the dataset."""
    if dataset.table is not None:
        return f"SELECT * FROM {quote_table(dataset.table)}"
    assert dataset.query is not None
    return dataset.query.strip().rstrip(";").strip()


def shown_uri(uri: str) -> str:
    """The URL as logs and listings show it (a password never: config refuses one, this masks it anyway)."""
    from sqlalchemy.engine import make_url

    return make_url(uri).render_as_string(hide_password=True)


def _dsn(uri: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(uri).set(drivername="postgresql").render_as_string(hide_password=False)


def _password(label: str, dataset: DatasetConfig) -> str | None:
    if dataset.password_file is None:
        return None
    try:
        return read_secret_file(dataset.password_file, f"dataset {label}: password_file")
    except SecretFileError as exc:
        raise DatasetUnavailable(label, "its password_file cannot be read", str(exc)) from None


def _require_modules(label: str) -> None:
    try:
        import asyncpg  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise DatasetUnavailable(
            label, f"the node lacks asyncpg and pyarrow for sql datasets ({EXTRAS_HINT})", str(exc)
        ) from None


async def _connect(label: str, dataset: DatasetConfig) -> asyncpg.Connection:
    import asyncpg

    password = _password(label, dataset)
    try:
        return await asyncpg.connect(
            _dsn(dataset.uri),
            password=password,
            timeout=CONNECT_TIMEOUT_S,
            server_settings={"application_name": APPLICATION_NAME},
        )
    except Exception as exc:
        raise _classified(label, dataset, exc, connecting=True) from None


def _classified(
    label: str, dataset: DatasetConfig, exc: BaseException, *, connecting: bool
) -> DatasetUnavailable:
    """The kind of failure in the node's own words; the exception's text only for the log."""
    import asyncpg

    detail = f"{type(exc).__name__}: {exc}"
    errors = asyncpg.exceptions
    if isinstance(exc, errors.InvalidPasswordError | errors.InvalidAuthorizationSpecificationError):
        problem = "the database refused the credentials"
    elif isinstance(exc, errors.InvalidCatalogNameError):
        problem = "the database named in its uri does not exist"
    elif isinstance(exc, errors.UndefinedTableError):
        problem = (
            "its table does not exist" if dataset.table else "its query names a table that does not exist"
        )
    elif isinstance(exc, errors.InsufficientPrivilegeError):
        problem = "the database user may not read it"
    elif isinstance(exc, asyncpg.PostgresError):
        what = "the database refused the connection" if connecting else "its query failed"
        problem = f"{what} (PostgreSQL {exc.sqlstate} {type(exc).__name__})"
    elif connecting and isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError):
        problem = "the database cannot be reached"
    elif isinstance(exc, asyncpg.InterfaceError | ConnectionError):
        problem = "the connection to the database was lost"
    else:
        problem = f"it cannot be read ({type(exc).__name__})"
    return DatasetUnavailable(label, problem, detail)


# -- extraction ---------------------------------------------------------------------------------------------
class _Stopped(Exception):
    pass


def _open_target(target: Path) -> BinaryIO:
    """The file, new and 0600 from its first byte (never a link followed), like the run's input."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # whatever the umask
    return os.fdopen(fd, "wb")


async def _records(
    connection: asyncpg.Connection, query: str, stop: threading.Event | None, limit: int | None
) -> Any:
    """Batches of records from a server-side cursor, in the caller's read-only transaction."""
    cursor = await connection.cursor(query)
    left = limit
    while True:
        if stop is not None and stop.is_set():
            raise _Stopped
        want = FETCH_ROWS if left is None else min(FETCH_ROWS, left)
        if want <= 0:
            return
        records = await cursor.fetch(want)
        if not records:
            return
        if left is not None:
            left -= len(records)
        yield records


async def _extract(
    label: str, dataset: DatasetConfig, target: Path, stop: threading.Event | None
) -> Extracted:
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.monotonic()
    query = source_query(dataset)
    connection = await _connect(label, dataset)
    rows = 0
    try:
        async with connection.transaction(readonly=True, isolation="repeatable_read"):
            converters = await _converters(label, connection, query)
            schema = _schema(converters)
            # Dictionaries for text only: they pay for categories, while an id column would only grow the
            # writer's hash table (measured: most of the agent's memory during a write).
            text = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_binary(f.type)]
            with (
                _open_target(target) as handle,
                pq.ParquetWriter(handle, schema, use_dictionary=text) as writer,
            ):
                pending: list[pa.RecordBatch] = []
                held = 0
                async for records in _records(connection, query, stop, None):
                    pending.append(_batch(converters, records))
                    held += len(records)
                    if held >= ROW_GROUP_ROWS:
                        rows += _flush(writer, pending, schema)
                        pending, held = [], 0
                rows += _flush(writer, pending, schema)
    except (DatasetUnavailable, _Stopped):
        raise
    except OSError as exc:  # (pyarrow's own IO errors too)
        if isinstance(exc, ConnectionError):
            raise _classified(label, dataset, exc, connecting=False) from None
        problem = f"the extracted file could not be written at the node ({type(exc).__name__})"
        raise DatasetUnavailable(label, problem, f"{type(exc).__name__}: {exc}") from None
    except pa.ArrowException as exc:
        problem = f"a value could not be written as Parquet ({type(exc).__name__})"
        raise DatasetUnavailable(label, problem, f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:
        raise _classified(label, dataset, exc, connecting=False) from None
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), 10)
    columns = [c.column for c in converters]
    return Extracted(rows, columns, 0, time.monotonic() - started)


def _flush(writer: Any, batches: list[pa.RecordBatch], schema: pa.Schema) -> int:
    import pyarrow as pa

    if not batches:
        return 0
    table = pa.Table.from_batches(batches, schema=schema)
    writer.write_table(table, row_group_size=table.num_rows)
    return int(table.num_rows)


def extract(
    label: str, dataset: DatasetConfig, target: Path, *, stop: threading.Event | None = None
) -> Extracted:
    """Write the dataset's rows to a new Parquet file at `target`; blocking (call it in a thread; `stop`
    ends it between two batches). DatasetUnavailable says what failed; a partly written target is removed."""
    _require_modules(label)
    try:
        done = asyncio.run(_extract(label, dataset, target, stop))
        return dataclasses.replace(done, bytes=target.stat().st_size)
    except BaseException:
        with contextlib.suppress(OSError):
            if target.is_file() and not target.is_symlink():
                target.unlink()
        raise


async def extract_off_loop(label: str, dataset: DatasetConfig, target: Path) -> Extracted:
    """`extract` in a thread, the caller's loop serving meanwhile; a cancelled caller stops it within a
    batch."""
    stop = threading.Event()
    work = asyncio.ensure_future(asyncio.to_thread(extract, label, dataset, target, stop=stop))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(work), 30)
        raise


# -- a look without extracting (`vnode datasets check`) ------------------------------------------------------
@dataclass(frozen=True)
class Described:
    rows: int
    columns: list[Column]
    sample: pa.Table
    """The first rows, converted as an extraction converts them."""


async def _describe(label: str, dataset: DatasetConfig, sample_rows: int) -> Described:
    import pyarrow as pa

    query = source_query(dataset)
    connection = await _connect(label, dataset)
    try:
        async with connection.transaction(readonly=True, isolation="repeatable_read"):
            converters = await _converters(label, connection, query)
            rows = int(await connection.fetchval(f"SELECT count(*) FROM ({query}) AS vfed_dataset"))
            batches = [_batch(converters, r) async for r in _records(connection, query, None, sample_rows)]
    except DatasetUnavailable:
        raise
    except pa.ArrowException as exc:
        problem = f"a value could not be written as Parquet ({type(exc).__name__})"
        raise DatasetUnavailable(label, problem, f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:
        raise _classified(label, dataset, exc, connecting=False) from None
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), 10)
    sample = pa.Table.from_batches(batches, schema=_schema(converters))
    return Described(rows, [c.column for c in converters], sample)


def describe(label: str, dataset: DatasetConfig, *, sample_rows: int = 1000) -> Described:
    """Row count (the database counts), column types and a converted sample, without extracting; blocking."""
    _require_modules(label)
    return asyncio.run(_describe(label, dataset, sample_rows))


def sql_datasets(
    datasets: dict[str, DatasetConfig], labels: Sequence[str]
) -> Iterator[tuple[str, DatasetConfig]]:
    """The `sql` datasets among these labels, in their order."""
    for label in labels:
        dataset = datasets.get(label)
        if dataset is not None and dataset.type == "sql":
            yield label, dataset
