"""`sql` datasets: the config's keys, and the extraction to Parquet against the session's real PostgreSQL
(types and NULLs, a table or a query, a password role, every kind of failure classified without data, bounded
memory in a process of its own)."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests import infra
from tests.node.sql_kit import TYPES_TABLE, big_table, execute, extract_in_child, plain_url, reader

from vfed.node.config import ConfigError, DatasetConfig, parse_settings
from vfed.node.sql_dataset import (
    DatasetUnavailable,
    Extracted,
    describe,
    extract,
    extract_off_loop,
    quote_table,
)


async def extracted(label: str, dataset: DatasetConfig, target: Path) -> Extracted:
    """The blocking extraction in a thread, as the agent runs it."""
    return await asyncio.to_thread(extract, label, dataset, target)


def sql(url: str, **keys: Any) -> DatasetConfig:
    return DatasetConfig.model_validate({"uri": plain_url(url), "type": "sql", **keys})


def settings_with(dataset: dict[str, Any], base_dir: Path | None = None) -> Any:
    raw = {"api_key": "1.x", "data_dir": "/tmp/x", "datasets": {"d": dataset}}
    return parse_settings(raw, base_dir=base_dir)


# -- the config ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ({"uri": "postgresql://r@h/db", "type": "sql"}, "a sql dataset names exactly one of table or query"),
        (
            {"uri": "postgresql://r@h/db", "type": "sql", "table": "t", "query": "SELECT 1"},
            "a sql dataset names exactly one of table or query",
        ),
        ({"uri": "/data/x.csv", "table": "t"}, "table: only for a sql dataset, not csv"),
        (
            {"uri": "/data/x.parquet", "type": "parquet", "password_file": "p"},
            "password_file: only for a sql dataset, not parquet",
        ),
        (
            {"uri": "postgresql://r:hunter2@h/db", "type": "sql", "table": "t"},
            "uri: holds a password; put it in password_file",
        ),
        (
            {"uri": "postgresql://r@h/db?password=hunter2", "type": "sql", "table": "t"},
            "uri: holds a password; put it in password_file",
        ),
        (
            {"uri": "mysql://r@h/db", "type": "sql", "table": "t"},
            "sql datasets are extracted from PostgreSQL (postgresql://...), not mysql",
        ),
        ({"uri": "postgresql://r@h", "type": "sql", "table": "t"}, "uri: names no database"),
        (
            {"uri": "postgresql://r@h/db", "type": "sql", "query": "  "},
            "query: Value error, must not be empty",
        ),
    ],
)
def test_the_config_refuses_what_cannot_be_extracted(dataset: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as refused:
        settings_with(dataset)
    message = str(refused.value)
    assert message.startswith("datasets.d"), message
    assert expected in message
    assert "hunter2" not in message


def test_a_relative_password_file_is_taken_from_the_configs_folder(tmp_path: Path) -> None:
    raw = {"uri": "postgresql+asyncpg://r@h:5432/db", "type": "sql", "table": "s.t", "password_file": "pw"}
    settings = settings_with(raw, base_dir=tmp_path)
    assert settings.datasets["d"].password_file == tmp_path / "pw"
    assert settings.datasets["d"].table == "s.t"
    short = settings_with({"uri": "postgres://r@h/db?sslmode=require", "type": "sql", "query": "SELECT 1"})
    assert short.datasets["d"].query == "SELECT 1"


def test_table_names_are_quoted_identifiers() -> None:
    assert quote_table("patients") == '"patients"'
    assert quote_table('clinic.Visits "2024"') == '"clinic"."Visits ""2024"""'


