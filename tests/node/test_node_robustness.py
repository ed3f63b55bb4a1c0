"""The agent under trouble: kills, a SIGKILLed agent, a missing broker, a restarted server."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests import infra
from tests.node.node_harness import (
    PASSWORD,
    PROBE_IMAGE,
    AgentProcess,
    Server,
    ensure_probe_image,
    running_agent,
    stored_blobs,
    wait_run_status,
    write_node_config,
)

from vfed.client.client import AsyncClient
from vfed.node.config import NodeSettings, load_settings

pytestmark = [pytest.mark.docker, pytest.mark.slow]
# Container and volume names carry the node name: unique per session, so other suites running at the same
# time on this Docker engine (which clean up by node name) never touch these.
NODE = f"nt{secrets.token_hex(3)}"


@pytest.fixture(autouse=True)
def _own_node_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node name per test: job ids restart with every test's server, so a shared name would let a container
    an earlier test left running hold a job volume of the same name (`vfed-<node>-<job>-tmp`)."""
    monkeypatch.setattr(sys.modules[__name__], "NODE", f"nt{secrets.token_hex(3)}")


FINAL_STATUSES = {"completed", "failed", "start-failed", "not-allowed", "killed", "crashed"}


@pytest.fixture(scope="module", autouse=True)
def probe_image() -> None:
    ensure_probe_image()


@dataclass
class Site:
    """One organization's server side: the server, its node's config, and a logged-in researcher."""

    server: Server
    config: Path
    researcher: AsyncClient
    collaboration: int

    @property
    def settings(self) -> NodeSettings:
        return load_settings(self.config)

    async def submit(self, method: str, *args: Any) -> dict[str, Any]:
        return await self.researcher.create_task(self.collaboration, PROBE_IMAGE, method, args=list(args))


async def make_site(tmp_path: Path, mqtt_url: str | None, **node: Any) -> tuple[Server, Path]:
    server = Server(tmp_path / "server", mqtt_url=mqtt_url)
    keys = await server.seed(["alpha"])
    await server.start()
    config = write_node_config(
        tmp_path / "alpha.yaml",
        name=NODE,
        api_key=keys["alpha"],
        server_url=server.url,
        mqtt_url=mqtt_url,
        **node,
    )
    return server, config


@contextlib.asynccontextmanager
async def researcher_for(server: Server, config: Path) -> AsyncIterator[Site]:
    """Log in as the organization's researcher once its node has published the key."""
    settings = load_settings(config)
    for _ in range(100):
        if settings.key_path.exists():
            break
        await asyncio.sleep(0.1)
    async with AsyncClient(server.url, key_file=settings.key_path) as researcher:
        await researcher.login("res-alpha", PASSWORD)
        for _ in range(100):  # the file is written before the agent publishes its key record
            org = await researcher.api.request("GET", f"/organizations/{researcher.organization_id}")
            if org.get("key_id"):
                break
            await asyncio.sleep(0.1)
        collab = (await researcher.collaborations())[0]["id"]
        yield Site(server, config, researcher, collab)


def node_containers(docker_client: Any, node: str | None = None) -> list[Any]:
    label = f"vfed.node={node or NODE}"
    return list(docker_client.containers.list(all=True, sparse=True, filters={"label": label}))


async def containers_gone(docker_client: Any, timeout_s: float = 15.0) -> list[Any]:
    """The node's containers once the agent removed them (it does so right after the final report)."""
    for _ in range(int(timeout_s * 10)):
        if not (left := node_containers(docker_client)):
            return []
        await asyncio.sleep(0.1)
    return left


async def kill_and_wait(site: Site, docker_client: Any) -> dict[str, Any]:
    """Kill a sleeping run; answer the run once the container is gone and the log had time to arrive."""
    task = await site.submit("sleep", 120)
    await wait_run_status(site.researcher, task["id"], {"active"})
    await asyncio.sleep(0.5)  # let the probe print its first line
    await site.researcher.kill(task)
    await wait_run_status(site.researcher, task["id"], {"killed"}, timeout_s=20)
    for _ in range(100):  # the agent stops the container, then uploads the log so far
        (run,) = await site.researcher.runs(task["id"])
        if run["sealed_log"] and not node_containers(docker_client):
            break
        await asyncio.sleep(0.1)
    assert node_containers(docker_client) == []
    return dict(run)


