"""A doorbell's job id sets up the job's folder while the claim is on its way; the claim's answer decides.

Real server app, real Docker engine, the agent's own runner (its loop is not started, so the test alone says
which run is claimed when). The engine's volume events show what was created and destroyed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import docker
import pytest
from tests.node.node_harness import PASSWORD, PROBE_IMAGE, ensure_probe_image, one_node, wait_run_status

from vfed.client.client import AsyncClient
from vfed.common.api.resources import Task
from vfed.node import ahead, budget, timeline
from vfed.node.agent import Agent
from vfed.node.config import ImagePolicy, NodeSettings, Policies
from vfed.node.early_job import EarlyJobFolder
from vfed.node.journal import Journal
from vfed.node.privacy import BudgetRefused
from vfed.node.runner import Runner, Services
from vfed.node.runtime.base import START_STEPS, RunSpec, algorithm_env, container_name, job_volume_name
from vfed.node.runtime.docker import DockerRuntime
from vfed.node.runtime.docker_config import DockerRuntimeConfig
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
    async with contextlib.AsyncExitStack() as stack:
        server, settings = await stack.enter_async_context(one_node(tmp_path, "ej"))
        agent = await stack.enter_async_context(Agent(settings))  # publishes the organization's key
        researcher = await stack.enter_async_context(AsyncClient(server.url, key_file=settings.key_path))
        await researcher.login("res-alpha", PASSWORD)
        collaboration = int((await researcher.collaborations())[0]["id"])
        yield Node(agent, researcher, collaboration, docker_client)


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
    assert not node.runner.socket_path(run_id).parent.exists() and not node.runner.run_dir(run_id).exists()


async def test_the_engines_steps_join_the_runs_start_timeline(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent hands the runtime its timeline's `mark` as the step hook: the runtime imports nothing of the
    agent, and the steps it tells (from its threads too) land in the run's start marks."""
    caplog.set_level(logging.DEBUG, logger=timeline.__name__)
    run_id, job_id = await node.new_run()

    await node.runner.execute(run_id, asyncio.Event(), job_hint=job_id)

    emitted = dict(found for r in caplog.records if (found := timeline.parse(r.getMessage())) is not None)
    marks = emitted[run_id]
    engine = [step for step in marks if step in START_STEPS]
    assert {"runtime_start", "create_sent", "create_answered", "start_sent"} <= set(engine), marks
    assert marks["claimed"] < marks["create_sent"] < marks["create_answered"] < marks["start_sent"]


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
    """The entry is written in a thread while the loop sets the run up; with a slow disk (the write held
    until the container was made) the container is made meanwhile, and started only once the entry landed."""
    run_id, _ = await node.new_run()
    order: list[str] = []
    journal, runtime = node.s.journal, node.s.runtime
    real_claimed = journal.claimed

    def slow_claimed(*args: int) -> None:
        # A disk slower than anything else the start does: the write lands only once the container was made
        # (or after 10 s, when the agent does not make it during the write: the order below then fails).
        deadline = time.monotonic() + 10
        while "create" not in order and time.monotonic() < deadline:
            time.sleep(0.01)
        real_claimed(*args)
        order.append("journaled")

    def checked(name: str, call: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        def wrapped(*args: Any) -> Awaitable[T]:
            order.append(name)
            if name != "create":
                assert journal.get(run_id) is not None, f"{name} asked for before the run's journal entry"
            return call(*args)

        return wrapped

    monkeypatch.setattr(journal, "claimed", slow_claimed)
    for name in ("create", "start_created", "start"):
        monkeypatch.setattr(runtime, name, checked(name, getattr(runtime, name)))
    await node.runner.execute(run_id, asyncio.Event())

    assert order == ["create", "journaled", "start_created"]  # made ahead during the write, then started
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


def container_events(node: Node, run_id: int, since: float) -> list[str]:
    """What the engine did to the run's container since then, in order."""
    name = container_name(node.s.settings.name, str(run_id))
    window: dict[str, Any] = {"since": since, "until": time.time()}
    events = node.docker.events(**window, filters={"type": "container"}, decode=True)
    actions = [e["Action"] for e in events if e.get("Actor", {}).get("Attributes", {}).get("name") == name]
    return [a for a in actions if a in ("create", "start", "destroy")]


async def test_a_run_refused_after_its_container_was_made_ahead_leaves_none(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The privacy step refuses (after the container was made ahead): the container never starts."""
    run_id, _ = await node.new_run()
    since = time.time() - 1

    async def refuse(*args: Any, **kwargs: Any) -> float | None:
        await asyncio.sleep(0.5)  # the container made ahead exists by now
        raise BudgetRefused("refused by the test")

    monkeypatch.setattr(budget, "charge", refuse)
    await node.runner.execute(run_id, asyncio.Event())

    assert container_events(node, run_id, since) == ["create", "destroy"]
    (run,) = await wait_run_status(node.researcher, await task_of(node, run_id), {"not-allowed"})
    assert run["reason"] == "disclosure-refused: refused by the test" and node.s.journal.get(run_id) is None
    assert not node.runner.socket_path(run_id).parent.exists()  # made for the container ahead, removed


async def test_a_run_the_policy_refuses_gets_no_container_at_all(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    policies = Policies(allowed_images=[ImagePolicy(image="vfed-test/someone-else*")])
    monkeypatch.setattr(node.s, "settings", node.s.settings.model_copy(update={"policies": policies}))
    run_id, _ = await node.new_run()
    since = time.time() - 1

    await node.runner.execute(run_id, asyncio.Event())

    (run,) = await wait_run_status(node.researcher, await task_of(node, run_id), {"not-allowed"})
    assert "allowed_images" in str(run["reason"])
    assert container_events(node, run_id, since) == []


async def test_a_container_made_for_another_spec_is_replaced(node: Node, tmp_path: Path) -> None:
    """ahead.start compares the specs: a difference removes the early container and answers None."""
    runtime = node.s.runtime
    run_dir = tmp_path / "run-x"
    run_dir.mkdir()
    env = algorithm_env(run_id="77", job_id="9", organization_id="1", datasets=[], with_proxy=False)
    spec = RunSpec(
        run_id="77",
        job_id="9",
        node_name=node.s.settings.name,
        organization_id="1",
        image=PROBE_IMAGE,
        env=env,
        run_dir=str(run_dir),
    )
    early = await ahead.create(runtime, spec)
    assert early is not None
    changed = spec.model_copy(update={"env": {**env, "EXTRA": "1"}})

    assert await ahead.start(runtime, early, changed) is None
    assert not node.docker.containers.list(all=True, filters={"name": container_name(spec.node_name, "77")})
    await runtime.remove_job_volume(spec.node_name, "9")


def settings_with(**fields: Any) -> NodeSettings:
    return NodeSettings.model_validate({"api_key": "abc.def", "data_dir": "/nonexistent", **fields})


def task_with(datasets: list[str], image: str = "vfed/x") -> Task:
    return Task(
        id=1,
        collaboration_id=1,
        initiator_organization_id=1,
        image=image,
        datasets=datasets,
        job_id=1,
        status="active",
    )


@pytest.mark.parametrize(
    ("fields", "task", "expected"),
    [
        ({}, task_with([]), True),
        ({"datasets": {"d": {"uri": "/data/d.csv"}}}, task_with(["d"]), True),
        ({"datasets": {"d": {"uri": "/data/d.csv", "epsilon_budget": 1.0}}}, task_with(["d"]), False),
        ({"datasets": {"d": {"uri": "/data/d.csv"}}}, task_with(["e"]), False),
        ({"policies": {"allowed_images": ["vfed/y"]}}, task_with([]), False),
        ({"policies": {"allowed_organizations": [2]}}, task_with([]), False),
    ],
)
def test_what_may_be_made_ahead(fields: dict[str, Any], task: Task, expected: bool) -> None:
    """Settings and the policy only: the Docker runtime is not asked anything."""
    runtime = DockerRuntime(DockerRuntimeConfig())
    assert ahead.may_create_ahead(settings_with(**fields), runtime, task, "sha256:" + "0" * 64) is expected