# -- extraction ----------------------------------------------------------------------------------------------
@pytest.mark.postgres
async def test_a_table_round_trips_with_its_types_and_nulls(postgres_url: str, tmp_path: Path) -> None:
    await execute(postgres_url, TYPES_TABLE)
    target = tmp_path / "patients.parquet"
    done = await extracted("patients", sql(postgres_url, table="patients"), target)
    assert done.rows == 3 and done.bytes == target.stat().st_size > 0
    assert target.stat().st_mode & 0o777 == 0o600
    table = pq.read_table(target)
    assert table.schema == pa.schema(
        [
            ("id", pa.int32()),
            ("small", pa.int16()),
            ("big", pa.int64()),
            ("weight", pa.float32()),
            ("score", pa.float64()),
            ("cost", pa.float64()),
            ("name", pa.string()),
            ("code", pa.string()),
            ("smoker", pa.bool_()),
            ("born", pa.date32()),
            ("seen", pa.timestamp("us")),
            ("seen_tz", pa.timestamp("us", tz="UTC")),
            ("tags", pa.string()),
            ("extra", pa.string()),
        ]
    )
    rows = sorted(table.to_pylist(), key=lambda r: r["id"])
    first, empty, last = rows
    assert first["big"] == 9_000_000_000 and first["weight"] == 71.5 and first["cost"] == 1234.56
    assert first["smoker"] is True and first["born"] == datetime.date(1970, 1, 2)
    assert first["seen"] == datetime.datetime(2024, 5, 6, 7, 8, 9, 123456)
    assert first["seen_tz"] == datetime.datetime(2024, 5, 6, 5, 8, 9, tzinfo=datetime.UTC)
    assert first["tags"] == "['a', 'b']" and first["extra"] == '{"k": 1}'
    assert all(value is None for key, value in empty.items() if key != "id")
    assert last["name"] == 'Zoë "quoted"' and last["code"] == "" and last["score"] == 1e300
    assert last["smoker"] is False and last["cost"] == -0.01
    assert [c.source for c in done.columns][:6] == ["int4", "int2", "int8", "float4", "float8", "numeric"]


@pytest.mark.postgres
async def test_a_query_with_a_password_role(
    postgres_server: infra.Postgres, postgres_url: str, tmp_path: Path
) -> None:
    await execute(postgres_url, TYPES_TABLE)
    url, password = await reader(postgres_server, postgres_url, tmp_path)
    dataset = DatasetConfig(
        uri=url,
        type="sql",
        query="SELECT id, name FROM patients WHERE id > 1 ORDER BY id;",
        password_file=password,
    )
    done = await extracted("q", dataset, tmp_path / "q.parquet")
    assert done.rows == 2
    assert pq.read_table(tmp_path / "q.parquet").to_pydict() == {"id": [2, 3], "name": [None, 'Zoë "quoted"']}
    seen = await asyncio.to_thread(describe, "q", dataset)
    assert seen.rows == 2 and [c.name for c in seen.columns] == ["id", "name"]
    assert seen.sample.num_rows == 2


async def _refused(label: str, dataset: DatasetConfig, target: Path) -> DatasetUnavailable:
    with pytest.raises(DatasetUnavailable) as refused:
        await extracted(label, dataset, target)
    assert not await asyncio.to_thread(target.exists)  # nothing half written stays
    return refused.value


@pytest.mark.postgres
async def test_failures_are_classified_without_data_or_password(
    postgres_server: infra.Postgres, postgres_url: str, tmp_path: Path
) -> None:
    await execute(postgres_url, TYPES_TABLE)
    url, password = await reader(postgres_server, postgres_url, tmp_path)
    target = tmp_path / "x.parquet"
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password-s3cr3t\n")
    refused = await _refused(
        "d", DatasetConfig(uri=url, type="sql", table="patients", password_file=wrong), target
    )
    assert refused.problem == "the database refused the credentials"
    assert "s3cr3t" not in str(refused) and "s3cr3t" not in refused.detail
    assert "password authentication failed" in refused.detail  # the database's words, for the node's log

    missing = DatasetConfig(uri=url, type="sql", table="patients", password_file=tmp_path / "nope")
    assert (await _refused("d", missing, target)).problem == "its password_file cannot be read"

    closed = f"postgresql://someone@127.0.0.1:{infra.free_port()}/db"
    refused = await _refused("d", DatasetConfig(uri=closed, type="sql", table="t"), target)
    assert refused.problem == "the database cannot be reached"

    good = {"uri": url, "type": "sql", "password_file": password}
    no_table = DatasetConfig.model_validate({**good, "table": "no_such_table"})
    assert (await _refused("d", no_table, target)).problem == "its table does not exist"
    no_db = DatasetConfig.model_validate({**good, "uri": url.rsplit("/", 1)[0] + "/no_such_db", "table": "t"})
    assert (await _refused("d", no_db, target)).problem == "the database named in its uri does not exist"

    syntax = DatasetConfig.model_validate({**good, "query": "SELEC nothing"})
    assert (
        await _refused("d", syntax, target)
    ).problem == "its query failed (PostgreSQL 42601 PostgresSyntaxError)"
    quoting = DatasetConfig.model_validate({**good, "query": "SELECT name::integer FROM patients"})
    refused = await _refused("d", quoting, target)
    assert refused.problem == "its query failed (PostgreSQL 22P02 InvalidTextRepresentationError)"
    assert '"Ann"' in refused.detail and "Ann" not in str(refused)  # the value stays in the log

    twice = DatasetConfig.model_validate({**good, "query": "SELECT id AS a, name AS a FROM patients"})
    assert (await _refused("d", twice, target)).problem == "its query returns several columns named 'a'"

    await execute(postgres_url, "CREATE TABLE secrets (x int)", "REVOKE ALL ON secrets FROM PUBLIC")
    hidden = DatasetConfig.model_validate({**good, "table": "secrets"})
    assert (await _refused("d", hidden, target)).problem == "the database user may not read it"


