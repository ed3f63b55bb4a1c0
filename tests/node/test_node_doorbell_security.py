"""A doorbell message is only a hint: anyone who can publish to the broker can ring a node (the broker takes
anonymous clients), so the node reads the run from the REST API before it kills or starts anything.

The attacker here is an anonymous MQTT client of the real broker the server rings through, publishing on the
node's topic; the node is a real agent with a real container running. Polling is every 60 s, so what happens
within the test comes from the doorbell.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest
from tests import infra
from tests.node.node_harness import (
    PASSWORD,
    PROBE_IMAGE,
    Server,
    ensure_probe_image,
    remove_run_containers,
    run_containers_gone,
    running_agent,
    server_sql,
    wait_run_status,
    write_node_config,
)

from vfed.client.client import AsyncClient
from vfed.common.api.doorbell import topic_for
from vfed.common.crypto import Keyring
from vfed.common.trust import records_for_keys
from vfed.node.config import load_settings
from vfed.node.runtime.base import job_volume_name
from vfed.node.server_api import NodeClient

pytestmark = [pytest.mark.docker, pytest.mark.mqtt]


@pytest.fixture(scope="module", autouse=True)
def probe_image() -> None:
    ensure_probe_image()


async def forge(broker: infra.Broker, node_id: int, message: dict[str, Any]) -> None:
    """Publish as an anonymous client, as anyone who reaches the broker can."""
    async with aiomqtt.Client(broker.host, broker.port) as attacker:
        await attacker.publish(topic_for(node_id), json.dumps(message).encode(), qos=1)


async def logged(caplog: pytest.LogCaptureFixture, text: str, timeout_s: float = 30.0) -> None:
    for _ in range(int(timeout_s * 10)):
        if text in caplog.text:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{text!r} not logged:\n{caplog.text[-3000:]}")


def volume_events(docker_client: Any, names: set[str], since: float) -> list[dict[str, Any]]:
    stream = docker_client.events(since=since, until=time.time() + 1, decode=True, filters={"type": "volume"})
    return [e for e in stream if e.get("Actor", {}).get("ID") in names]


async def other_organizations_run(server: Server, api_key: str, tmp_path: Path) -> tuple[int, int]:
    """A pending run of organization beta (whose node is not running): (run id, job id)."""
    keyring = Keyring.generate()
    key_file = tmp_path / "beta-key.json"
    keyring.save(key_file)
    async with aiohttp.ClientSession() as session:
        node = NodeClient(session, server.url, api_key)
        identity = await node.login()
        org = identity.organization_id
        await node.post_key_records(org, records_for_keys(org, keyring.keys))
    async with AsyncClient(server.url, key_file=key_file) as researcher:
        await researcher.login("res-beta", PASSWORD)
        collab = (await researcher.collaborations())[0]["id"]
        task = await researcher.create_task(collab, PROBE_IMAGE, "echo", organizations=[org])
        (run,) = await researcher.runs(task["id"])
    return int(run["id"]), int(run["job_id"])


async def test_forged_kill_and_start_change_nothing(
    tmp_path: Path, mqtt_broker: infra.Broker, docker_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vfed.node")
    server = Server(tmp_path / "server", mqtt_url=mqtt_broker.url)
    keys = await server.seed(["alpha", "beta"])
    await server.start()
    name = f"nd{secrets.token_hex(3)}"
    try:
        config = write_node_config(
            tmp_path / "alpha.yaml",
            name=name,
            api_key=keys["alpha"],
            server_url=server.url,
            mqtt_url=mqtt_broker.url,
            poll_interval_s=60.0,
        )
        settings = load_settings(config)
        beta_run, beta_job = await other_organizations_run(server, keys["beta"], tmp_path)
        since = time.time() - 1
        async with running_agent(settings) as agent:
            await logged(caplog, "doorbell subscribed")
            identity = agent.services.client.identity if agent.services else None
            assert identity is not None
            async with AsyncClient(server.url, key_file=settings.key_path) as researcher:
                await researcher.login("res-alpha", PASSWORD)
                collab = (await researcher.collaborations())[0]["id"]
                task = await researcher.create_task(
                    collab, PROBE_IMAGE, "sleep", args=[120], organizations=[identity.organization_id]
                )
                (run,) = await wait_run_status(researcher, task["id"], {"active"})  # started by the real ring
                container = docker_client.containers.get(f"vfed-{settings.name}-run-{run['id']}")

                # A forged kill: the server says the run is active, so it keeps running.
                await forge(mqtt_broker, identity.node_id, {"event": "run-killed", "run_id": run["id"]})
                await logged(caplog, f"run-killed for run {run['id']} is only a hint")
                (still,) = await researcher.runs(task["id"])
                assert still["status"] == "active"
                container.reload()
                assert container.status == "running"

                # Forged starts: a run that does not exist, and another organization's pending run.
                missing_run, missing_job = 987_654, 4242
                await forge(
                    mqtt_broker,
                    identity.node_id,
                    {"event": "run-created", "run_id": missing_run, "task_id": 1, "job_id": missing_job},
                )
                await forge(
                    mqtt_broker,
                    identity.node_id,
                    {"event": "run-created", "run_id": beta_run, "task_id": 1, "job_id": beta_job},
                )
                await logged(caplog, f"run-created for run {missing_run} is only a hint")
                await logged(caplog, f"run-created for run {beta_run} is only a hint")

                # The real kill still works through the doorbell, after the server confirmed it.
                await researcher.kill(task)
                await wait_run_status(researcher, task["id"], {"killed"})
                await run_containers_gone(settings.name)  # the end is reported first, then removed
            assert f"run {beta_run}: " not in caplog.text  # never claimed, never set up
            assert f"run {missing_run}: " not in caplog.text
        ((beta,),) = await server_sql(server, "SELECT status FROM runs WHERE id = :i", i=beta_run)
        assert beta == "pending"
        hinted = {job_volume_name(settings.name, str(j)) for j in (missing_job, beta_job)}
        assert volume_events(docker_client, hinted, since) == []
    finally:
        remove_run_containers(name)
        await server.stop()
