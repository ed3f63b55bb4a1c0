"""A doorbell's job id sets up the job's folder while the claim is on its way; the claim's answer decides.

Real server app, real Docker engine, the agent's own runner (its loop is not started, so the test alone says
which run is claimed when). The engine's volume events show what was created and destroyed.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import docker
import pytest
from tests.node.node_harness import (
    PASSWORD,
    PROBE_IMAGE,
    Server,
    ensure_probe_image,
    wait_run_status,
    write_node_config,
)

from vfed.client.client import AsyncClient
from vfed.node.agent import Agent
from vfed.node.config import load_settings
from vfed.node.early_job import EarlyJobFolder
from vfed.node.journal import Journal
from vfed.node.runner import Runner, Services
from vfed.node.runtime.base import job_volume_name
from vfed.node.runtime.job_folder import job_folder

pytestmark = pytest.mark.docker
T = TypeVar("T")


@dataclass
class Node:
    """An agent set up (logged in, runtime open) whose loop does not run: the test drives its runner."""

    agent: Agent
    researcher: AsyncClient
    collaboration: int
    docker: docker.DockerClient

    @property
    def s(self) -> Services:
        assert self.agent.services is not None
        return self.agent.services

    @property
    def runner(self) -> Runner:
        assert self.agent.runner is not None
        return self.agent.runner

    async def new_run(self) -> tuple[int, int]:
        """A pending run for this node: (run id, job id)."""
        task = await self.researcher.create_task(self.collaboration, PROBE_IMAGE, "echo", args=[1])
        (run,) = await self.researcher.runs(int(task["id"]))
        return int(run["id"]), int(task["job_id"])

    def volume_exists(self, job_id: int) -> bool:
        name = job_volume_name(self.s.settings.name, str(job_id))
        return any(v.name == name for v in self.docker.volumes.list(filters={"name": name}))

    def folder(self, job_id: int) -> Path:
        return job_folder(str(self.s.settings.data_dir / "jobs"), self.s.settings.name, str(job_id))

    def volume_events(self, job_id: int, since: float) -> list[str]:
        """What the engine did to the job's volume since then, in order (create, destroy, ...)."""
        name = job_volume_name(self.s.settings.name, str(job_id))
        # The engine takes fractional seconds (the SDK's stubs say int): sub-second windows stay exact.
        window: dict[str, Any] = {"since": since, "until": time.time()}
        events = self.docker.events(**window, filters={"type": "volume"}, decode=True)
        return [e["Action"] for e in events if e.get("Actor", {}).get("ID") == name]


@pytest.fixture
async def node(tmp_path: Path, docker_client: docker.DockerClient) -> AsyncIterator[Node]:
    ensure_probe_image()
    server = Server(tmp_path / "server", mqtt_url=None)
    keys = await server.seed(["alpha"])
    config = write_node_config(
        tmp_path / "alpha.yaml",
        name=f"ej{secrets.token_hex(3)}",
        api_key=keys["alpha"],
        server_url=server.url,
        mqtt_url=None,
    )
    await server.start()
    settings = load_settings(config)
    researcher = AsyncClient(server.url, key_file=settings.key_path)
    try:
        async with Agent(settings) as agent:
            await researcher.login("res-alpha", PASSWORD)
            collaboration = int((await researcher.collaborations())[0]["id"])
            yield Node(agent, researcher, collaboration, docker_client)
    finally:
        await researcher.close()
        await server.stop()


