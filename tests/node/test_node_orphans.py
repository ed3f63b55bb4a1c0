"""A server whose database was reset: job and run ids restart while a run of the old server still runs.

Before the fix the new server's first run collided with the old run's container and job volume
(`vfed-<node>-run-1`, `vfed-<node>-1-tmp`) and ended `start-failed`. Real server apps, real Docker.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import docker
import pytest
from tests.node.node_harness import (
    PASSWORD,
    PROBE_IMAGE,
    Server,
    ensure_probe_image,
    running_agent,
    wait_run_status,
    write_node_config,
)

from vfed.client.client import AsyncClient
from vfed.node.config import load_settings
from vfed.node.journal import Journal
from vfed.node.orphans import SERVER_KEY

pytestmark = [pytest.mark.docker, pytest.mark.slow]


async def start_task(server: Server, config: Path, method: str, *args: Any) -> tuple[AsyncClient, int]:
    settings = load_settings(config)
    researcher = AsyncClient(server.url, key_file=settings.key_path)
    await researcher.login("res-alpha", PASSWORD)
    collab = (await researcher.collaborations())[0]["id"]
    task = await researcher.create_task(collab, PROBE_IMAGE, method, args=list(args))
    return researcher, int(task["id"])


def run_containers(client: docker.DockerClient, node: str) -> dict[str, str]:
    found = client.containers.list(all=True, filters={"label": f"vfed.node={node}"})
    return {str(c.id): str(c.labels.get("vfed.run_id")) for c in found}


async def test_a_reset_server_gets_its_first_run_through(
    tmp_path: Path, docker_client: docker.DockerClient, caplog: pytest.LogCaptureFixture
) -> None:
    ensure_probe_image()
    node = f"no{secrets.token_hex(3)}"
    old = Server(tmp_path / "old", mqtt_url=None)
    config = tmp_path / "alpha.yaml"
    data_dir = tmp_path / "node"
    common: dict[str, Any] = {"name": node, "mqtt_url": None, "poll_interval_s": 0.2}
    common["data_dir"] = str(data_dir)  # one node, one journal: only the server changes
    write_node_config(config, api_key=(await old.seed(["alpha"]))["alpha"], server_url=old.url, **common)
    await old.start()
    try:
        async with running_agent(load_settings(config)):
            researcher, task_id = await start_task(old, config, "sleep", 120)
            async with researcher:
                await wait_run_status(researcher, task_id, {"active"})
        # The agent is gone, its run goes on: the state a reset server finds the node in.
        leftover = run_containers(docker_client, node)
        assert list(leftover.values()) == ["1"]
        assert docker_client.volumes.get(f"vfed-{node}-1-tmp")
    finally:
        await old.stop()

    new = Server(tmp_path / "new", mqtt_url=None)  # a fresh database: ids start at 1 again, a new API key
    write_node_config(config, api_key=(await new.seed(["alpha"]))["alpha"], server_url=new.url, **common)
    await new.start()
    try:
        with caplog.at_level(logging.WARNING, logger="vfed.node"):
            async with running_agent(load_settings(config)):
                researcher, task_id = await start_task(new, config, "echo", 1)
                async with researcher:
                    (run,) = await wait_run_status(researcher, task_id, {"completed", "start-failed"})
                    assert (run["id"], run["job_id"]) == (1, 1)  # the very names the old run held
                    assert run["status"] == "completed", run["reason"]
                    (result,) = await researcher.results(task_id)
                    assert result["value"] == run["organization_id"]
    finally:
        await new.stop()
    assert not set(leftover) & set(run_containers(docker_client, node))  # the old container is gone
    # Before the fix the old run was followed and reported as the new server's run 1 (a 404 there, or worse).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "runs of the earlier server are orphans" in caplog.text
    assert "stopped and removed, nothing collected" in caplog.text
    journal = Journal(data_dir / "journal.sqlite3")
    try:
        assert journal.meta(SERVER_KEY) is not None and journal.unfinished() == []
    finally:
        journal.close()


async def test_the_same_server_keeps_its_runs(tmp_path: Path, docker_client: docker.DockerClient) -> None:
    """A plain restart against the same server clears nothing: the running container is followed again."""
    ensure_probe_image()
    node = f"no{secrets.token_hex(3)}"
    server = Server(tmp_path / "server", mqtt_url=None)
    config = write_node_config(
        tmp_path / "alpha.yaml",
        name=node,
        api_key=(await server.seed(["alpha"]))["alpha"],
        server_url=server.url,
        mqtt_url=None,
        poll_interval_s=0.2,
    )
    await server.start()
    try:
        async with running_agent(load_settings(config)):
            researcher, task_id = await start_task(server, config, "sleep", 2)
            async with researcher:
                await wait_run_status(researcher, task_id, {"active"})
        before = run_containers(docker_client, node)
        settings = load_settings(config)
        async with (
            running_agent(settings),
            AsyncClient(server.url, key_file=settings.key_path) as researcher,
        ):
            await researcher.login("res-alpha", PASSWORD)
            (run,) = await wait_run_status(researcher, task_id, {"completed"}, timeout_s=60)
        assert run["status"] == "completed" and list(before.values()) == ["1"]
    finally:
        await server.stop()