@pytest.mark.postgres
async def test_the_extraction_cannot_write_to_the_database(postgres_url: str, tmp_path: Path) -> None:
    await execute(postgres_url, TYPES_TABLE)
    deleting = sql(postgres_url, query="DELETE FROM patients RETURNING id")
    refused = await _refused("d", deleting, tmp_path / "x.parquet")
    assert refused.problem == "its query failed (PostgreSQL 25006 ReadOnlySQLTransactionError)"
    assert (await extracted("d", sql(postgres_url, table="patients"), tmp_path / "y.parquet")).rows == 3


@pytest.mark.postgres
async def test_an_empty_result_is_a_file_with_the_columns(postgres_url: str, tmp_path: Path) -> None:
    await execute(postgres_url, TYPES_TABLE)
    done = await extracted(
        "d", sql(postgres_url, query="SELECT id, name FROM patients WHERE false"), tmp_path / "e.pq"
    )
    assert done.rows == 0
    assert pq.read_table(tmp_path / "e.pq").schema.names == ["id", "name"]


ROWS = 1_500_000


@pytest.mark.postgres
@pytest.mark.slow
async def test_a_big_table_is_extracted_in_bounded_memory(postgres_url: str, tmp_path: Path) -> None:
    """1.5 million rows: the extracting process grows by a bounded amount, far below the table's size in
    memory (its Arrow form alone is ~60 MiB; Python objects for all rows would be >1 GiB)."""
    await big_table(postgres_url, ROWS)
    target = tmp_path / "big.parquet"
    answer = extract_in_child({"uri": plain_url(postgres_url), "type": "sql", "table": "big"}, target)
    assert answer["rows"] == ROWS
    metadata = pq.ParquetFile(target).metadata
    assert metadata.num_rows == ROWS and metadata.num_row_groups > 1
    growth = answer["peak_mib"] - answer["base_mib"]
    assert growth < 64, answer  # measured: ~35 MiB, the same for 0.3 and 1.5 million rows
    last = pq.ParquetFile(target).read_row_group(metadata.num_row_groups - 1).to_pylist()[-1]
    assert last == {
        "id": ROWS,
        "x": ROWS * 0.5,
        "label": f"row-{ROWS}",
        "flag": ROWS % 2 == 0,
        "day": datetime.date(2020, 1, 1) + datetime.timedelta(days=ROWS % 1000),
    }


@pytest.mark.postgres
async def test_other_types_map_to_their_base_type_or_text(postgres_url: str, tmp_path: Path) -> None:
    await execute(
        postgres_url,
        "CREATE DOMAIN positive AS integer CHECK (VALUE > 0)",
        "CREATE TYPE mood AS ENUM ('calm', 'tense')",
    )
    query = (
        "SELECT 5::positive AS p, 'tense'::mood AS m, '12:30:01'::time AS t, '1 day 02:00'::interval AS i, "
        "'\\x0102'::bytea AS b, 7::oid AS o, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u, "
        "'10.0.0.1'::inet AS n, NULL::positive AS np"
    )
    await extracted("d", sql(postgres_url, query=query), tmp_path / "o.parquet")
    table = pq.read_table(tmp_path / "o.parquet")
    assert [str(f.type) for f in table.schema] == [
        "int32",
        "string",
        "time64[us]",
        "duration[us]",
        "binary",
        "int64",
        "string",
        "string",
        "int32",
    ]
    assert table.to_pylist() == [
        {
            "p": 5,
            "m": "tense",
            "t": datetime.time(12, 30, 1),
            "i": datetime.timedelta(days=1, hours=2),
            "b": b"\x01\x02",
            "o": 7,
            "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "n": "10.0.0.1",
            "np": None,
        }
    ]


