"""`vfed task results TASK_ID --output DIR`: each result streams to a file in DIR in bounded memory (as
`AsyncClient.results(..., to=DIR)`), then becomes `organization-<id>.<json|csv|parquet>`.

Conversions read the streamed file piece by piece: a table (Parquet) one batch of rows at a time; a JSON
value above CONVERT_MAX_BYTES is copied as its bytes, without being parsed. Only a large JSON value cannot
become CSV (that needs the whole value): it is kept as streamed, and the command says so.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import click

from vfed.client.cli_common import fail, run
from vfed.client.errors import ClientError
from vfed.client.result_files import JSON_PREFIX
from vfed.client.results import OrganizationResult, ResultSet
from vfed.common.chunks import CHUNK_BYTES

CONVERT_MAX_BYTES = 64 << 20  # a JSON result up to this size is parsed and written as today; beyond, copied
PARQUET_BATCH_ROWS = 65_536


def write_results(task_id: int, fmt: str, output: Path) -> None:
    """One file per organization, `organization-<id>.<fmt>` (`native`: `.parquet` for a table, `.json`
    otherwise); a failed run is one line naming its organization, and the exit code is then 1."""
    found: ResultSet = run(lambda c: c.results(task_id, raise_on_failure=False, to=output))
    kept: list[str] = []
    for result in found.organizations:
        if result.ok and result.file is not None:
            path = _convert(result, fmt, output)
            if path == result.file:
                size_mib = path.stat().st_size / 2**20
                kept.append(
                    f"{result.who}: its result ({size_mib:.1f} MiB of JSON) is kept as {path}: CSV "
                    f"conversion reads a JSON value whole, up to {CONVERT_MAX_BYTES >> 20} MiB; use --format "
                    "json or native"
                )
            else:
                click.echo(f"wrote {path} ({result.who})")
    for line in [*(f.line() for f in found.failures), *kept]:
        click.echo(line, err=True)
    if not found:
        fail(f"task {task_id} has no runs")
    failed = sum(1 for r in found.organizations if not r.ok)
    if failed:
        fail(f"{failed} of {len(found)} organizations have no result for task {task_id}")
    if kept:
        fail(f"{len(kept)} result(s) of task {task_id} were not converted to CSV")


def _convert(result: OrganizationResult, fmt: str, output: Path) -> Path:
    """The streamed file as `organization-<id>.<fmt>`, the streamed file removed; the streamed file itself
    when it cannot be converted in bounded memory."""
    source = result.file
    assert source is not None  # the caller passes streamed results only
    table = source.suffix == ".parquet"
    ext = ("parquet" if table else "json") if fmt == "native" else fmt
    target = output / f"organization-{result.organization_id}.{ext}"
    if table and fmt == "native":
        os.replace(source, target)
        return target
    small = result.loaded or source.stat().st_size <= CONVERT_MAX_BYTES
    if table:
        writer = _parquet_to_json if fmt == "json" else _parquet_to_csv
        _write_atomically(target, lambda out: writer(source, out))
    elif small:
        text = _csv_one(result.value) if fmt == "csv" else _json_one(result.value)
        _write_atomically(target, lambda out: out.write(text.encode()))
    elif fmt == "csv":
        return source
    else:
        _write_atomically(target, lambda out: _copy_json_value(source, out))
    source.unlink()
    return target


def _write_atomically(target: Path, write: Callable[[IO[bytes]], object]) -> None:
    """`write` into a private temporary file beside `target`, renamed into place once complete."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _parquet_batches(source: Path) -> Any:
    """The table's rows as pandas frames of at most PARQUET_BATCH_ROWS rows (pyarrow reads one row group
    at a time, so memory follows the file's row groups, not its size)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ClientError(
            "converting a table result needs pyarrow: install the algorithms extra (pip install "
            "'vfed[algorithms]'), or use --format native"
        ) from None
    for batch in pq.ParquetFile(source).iter_batches(batch_size=PARQUET_BATCH_ROWS):
        yield batch.to_pandas()


def _parquet_to_json(source: Path, out: IO[bytes]) -> None:
    """A JSON list of records, one record per line."""
    out.write(b"[")
    first = True
    for frame in _parquet_batches(source):
        for record in frame.to_dict(orient="records"):
            out.write((b"\n" if first else b",\n") + json.dumps(record, default=str).encode())
            first = False
    out.write(b"\n]\n")


def _parquet_to_csv(source: Path, out: IO[bytes]) -> None:
    header = True
    for frame in _parquet_batches(source):
        out.write(str(frame.to_csv(index=False, header=header)).encode())
        header = False


def _copy_json_value(source: Path, out: IO[bytes]) -> None:
    """The value of a result document in the SDK's layout (`{"vfed":1,"format":"json","value":` VALUE `}`,
    what streaming checked), copied as bytes without parsing, as compact JSON."""
    end = source.stat().st_size - 1  # the document's closing brace
    with source.open("rb") as src:
        src.seek(len(JSON_PREFIX))
        left = end - len(JSON_PREFIX)
        while left > 0:
            piece = src.read(min(CHUNK_BYTES, left))
            if not piece:
                raise ClientError(f"{source} changed while it was being copied")
            out.write(piece)
            left -= len(piece)
    out.write(b"\n")


def _plain(value: Any) -> Any:
    return value.to_dict(orient="records") if hasattr(value, "to_dict") else value


def _json_one(value: Any) -> str:
    return json.dumps(_plain(value), indent=2, default=str) + "\n"


def _csv_one(value: Any) -> str:
    """A table as CSV; a dict is one row; anything else one `value` cell holding its JSON."""
    if hasattr(value, "to_csv"):
        return str(value.to_csv(index=False))
    plain = _plain(value)
    rows = plain if isinstance(plain, list) and all(isinstance(r, dict) for r in plain) else None
    if rows is None and isinstance(plain, dict):
        rows = [plain]
    out = io.StringIO()
    writer = csv.writer(out)
    if rows is None:
        writer.writerow(["value"])
        writer.writerow([json.dumps(plain, default=str)])
        return out.getvalue()
    fields = list(dict.fromkeys(k for row in rows for k in row))
    writer.writerow(fields)
    for row in rows:
        writer.writerow(
            [
                v if isinstance(v, str | int | float) or v is None else json.dumps(v, default=str)
                for v in (row.get(f) for f in fields)
            ]
        )
    return out.getvalue()
