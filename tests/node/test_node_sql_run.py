"""`sql` datasets through a real agent, server, PostgreSQL and Docker: the container (no network) reads the
Parquet file the node extracted into its run folder; a database that refuses, is unreachable or lacks the
table ends the run `start-failed` with a classified reason and no password, and the agent keeps serving."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from tests import imagebuild, infra
from tests.node.node_harness import (
    PASSWORD,
    PROBE_IMAGE,
    one_node,
    run_containers_gone,
    running_agent,
    wait_run_status,
)
from tests.node.sql_kit import TYPES_TABLE, execute, reader

from vfed.client.client import AsyncClient

FINAL = {"completed", "failed", "start-failed", "not-allowed", "killed", "crashed"}
UNAVAILABLE = "dataset-unavailable: dataset"


@pytest.fixture(scope="module", autouse=True)
def probe_image() -> None:
    imagebuild.ensure("node-probe", PROBE_IMAGE)  # its `files` method reads a Parquet footer


async def run_once(researcher: AsyncClient, collab: int, method: str, dataset: str) -> dict[str, Any]:
    task = await researcher.create_task(collab, PROBE_IMAGE, method, datasets=[dataset])
    (run,) = await wait_run_status(researcher, int(task["id"]), FINAL, timeout_s=90)
    result = (await researcher.results(task))[0] if run["status"] == "completed" else None
    return {"status": run["status"], "reason": run["reason"], "result": result, "id": run["id"]}


@pytest.mark.docker
@pytest.mark.postgres
@pytest.mark.slow
async def test_sql_datasets_arrive_as_parquet_and_failures_are_classified(
    postgres_server: infra.Postgres, postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await execute(postgres_url, TYPES_TABLE)
    url, password_file = await reader(postgres_server, postgres_url, tmp_path)
    password = password_file.read_text().strip()
    wrong = tmp_path / "wrong.password"
    wrong.write_text("wrong-" + password)
    unreachable = f"postgresql://someone@127.0.0.1:{infra.free_port()}/db"
    datasets = {
        "cohort": {"uri": url, "type": "sql", "table": "patients", "password_file": str(password_file)},
        "locked": {"uri": url, "type": "sql", "table": "patients", "password_file": str(wrong)},
        "gone": {"uri": unreachable, "type": "sql", "query": "SELECT 1"},
        "notable": {"uri": url, "type": "sql", "table": "nope", "password_file": str(password_file)},
    }
    caplog.set_level(logging.INFO, logger="vfed.node.runner")
    async with (
        one_node(
            tmp_path,
            "nsql",
            poll_interval_s=0.5,
            datasets=datasets,
            policies={"allowed_images": [PROBE_IMAGE]},
        ) as (server, settings),
        running_agent(settings),
        AsyncClient(server.url, key_file=settings.key_path) as researcher,
    ):
        await researcher.login("res-alpha", PASSWORD)
        collab = (await researcher.collaborations())[0]["id"]
        read = await run_once(researcher, collab, "files", "cohort")
        locked = await run_once(researcher, collab, "echo", "locked")
        gone = await run_once(researcher, collab, "echo", "gone")
        notable = await run_once(researcher, collab, "echo", "notable")
        again = await run_once(researcher, collab, "files", "cohort")
        await run_containers_gone(settings.name)
        run_folders = settings.data_dir / "runs"
        left = sorted(p.name for p in run_folders.iterdir()) if run_folders.exists() else []

    assert read["status"] == "completed", read
    seen = read["result"]["datasets"]["cohort"]
    assert seen["env"] == {"URI": "/mnt/run/dataset-cohort.parquet", "TYPE": "parquet"}
    assert seen["head"] == "PAR1" and seen["parquet_rows"] == 3 and seen["size"] > 100
    assert not [k for k in read["result"]["environment"] if "PASSWORD" in k or k.startswith("PG")]

    assert (locked["status"], locked["reason"]) == (
        "start-failed",
        f"{UNAVAILABLE} locked: the database refused the credentials",
    )
    assert (gone["status"], gone["reason"]) == (
        "start-failed",
        f"{UNAVAILABLE} gone: the database cannot be reached",
    )
    assert (notable["status"], notable["reason"]) == (
        "start-failed",
        f"{UNAVAILABLE} notable: its table does not exist",
    )
    assert again["status"] == "completed" and again["result"]["datasets"]["cohort"]["parquet_rows"] == 3
    assert left == []  # the extracted files went with their run folders

    logged = caplog.text
    assert "password authentication failed" in logged  # the database's words stay in the node's log
    assert f"run {read['id']}: dataset cohort extracted: 3 rows, 14 columns" in logged
    assert password not in logged and password not in str([read, locked, gone, notable, again])