@pytest.mark.mqtt
async def test_kill_on_doorbell_stops_the_container(
    tmp_path: Path, mqtt_broker: infra.Broker, docker_client: Any
) -> None:
    """Polling only every 60 s: the container is gone within seconds, so the doorbell did it."""
    server, config = await make_site(tmp_path, mqtt_broker.url, poll_interval_s=60.0)
    try:
        async with running_agent(load_settings(config)), researcher_for(server, config) as site:
            run = await kill_and_wait(site, docker_client)
            assert run["status"] == "killed"
    finally:
        await server.stop()


async def test_killed_run_keeps_its_log(tmp_path: Path, docker_client: Any) -> None:
    """On kill the agent stops the container, the run ends killed, and the log so far reaches the server."""
    server, config = await make_site(tmp_path, None, poll_interval_s=0.5)
    try:
        async with running_agent(load_settings(config)), researcher_for(server, config) as site:
            run = await kill_and_wait(site, docker_client)
            # sealed to the organization, whose keyring this researcher holds
            assert "probe: sleep" in await site.researcher.run_log(run), run
    finally:
        await server.stop()


async def test_kill_seen_by_polling_and_wall_clock_limit(tmp_path: Path, docker_client: Any) -> None:
    """Without a broker the poll notices the kill; a run past max_run_time_s is killed with that reason."""
    server, config = await make_site(
        tmp_path,
        None,
        poll_interval_s=0.5,
        policies={"allowed_images": [{"image": PROBE_IMAGE, "max_run_time_s": 2}]},
    )
    try:
        async with running_agent(load_settings(config)), researcher_for(server, config) as site:
            killed = await site.submit("sleep", 120)
            await wait_run_status(site.researcher, killed["id"], {"active"})
            await site.researcher.kill(killed)
            await wait_run_status(site.researcher, killed["id"], {"killed"}, timeout_s=20)
            slow = await site.submit("sleep", 60)
            (run,) = await wait_run_status(site.researcher, slow["id"], {"failed"}, timeout_s=30)
            assert run["reason"].startswith("timeout: ") and "wall-clock limit" in run["reason"]
            # The status is reported before the container is removed: the agent, still running, removes it.
            assert await containers_gone(docker_client) == []
    finally:
        await server.stop()


async def test_sigkilled_agent_collects_the_result_exactly_once(tmp_path: Path, docker_client: Any) -> None:
    """The container finishes while its agent is dead; the restarted agent uploads the result once."""
    server, config = await make_site(tmp_path, None, poll_interval_s=0.5)
    agent = AgentProcess(config, tmp_path / "agent.log")
    agent.start()
    try:
        async with researcher_for(server, config) as site:
            finished_while_down = await site.submit("sleep", 3)
            await wait_run_status(site.researcher, finished_while_down["id"], {"active"})
            assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
            blobs_before = await stored_blobs(server)
            await asyncio.sleep(5)  # the container exits meanwhile
            still_running = await site.submit("sleep", 4)
            agent.start()
            await wait_run_status(site.researcher, still_running["id"], {"active"})
            assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
            agent.start()
            await wait_run_status(site.researcher, finished_while_down["id"], {"completed"})
            await wait_run_status(site.researcher, still_running["id"], {"completed"})
            assert await site.researcher.results(finished_while_down) == [{"slept": 3}]
            assert await site.researcher.results(still_running) == [{"slept": 4}]
            # one result blob each, plus the second task's input: nothing uploaded twice
            assert await stored_blobs(server) == blobs_before + 3
            await agent.wait_for_log("exited while the agent was down")
            await agent.wait_for_log("still running after the restart")
            assert await containers_gone(docker_client) == []
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]
        await server.stop()


async def test_an_agent_leaves_alone_the_runs_of_another_agent_with_its_name(tmp_path: Path) -> None:
    """Two agents given one node name on one engine (two test suites at once, a copied config): the second
    one's start-up recovery once removed the first one's container, unknown to its journal, and the first
    agent's run ended 'the container was lost while the agent was down'. Now it stays and completes."""
    from vfed.node.agent import Agent

    server, config = await make_site(tmp_path / "first", None, poll_interval_s=0.5)
    other_server, other_config = await make_site(tmp_path / "second", None, poll_interval_s=0.5)
    try:
        async with running_agent(load_settings(config)), researcher_for(server, config) as site:
            task = await site.submit("sleep", 3)
            await wait_run_status(site.researcher, task["id"], {"active"})
            async with Agent(load_settings(other_config)) as other:
                await other.run(burst=True)  # recovery first, then idle: returns
            (run,) = await wait_run_status(site.researcher, task["id"], FINAL_STATUSES)
            assert run["status"] == "completed", run["reason"]
            assert await site.researcher.results(task) == [{"slept": 3}]
    finally:
        await other_server.stop()
        await server.stop()