def test_vnode_start_mounts_each_password_file(tmp_path: Path) -> None:
    from vfed.node.operator.common import OperatorError
    from vfed.node.operator.container import dataset_mounts

    secret = tmp_path / "reader.password"
    secret.write_text("x\n")
    raw = {"uri": "postgresql://r@h/db", "type": "sql", "table": "t", "password_file": "reader.password"}
    mounts = dataset_mounts(settings_with(raw, base_dir=tmp_path))
    assert [(m["Target"], m["Source"], m["ReadOnly"]) for m in mounts] == [(str(secret), str(secret), True)]
    secret.unlink()
    with pytest.raises(OperatorError, match=r"datasets\.d\.password_file: .* is not a file"):
        dataset_mounts(settings_with(raw, base_dir=tmp_path))


def test_every_runtime_reaches_an_extracted_dataset_through_the_run_folder(tmp_path: Path) -> None:
    """The agent describes a sql dataset once (no mount, its file in the run folder); Docker and Kubernetes
    mount nothing more for it and pass the same environment."""
    from vfed.node.runner import _dataset
    from vfed.node.runtime import DatasetMount, RunSpec, algorithm_env
    from vfed.node.runtime.docker_config import DockerRuntimeConfig
    from vfed.node.runtime.docker_spec import run_mounts
    from vfed.node.runtime.kubernetes_config import KubernetesRuntimeConfig
    from vfed.node.runtime.kubernetes_spec import job_body

    csv = tmp_path / "a.csv"
    settings = parse_settings(
        {
            "api_key": "1.x",
            "data_dir": str(tmp_path),
            "datasets": {
                "files": {"uri": str(csv), "type": "csv"},
                "stays": {"uri": "postgresql://r@h/db", "type": "sql", "table": "stays"},
            },
        }
    )
    datasets = [_dataset(label, settings) for label in ("stays", "files")]
    env = algorithm_env(run_id="1", job_id="2", organization_id="3", datasets=datasets, with_proxy=False)
    assert env["DATASETS"] == "stays,files"
    assert (env["DATASET_STAYS_URI"], env["DATASET_STAYS_TYPE"]) == (
        "/mnt/run/dataset-stays.parquet",
        "parquet",
    )
    assert (env["DATASET_FILES_URI"], env["DATASET_FILES_TYPE"]) == ("/mnt/data/files", "csv")
    assert not [key for key in env if key.endswith(("_TABLE", "_QUERY")) or "postgresql" in env[key]]
    spec = RunSpec(
        run_id="1",
        job_id="2",
        node_name="n",
        organization_id="3",
        image="img",
        env=env,
        run_dir=str(tmp_path / "runs" / "1"),
        datasets=[d for d in datasets if isinstance(d, DatasetMount)],
    )
    docker_targets = [m["Target"] for m in run_mounts(spec, DockerRuntimeConfig())]
    assert docker_targets == ["/mnt/run", "/mnt/job", "/mnt/data/files"]
    pod = job_body(spec, "img@sha256:" + "0" * 64, KubernetesRuntimeConfig())["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert [m["mountPath"] for m in container["volumeMounts"] if m["mountPath"].startswith("/mnt/data")] == [
        "/mnt/data/files"
    ]
    assert {e["name"]: e["value"] for e in container["env"]}["DATASET_STAYS_URI"] == env["DATASET_STAYS_URI"]


@pytest.mark.postgres
async def test_the_loop_serves_during_an_extraction_and_a_cancel_stops_it(
    postgres_url: str, tmp_path: Path
) -> None:
    """The extraction runs in a thread: the loop sees its file appear while it is written, and cancelling the
    caller (an agent stopping) stops the thread and removes the partial file."""
    await big_table(postgres_url, 500_000)
    target = tmp_path / "big.parquet"
    work = asyncio.ensure_future(extract_off_loop("big", sql(postgres_url, table="big"), target))
    while not await asyncio.to_thread(target.exists):
        assert not work.done(), "the extraction ended before the loop saw it run"
        await asyncio.sleep(0.01)
    work.cancel()
    with pytest.raises(asyncio.CancelledError):
        await work
    assert not await asyncio.to_thread(target.exists)
