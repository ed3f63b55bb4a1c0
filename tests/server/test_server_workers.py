"""`vserver start --workers 2` on a real PostgreSQL: two real worker processes on one port, the embedded
broker in the supervisor, task waits answered across processes through LISTEN/NOTIFY only, each doorbell
published once, each run claimed once while several nodes race for it, metrics summed over the workers, a
killed worker started again, and nothing left running after the stop. SQLite with more workers is refused."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from test_server_doorbell import _Nodes
from tests import infra
from vserver_proc import VSERVER, vserver
from vserver_testkit import JWT_SECRET, World, seed

from vfed.server.app import create_app
from vfed.server.config import Settings

pytestmark = pytest.mark.postgres
LONG_S = 60


class Remote:
    """What World needs of a test client, against a real listening server. Every request opens a new
    connection, so the kernel spreads them over the workers."""

    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base, self.session = base, session

    def request(self, method: str, path: str, **kw: Any) -> Any:
        return self.session.request(method, self.base + path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.request("POST", path, **kw)

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)


@dataclass
class Workers:
    proc: subprocess.Popen[bytes]
    port: int
    mqtt_port: int
    metrics_port: int
    log: Path

    def children(self) -> list[int]:
        out = subprocess.run(
            ["ps", "--ppid", str(self.proc.pid), "-o", "pid=,args="],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return [int(line.split()[0]) for line in out.splitlines() if "vfed.server.workers" in line]


def start_workers(tmp_path: Path, database_url: str, n: int = 2) -> Workers:
    port, mqtt_port, metrics_port = infra.free_port(), infra.free_port(), infra.free_port()
    config = {
        "port": port,
        "data_dir": str(tmp_path / "data"),
        "database_url": database_url,
        "jwt_secret": JWT_SECRET,
        "task_wait_recheck_s": 3600,  # no re-reading: only a notice answers a wait on another worker
        "mqtt": {"embedded_port": mqtt_port},
        "metrics": {"port": metrics_port},
    }
    path = tmp_path / "vserver.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "vserver.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*VSERVER, "start", "--config", str(path), "--workers", str(n)], stdout=out, stderr=out
        )
    w = Workers(proc, port, mqtt_port, metrics_port, log)
    try:
        infra.wait_for_port(port, 60, lambda: proc.poll() is None)
        deadline = time.monotonic() + 60
        while f"with {n} workers" not in log.read_text():  # every worker listens
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    except BaseException:
        infra.stop(proc)
        raise
    return w


@pytest.fixture
async def seeded(aiohttp_client: Any, tmp_path: Path, postgres_url: str) -> World:
    """The accounts, inserted through an app of the test's own on the database the workers will use."""
    settings = Settings(data_dir=tmp_path / "seed", database_url=postgres_url, jwt_secret=JWT_SECRET)
    return await seed(await aiohttp_client(create_app(settings)))


@pytest.fixture
def workers(tmp_path: Path, postgres_url: str, seeded: World) -> Iterator[Workers]:
    w = start_workers(tmp_path, postgres_url)
    try:
        yield w
    finally:
        children = w.children()
        infra.stop(w.proc)
        for pid in children:  # the supervisor stopped its workers before it exited
            assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"worker {pid} left running"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


@pytest.fixture
async def remote(workers: Workers, seeded: World) -> AsyncIterator[World]:
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        base = f"http://127.0.0.1:{workers.port}"
        yield World(
            Remote(base, session),  # type: ignore[arg-type]
            seeded.orgs,
            seeded.collabs,
            seeded.users,
            seeded.nodes,
            seeded.api_keys,
        )


async def metric(port: int, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_sqlite_refuses_more_than_one_worker(tmp_path: Path) -> None:
    r = vserver(
        "start", "--data-dir", str(tmp_path), "--port", str(infra.free_port()), "--workers", "2", check=False
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: --workers 2 needs PostgreSQL: SQLite takes writes from one process at a time. Set "
        "database_url to postgresql+asyncpg://… or run one worker (the default)"
    ]


async def test_two_workers_one_server(workers: Workers, remote: World) -> None:
    assert len(workers.children()) == 2
    tasks = 6
    async with _Nodes(remote, "127.0.0.1", workers.mqtt_port) as sub:
        created = [await remote.task("a_res", "ab", ["A", "B"]) for _ in range(tasks)]
        bells: list[tuple[str, dict[str, Any]]] = []
        async with asyncio.timeout(LONG_S):
            async for msg in sub.messages:
                bells.append((str(msg.topic), json.loads(bytes(msg.payload))))  # type: ignore[arg-type]
                if len(bells) == 3 * tasks:  # a_node, a_node2 (org A) and b_node (org B) per task
                    break
        await asyncio.sleep(0.5)  # a doubled publication would arrive meanwhile
        assert sub._queue.empty(), "a doorbell was published twice"
    per_node_run = Counter((topic, m["run_id"]) for topic, m in bells)
    assert set(per_node_run.values()) == {1} and len(per_node_run) == 3 * tasks
    assert (
        await metric(workers.metrics_port, 'vserver_doorbell_messages_total{outcome="published"}')
        == 3 * tasks
    )

    # every run of org A: both of its nodes race, each with several claims on new connections
    runs_a: list[int] = []
    for task in created:
        _, runs = await remote.call("root", "GET", f"/runs?task_id={task['id']}")
        runs_a += [r["id"] for r in runs["data"] if r["organization_id"] == remote.orgs["A"]]
    claims = [
        remote.call(node, "POST", f"/runs/{run_id}/claim")
        for run_id in runs_a
        for node in ("a_node", "a_node2", "a_node", "a_node2")
    ]
    outcomes = await asyncio.gather(*claims)
    won = Counter(
        run_id
        for run_id, (status, _) in zip([r for r in runs_a for _ in range(4)], outcomes, strict=True)
        if status == 200
    )
    assert won == Counter(runs_a), outcomes
    assert {status for status, _ in outcomes} == {200, 409}

    # a wait held by one connection is answered by the commits of others, whichever worker made them
    task = created[0]
    waiter = asyncio.create_task(remote.call("a_res", "GET", f"/tasks/{task['id']}/wait?timeout_s={LONG_S}"))
    await asyncio.sleep(0.5)  # the wait is held (a wrong early answer would show `done` False below)
    _, runs = await remote.call("root", "GET", f"/runs?task_id={task['id']}")
    for r in runs["data"]:
        node = "b_node" if r["organization_id"] == remote.orgs["B"] else None
        if node is not None:
            assert (await remote.call(node, "POST", f"/runs/{r['id']}/claim"))[0] == 200
        claimer = node or _claimer(r, remote)
        status, body = await remote.call(claimer, "PATCH", f"/runs/{r['id']}", json={"status": "completed"})
        assert status == 200, body
    status, body = await waiter
    assert status == 200 and body["done"] is True, body


def _claimer(run: dict[str, Any], w: World) -> str:
    return "a_node" if run["node_id"] == w.nodes["a_node"] else "a_node2"


async def test_a_killed_worker_is_started_again(workers: Workers, remote: World) -> None:
    before = workers.children()
    os.kill(before[0], signal.SIGKILL)
    async with asyncio.timeout(LONG_S):
        while True:
            now = workers.children()
            if len(now) == 2 and before[0] not in now:
                break
            await asyncio.sleep(0.1)
    assert "exited (code -9); starting it again" in workers.log.read_text()
    for _ in range(6):  # new connections reach both workers, the new one included: all answer
        status, _ = await remote.call("a_res", "GET", "/tasks")
        assert status == 200
