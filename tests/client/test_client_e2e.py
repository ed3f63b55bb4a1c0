"""The researcher's `vfed` CLI and blocking `Client` end to end: the real server app, one real node agent,
real Docker (the node-probe test image), real crypto. Nothing is faked."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.node.node_harness import (
    PASSWORD,
    PROBE_IMAGE,
    Server,
    ensure_probe_image,
    running_agent,
)
from tests.node.node_harness import one_node as harness_one_node  # the fixture below is `one_node`

from vfed.client.client import Client

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@dataclass
class OneNode:
    server: Server
    key_file: Path
    config_dir: Path

    def vfed(self, *args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "VFED_CONFIG_DIR": str(self.config_dir)}
        return subprocess.run(
            [sys.executable, "-m", "vfed.client.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            check=False,
        )


@pytest.fixture
async def one_node(tmp_path: Path, docker_client: object) -> AsyncIterator[OneNode]:
    await asyncio.to_thread(ensure_probe_image)
    async with (
        harness_one_node(tmp_path, "cli", org="a", poll_interval_s=0.3) as (server, settings),
        running_agent(settings),
    ):
        for _ in range(100):  # until the agent generated and published its key
            if settings.key_path.exists():
                break
            await asyncio.sleep(0.1)
        yield OneNode(server, settings.key_path, tmp_path / "cfg")


async def test_cli_login_create_wait_results_kill(one_node: OneNode) -> None:
    node = one_node
    res = await asyncio.to_thread(
        node.vfed,
        "login",
        "--url",
        node.server.url,
        "--username",
        "res-a",
        "--password",
        PASSWORD,
        "--key-file",
        str(node.key_file),
    )
    assert res.returncode == 0, res.stderr
    assert "logged in as res-a" in res.stdout

    res = await asyncio.to_thread(
        node.vfed,
        "task",
        "create",
        "--collaboration",
        "1",
        "--image",
        PROBE_IMAGE,
        "--method",
        "echo",
        "--args",
        '[1, "two"]',
        "--kwargs",
        '{"k": 3}',
        "--format",
        "json",
    )
    assert res.returncode == 0, res.stderr
    task = json.loads(res.stdout)

    res = await asyncio.to_thread(node.vfed, "task", "wait", str(task["id"]), "--timeout", "120")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == f"task {task['id']} completed"

    res = await asyncio.to_thread(node.vfed, "task", "results", str(task["id"]))
    assert res.returncode == 0, res.stderr
    [echo] = json.loads(res.stdout)
    assert echo["args"] == [1, "two"] and echo["kwargs"] == {"k": 3}

    res = await asyncio.to_thread(node.vfed, "task", "results", str(task["id"]), "--format", "csv")
    assert res.returncode == 0, res.stderr
    rows = list(csv.reader(io.StringIO(res.stdout)))
    assert rows[0][0] == "result" and len(rows) == 2 and "args" in rows[0]

    res = await asyncio.to_thread(node.vfed, "task", "list", "--format", "json")
    assert [t["id"] for t in json.loads(res.stdout)] == [task["id"]]

    # A long task killed from the CLI ends killed, and `wait` then exits non-zero saying so.
    res = await asyncio.to_thread(
        node.vfed,
        "task",
        "create",
        "--collaboration",
        "1",
        "--image",
        PROBE_IMAGE,
        "--method",
        "sleep",
        "--args",
        "[120]",
        "--format",
        "json",
    )
    long_task = json.loads(res.stdout)
    for _ in range(200):
        runs = json.loads((await asyncio.to_thread(node.vfed, "task", "list", "--format", "json")).stdout)
        if any(t["id"] == long_task["id"] and t["status"] == "active" for t in runs):
            break
        await asyncio.sleep(0.2)
    res = await asyncio.to_thread(node.vfed, "task", "kill", str(long_task["id"]))
    assert res.returncode == 0, res.stderr
    res = await asyncio.to_thread(node.vfed, "task", "wait", str(long_task["id"]), "--timeout", "60")
    assert res.returncode == 1 and "killed" in res.stdout

    # Results of a killed task: one line naming the run's status, exit 1.
    res = await asyncio.to_thread(node.vfed, "task", "results", str(long_task["id"]))
    assert res.returncode == 1 and "killed" in res.stderr and res.stderr.startswith("vfed: error:")


async def test_blocking_client_works_inside_a_running_loop(one_node: OneNode) -> None:
    """Notebooks run their own event loop; the blocking client must work when called from inside one.

    The "notebook" is a thread running its own loop (the server runs in this test's loop)."""

    async def notebook_cell() -> tuple[str, list[object]]:
        asyncio.get_running_loop()  # a loop is running here, as in Jupyter
        client = Client(one_node.server.url, key_file=one_node.key_file)
        try:
            client.login("res-a", PASSWORD)
            task = client.create_task(1, PROBE_IMAGE, "echo", args=["x"])
            done = client.wait(task, 120, False)
            return str(done["status"]), client.results(task)
        finally:
            client.close()

    status, results = await asyncio.to_thread(asyncio.run, notebook_cell())
    assert status == "completed"
    [echo] = results
    assert isinstance(echo, dict) and echo["args"] == ["x"]
