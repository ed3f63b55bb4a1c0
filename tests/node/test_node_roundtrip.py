"""End to end through the real server app, real Docker, real crypto and (for the processes) a real broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.node.node_harness import (
    PASSWORD,
    PROBE_IMAGE,
    AgentProcess,
    Server,
    ensure_probe_image,
    write_node_config,
)
from vfed.client.client import AsyncClient
from vfed.common.crypto import Keyring, NotARecipient, decrypt_bytes
from vfed.node.agent import Agent
from vfed.node.config import load_settings

pytestmark = [pytest.mark.docker]


@pytest.fixture(scope="module", autouse=True)
def probe_image() -> None:
    ensure_probe_image()


async def test_one_node_in_process_round_trip(tmp_path: Path, docker_client: object) -> None:
    """The agent in this process (burst mode): claim, decrypt, run the container, seal, upload, complete."""
    server = Server(tmp_path / "server", mqtt_url=None)
    keys = await server.seed(["alpha"])
    await server.start()
    try:
        config = write_node_config(
            tmp_path / "alpha.yaml", name="alpha", api_key=keys["alpha"], server_url=server.url, mqtt_url=None
        )
        settings = load_settings(config)
        async with Agent(settings) as agent:
            await agent.run(burst=True)  # publishes the key; nothing pending yet
            async with AsyncClient(server.url, key_file=settings.key_path) as researcher:
                await researcher.login("res-alpha", PASSWORD)
                collab = (await researcher.collaborations())[0]["id"]
                task = await researcher.create_task(collab, PROBE_IMAGE, "echo", args=[2, 3])
                await agent.run(burst=True)
                done = await researcher.wait(task, timeout_s=30, progress=False)
                assert done["status"] == "completed"
                (result,) = await researcher.results(task)
                runs = await researcher.runs(task["id"])
        org_id = runs[0]["organization_id"]
        assert result["organization_id"] == org_id
        assert result["value"] == 5 * org_id
        assert runs[0]["exit_code"] == 0 and "probe: done" in runs[0]["log"]
        assert runs[0]["image_digest"].startswith("sha256:")
    finally:
        await server.stop()