async def test_sigterm_stops_the_agent_while_the_server_does_not_answer(tmp_path: Path) -> None:
    """The server freezes (this test's event loop, which serves it, is blocked on purpose), so the agent's
    poll hangs; SIGTERM must still end the agent at once. It used to wait for the answer (read timeout 300 s),
    which made the sigkilled test's last SIGTERM fail at times: its server is frozen while stop() waits."""
    server, config = await make_site(tmp_path, None, poll_interval_s=0.2)
    agent = AgentProcess(config, tmp_path / "agent.log")
    agent.start()
    try:
        await agent.wait_for_log("started")
        time.sleep(1.0)  # noqa: ASYNC251 - freezes the server: the agent's next poll gets no answer
        assert agent.stop(signal.SIGTERM, timeout_s=10) == 0, agent.log()[-3000:]
        assert "polling" not in agent.log()  # it did not give up on the server: it was stopped mid-request
    finally:
        agent.stop(signal.SIGKILL)
        await server.stop()


@pytest.mark.mqtt
async def test_broker_down_polling_carries_on_and_doorbell_comes_back(
    tmp_path: Path, mosquitto_server: infra.Mosquitto, mqtt_broker: infra.Broker
) -> None:
    server, config = await make_site(tmp_path, mqtt_broker.url, poll_interval_s=1.0)
    try:
        async with running_agent(load_settings(config)) as agent, researcher_for(server, config) as site:
            assert agent.doorbell is not None
            await asyncio.wait_for(agent.doorbell.connected.wait(), 10)
            mosquitto_server.stop()
            task = await site.submit("echo", 1)
            await wait_run_status(site.researcher, task["id"], {"completed"}, timeout_s=30)
            assert not agent.doorbell.connected.is_set()
            mosquitto_server.start()
            await asyncio.wait_for(agent.doorbell.connected.wait(), 40)
    finally:
        if mosquitto_server.proc is None:
            mosquitto_server.start()
        await server.stop()


async def test_server_restart_agent_reconnects(tmp_path: Path) -> None:
    """The finished run's upload gives up after 1 s of outage; the journal brings it back after restart."""
    server, config = await make_site(tmp_path, None, poll_interval_s=0.5, server_retry_s=1.0)
    try:
        async with running_agent(load_settings(config)), researcher_for(server, config) as site:
            running = await site.submit("sleep", 3)
            await wait_run_status(site.researcher, running["id"], {"active"})
            await server.stop()
            await asyncio.sleep(7)  # the run ends while the server is down; its result waits
            await server.start()
            await wait_run_status(site.researcher, running["id"], {"completed"}, timeout_s=60)
            after = await site.submit("echo", 2)
            await wait_run_status(site.researcher, after["id"], {"completed"}, timeout_s=60)
            assert await site.researcher.results(running) == [{"slept": 3}]
    finally:
        await server.stop()


async def test_metrics_endpoint_counts_runs(tmp_path: Path) -> None:
    server, config = await make_site(tmp_path, None, poll_interval_s=0.5, metrics_port=0)
    try:
        async with running_agent(load_settings(config)) as agent, researcher_for(server, config) as site:
            task = await site.submit("echo", 1)
            await wait_run_status(site.researcher, task["id"], {"completed"})
            await asyncio.sleep(0.2)
            url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
            async with aiohttp.ClientSession() as http, http.get(url) as response:
                text = await response.text()
        assert 'vnode_runs_total{status="completed"} 1.0' in text
        assert "vnode_container_start_seconds_count 1.0" in text
        assert "vnode_bytes_up_total" in text
    finally:
        await server.stop()


async def test_job_volume_kept_for_its_retention_then_removed(tmp_path: Path, docker_client: Any) -> None:
    server, config = await make_site(tmp_path, None, poll_interval_s=0.5, job_volume_retention_s=2.0)

    def volumes() -> list[str]:
        found = docker_client.volumes.list(filters={"label": f"vfed.node={NODE}"})
        return [v.name for v in found]

    try:
        async with running_agent(load_settings(config)), researcher_for(server, config) as site:
            task = await site.submit("echo", 1)
            await wait_run_status(site.researcher, task["id"], {"completed"})
            job = (await site.researcher.runs(task["id"]))[0]["job_id"]
            assert volumes() == [f"vfed-{NODE}-{job}-tmp"]
            for _ in range(100):
                if not volumes():
                    break
                await asyncio.sleep(0.1)
            assert volumes() == []
    finally:
        await server.stop()


