"""End to end through the real server app, real Docker, real crypto and (for the processes) a real broker."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest
from tests.node.node_harness import (
    PASSWORD,
    PROBE_IMAGE,
    AgentProcess,
    Server,
    blob_size,
    ensure_probe_image,
    one_node,
    write_node_config,
)

from vfed.client.client import AsyncClient
from vfed.common.crypto import Keyring, NotARecipient, decrypt_bytes
from vfed.common.trust import result_context
from vfed.node.agent import Agent
from vfed.node.config import load_settings

pytestmark = [pytest.mark.docker]
PAD = 9 * 1024 * 1024


@pytest.fixture(scope="module", autouse=True)
def probe_image() -> None:
    ensure_probe_image()


async def test_one_node_in_process_round_trip(tmp_path: Path, docker_client: object) -> None:
    """The agent in this process (burst mode): claim, decrypt, run the container, seal, upload, complete."""
    async with one_node(tmp_path, "nr") as (server, settings):
        async with Agent(settings) as agent:
            await agent.run(burst=True)  # publishes the key; nothing pending yet
            async with AsyncClient(server.url, key_file=settings.key_path) as researcher:
                await researcher.login("res-alpha", PASSWORD)
                collab = (await researcher.collaborations())[0]["id"]
                task = await researcher.create_task(collab, PROBE_IMAGE, "echo", args=[2, 3])
                # Over 64 KiB: not sent along with the claim (it does not live in its blob row), downloaded
                # and decrypted file to file; over 8 MiB its result goes up while it is sealed, through a
                # resumable upload session.
                big = await researcher.create_task(collab, PROBE_IMAGE, "echo", kwargs={"pad": "x" * PAD})
                (big_run,) = await researcher.runs(big["id"])
                await agent.run(burst=True)
                done = await researcher.wait(task, timeout_s=30, progress=False)
                assert done["status"] == "completed"
                (result,) = await researcher.results(task)
                runs = await researcher.runs(task["id"])
                log_text = await researcher.run_log(runs[0])  # sealed to the organization: its keyring
                (big_result,) = await researcher.results(big)
        assert big_result["kwargs"] == {"pad": "x" * PAD}
        assert await blob_size(server, big_run["input_blob_id"]) > 64 * 1024
        org_id = runs[0]["organization_id"]
        assert result["organization_id"] == org_id
        assert result["value"] == 5 * org_id
        assert runs[0]["exit_code"] == 0 and "probe: done" in log_text and "probe: done" not in str(runs[0])
        assert runs[0]["image_digest"].startswith("sha256:")


@pytest.mark.mqtt
@pytest.mark.slow
async def test_three_agent_processes_round_trip_and_master_subtasks(
    tmp_path: Path, mqtt_broker: object
) -> None:
    """Three `vnode run` processes; the doorbell alone (poll every 60 s) must bring the work in time."""
    server = Server(tmp_path / "server", mqtt_url=mqtt_broker.url)  # type: ignore[attr-defined]
    api_keys = await server.seed(["a", "b", "c"])
    await server.start()
    agents = {}
    try:
        for name, key in api_keys.items():
            config = write_node_config(
                tmp_path / f"{name}.yaml",
                name=f"{name}{secrets.token_hex(3)}",
                api_key=key,
                server_url=server.url,
                mqtt_url=None,
                poll_interval_s=60.0,
                trust="tofu",  # each node pins the others' first keys at first sight
            )
            agents[name] = AgentProcess(config, tmp_path / f"{name}.log")
            agents[name].start()
        for agent in agents.values():
            await agent.wait_for_log("doorbell subscribed")
        key_a = load_settings(agents["a"].config).key_path
        async with AsyncClient(server.url, key_file=key_a) as researcher:
            await researcher.login("res-a", PASSWORD)
            collab = (await researcher.collaborations())[0]["id"]
            task = await researcher.create_task(collab, PROBE_IMAGE, "echo", args=[2, 3])
            done = await researcher.wait(task, timeout_s=40, progress=False)
            assert done["status"] == "completed", await researcher.runs(task["id"])
            results = await researcher.results(task)
            runs = await researcher.runs(task["id"])
            org_ids = sorted(r["organization_id"] for r in runs)
            assert sorted(r["organization_id"] for r in results) == org_ids
            assert all(r["value"] == 5 * r["organization_id"] for r in results)
            # Each result is sealed for the initiator only: org b's own key does not open b's result.
            key_b = Keyring.load(load_settings(agents["b"].config).key_path)
            run_b = next(r for r in runs if r["organization_id"] != researcher.organization_id)
            blob = await researcher.api.download_blob(run_b["result_blob_id"])
            bound_to = result_context(task["descriptor_digest"], run_b["organization_id"], run_b["id"])
            with pytest.raises(NotARecipient):
                decrypt_bytes(blob, key_b, key_b.current.public, context=bound_to)

            org_a = researcher.organization_id
            assert org_a is not None
            master = await researcher.create_task(
                collab, PROBE_IMAGE, "master", args=[1], organizations=[org_a]
            )
            done = await researcher.wait(master, timeout_s=60, progress=False)
            assert done["status"] == "completed", await researcher.runs(master["id"])
            (aggregate,) = await researcher.results(master)
            assert aggregate["by_org"] == {str(o): o for o in org_ids}
            assert aggregate["total"] == sum(org_ids)
            subtasks = await researcher.tasks(parent_id=master["id"])
            assert [t["id"] for t in subtasks] == [aggregate["subtask"]]
    finally:
        codes = {name: agent.stop() for name, agent in agents.items()}
        await server.stop()
    assert codes == dict.fromkeys(agents, 0), {n: a.log()[-2000:] for n, a in agents.items()}
    await asyncio.sleep(0)