def record(order: list[Any], name: str, call: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """The real call, noting when it was made (not when it answered) and with which arguments."""

    def wrapped(*args: Any) -> Awaitable[T]:
        order.append((name, *args))
        return call(*args)

    return wrapped


async def test_the_hinted_folder_is_asked_for_before_the_claim_and_the_run_uses_it(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id, job_id = await node.new_run()
    order: list[Any] = []
    runtime, client = node.s.runtime, node.s.client
    monkeypatch.setattr(runtime, "ensure_job_volume", record(order, "volume", runtime.ensure_job_volume))
    monkeypatch.setattr(client, "claim", record(order, "claim", client.claim))

    await node.runner.execute(run_id, asyncio.Event(), job_hint=job_id)

    name = node.s.settings.name
    assert order[:2] == [("volume", name, str(job_id)), ("claim", run_id)]
    assert all(step[0] == "claim" or step[1:] == (name, str(job_id)) for step in order)
    (run,) = await wait_run_status(node.researcher, await task_of(node, run_id), {"completed"})
    assert run["status"] == "completed"
    assert not node.volume_exists(job_id) and not node.folder(job_id).exists()  # the job's last run ended


async def test_a_hint_for_a_run_claimed_elsewhere_leaves_nothing(node: Node) -> None:
    run_id, job_id = await node.new_run()
    await node.s.client.claim(run_id)  # the claim the hinted one loses
    since = time.time() - 1

    await node.runner.execute(run_id, asyncio.Event(), job_hint=job_id)

    assert node.volume_events(job_id, since) == ["create", "destroy"]
    assert not node.folder(job_id).exists()
    assert node.s.journal.get(run_id) is None and not node.s.jobs_in_setup


async def test_a_wrong_hint_is_taken_down_and_the_claimed_job_is_used(node: Node) -> None:
    run_id, job_id = await node.new_run()
    wrong = job_id + 1000
    since = time.time() - 1

    await node.runner.execute(run_id, asyncio.Event(), job_hint=wrong)

    assert node.volume_events(wrong, since) == ["create", "destroy"]
    assert not node.folder(wrong).exists()
    used = node.volume_events(job_id, since)  # the engine also says "create" when a container names it
    assert used[0] == "create" and "mount" in used and used[-1] == "destroy", used
    (run,) = await wait_run_status(node.researcher, await task_of(node, run_id), {"completed"})
    assert run["status"] == "completed"


async def test_a_run_of_the_job_ending_while_a_hint_is_held_keeps_the_folder(node: Node) -> None:
    job_id = 424242
    early = EarlyJobFolder(node.s, node.runner.finisher, job_id)
    early.start()
    assert early.volume is not None
    await early.volume

    await node.runner.finisher.release_job_volume(job_id)  # what a finishing run of the job does
    assert node.volume_exists(job_id) and node.folder(job_id).is_dir()

    await early.drop()
    assert not node.volume_exists(job_id) and not node.folder(job_id).exists()
    assert not node.s.jobs_in_setup


async def task_of(node: Node, run_id: int) -> int:
    run = await node.s.client.get_run(run_id)
    return run.task_id


async def test_the_container_waits_for_the_claims_journal_entry(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry is written in a thread while the loop sets the run up; a slow disk (a sleep before the
    real write) must still land it before the runtime is asked to start the container."""
    run_id, _ = await node.new_run()
    order: list[str] = []
    journal, runtime = node.s.journal, node.s.runtime
    real_claimed, real_start = journal.claimed, runtime.start

    def slow_claimed(*args: int) -> None:
        time.sleep(0.3)
        real_claimed(*args)
        order.append("journaled")

    def start(*args: Any) -> Awaitable[str]:
        order.append("start")
        assert journal.get(run_id) is not None, "a container asked for before its journal entry"
        return real_start(*args)

    monkeypatch.setattr(journal, "claimed", slow_claimed)
    monkeypatch.setattr(runtime, "start", start)
    await node.runner.execute(run_id, asyncio.Event())

    assert order == ["journaled", "start"]
    (run,) = await wait_run_status(node.researcher, await task_of(node, run_id), {"completed"})
    assert run["status"] == "completed" and node.s.journal.get(run_id) is None


def test_the_journal_takes_writes_from_threads_at_once(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: journal.claimed(i, i, i % 3 + 1), range(1, 201)))
        assert [e.run_id for e in journal.unfinished()] == list(range(1, 201))
    finally:
        journal.close()