async def test_crash_between_upload_and_report_reports_the_same_blob(
    tmp_path: Path, docker_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dying exactly between the result upload and the final PATCH cannot be timed with a real SIGKILL, so the
    first agent's final report is replaced by a cancellation (what a dying process leaves behind: journal at
    'uploaded', container still there). A second agent on the same data folder must report that blob."""
    from vfed.node.finish import Finisher

    server, config = await make_site(tmp_path, None, poll_interval_s=0.5)
    real_report = Finisher._report

    async def die_before_final_report(self: Finisher, run_id: int, **fields: Any) -> None:
        if fields.get("status") == "completed":
            raise asyncio.CancelledError
        await real_report(self, run_id, **fields)

    try:
        monkeypatch.setattr(Finisher, "_report", die_before_final_report)
        async with running_agent(load_settings(config)) as first, researcher_for(server, config) as site:
            task = await site.submit("echo", 5)
            for _ in range(300):
                assert first.services is not None
                entry = first.services.journal.unfinished()
                if entry and entry[0].stage == "uploaded":
                    break
                await asyncio.sleep(0.1)
            assert entry and entry[0].result_blob_id is not None
            uploaded = entry[0].result_blob_id
        monkeypatch.setattr(Finisher, "_report", real_report)
        blobs_before = await stored_blobs(server)
        async with running_agent(load_settings(config)), researcher_for(server, config) as site:
            (run,) = await wait_run_status(site.researcher, task["id"], {"completed"})
            assert run["result_blob_id"] == uploaded
            (result,) = await site.researcher.results(task)
            assert result["value"] == 5 * run["organization_id"]
        assert await stored_blobs(server) == blobs_before  # nothing uploaded again
        assert await containers_gone(docker_client) == []
    finally:
        await server.stop()


async def test_running_container_reaches_the_proxy_of_a_restarted_agent(tmp_path: Path) -> None:
    """The run's socket folder is mounted, not the socket file: the new agent's socket shows up in it."""
    server, config = await make_site(tmp_path, None, poll_interval_s=0.5)
    agent = AgentProcess(config, tmp_path / "agent.log")
    agent.start()
    try:
        async with researcher_for(server, config) as site:
            task = await site.submit("late_proxy", 4)
            await wait_run_status(site.researcher, task["id"], {"active"})
            assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
            agent.start()
            (run,) = await wait_run_status(site.researcher, task["id"], FINAL_STATUSES, timeout_s=60)
            assert run["status"] == "completed", run["reason"]
            (result,) = await site.researcher.results(task)
            assert result["status"] == 200 and result["run"]["run_id"] == run["id"]
    finally:
        agent.stop()
        await server.stop()


async def test_at_most_max_concurrent_runs_containers(tmp_path: Path, docker_client: Any) -> None:
    server, config = await make_site(tmp_path, None, poll_interval_s=0.5, max_concurrent_runs=2)
    most = 0
    try:
        async with running_agent(load_settings(config)), researcher_for(server, config) as site:
            tasks = [await site.submit("sleep", 2) for _ in range(4)]
            for _ in range(300):
                running = docker_client.containers.list(filters={"label": f"vfed.node={NODE}"})
                most = max(most, len(running))
                runs = [r for t in tasks for r in await site.researcher.runs(t["id"])]
                if all(r["status"] == "completed" for r in runs):
                    break
                await asyncio.sleep(0.1)
            assert [r["status"] for r in runs] == ["completed"] * 4
    finally:
        await server.stop()
    assert most == 2


async def test_run_claimed_but_never_started_is_marked_crashed_after_restart(tmp_path: Path) -> None:
    """The agent died between its claim and the container start: the journal says so, the run ends crashed."""
    from vfed.node.journal import Journal
    from vfed.node.server_api import NodeClient

    server, config = await make_site(tmp_path, None, poll_interval_s=0.5)
    settings = load_settings(config)
    try:
        async with running_agent(settings), researcher_for(server, config) as site:
            pass  # first start: the key is published
        async with researcher_for(server, config) as site:
            task = await site.submit("echo", 1)
            async with aiohttp.ClientSession() as session:
                node = NodeClient(session, server.url, settings.api_key.get_secret_value())
                await node.login()
                (pending,) = await node.list_runs(task_id=task["id"])
                run = await node.claim(pending.id)
            journal = Journal(settings.data_dir / "journal.sqlite3")
            journal.claimed(run.id, run.task_id, run.job_id)
            journal.close()
            async with running_agent(settings):
                (after,) = await wait_run_status(site.researcher, task["id"], {"crashed"})
            assert after["reason"] == "the agent stopped before the container started"
    finally:
        await server.stop()
