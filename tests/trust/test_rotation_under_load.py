"""An organization rotates its key while runs are in flight and while a researcher still holds the old key:
nothing fails, every result opens where it is sealed to, and the server shows the new head."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from tests.node.node_harness import (
    PASSWORD,
    PROBE_IMAGE,
    ensure_probe_image,
    one_node,
    running_agent,
    wait_run_status,
)

from vfed.client.client import AsyncClient
from vfed.common.crypto import Keyring

FINAL = {"completed", "failed", "start-failed", "not-allowed", "killed", "crashed"}

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def probe_image() -> None:
    ensure_probe_image()


async def submit(client: AsyncClient, collaboration: int, seconds: float) -> dict[str, Any]:
    return await client.create_task(collaboration, PROBE_IMAGE, "sleep", args=[seconds])


async def test_rotation_while_runs_are_in_flight_and_a_client_holds_the_old_key(tmp_path: Path) -> None:
    async with (
        one_node(tmp_path, "rl", poll_interval_s=0.3, max_concurrent_runs=4) as (server, settings),
        running_agent(settings) as agent,
    ):
        assert agent.services is not None
        old_copy = tmp_path / "researcher-copy.key"  # a researcher's copy of the key file, taken before
        shutil.copy(settings.key_path, old_copy)
        old_copy.chmod(0o600)
        async with AsyncClient(server.url, key_file=old_copy, trust_file=tmp_path / "early-trust") as early:
            await early.login("res-alpha", PASSWORD)
            collaboration = int((await early.collaborations())[0]["id"])
            in_flight = [await submit(early, collaboration, 2.0) for _ in range(4)]
            await wait_run_status(early, int(in_flight[0]["id"]), {"active", *FINAL}, timeout_s=60)

            keyring = Keyring.load(settings.key_path)  # `vnode keys rotate` on the running node's key file
            old, new = keyring.current.key_id, keyring.rotate().key_id
            keyring.save(settings.key_path)
            for _ in range(200):
                if agent.services.keyring.current.key_id == new:
                    break
                await asyncio.sleep(0.05)
            assert agent.services.keyring.current.key_id == new
            for _ in range(100):
                org = await early.api.request("GET", f"/organizations/{early.organization_id}")
                if org["key_id"] == new:
                    break
                await asyncio.sleep(0.1)
            assert org["key_id"] == new

            # The early client still signs with the old key and has the old head cached: its inputs are
            # sealed again to the new head after the server's stale-key answer; the old key is within grace.
            late = [await submit(early, collaboration, 0.2) for _ in range(3)]
            async with AsyncClient(
                server.url, key_file=settings.key_path, trust_file=tmp_path / "t2"
            ) as fresh:
                await fresh.login("res-alpha", PASSWORD)
                fresh_task = await submit(fresh, collaboration, 0.2)
                for task in [*in_flight, *late, fresh_task]:
                    (run,) = await wait_run_status(early, int(task["id"]), FINAL, timeout_s=90)
                    assert run["status"] == "completed", run
                assert await fresh.results(fresh_task) == [{"slept": 0.2}]
            for task in [*in_flight, *late]:
                assert await early.results(task) in ([{"slept": 2.0}], [{"slept": 0.2}])
            descriptors = [(await early.task(int(t["id"])))["descriptor"] for t in (*in_flight, *late)]
    sealed_to = [json.loads(d)["descriptor"]["body"]["targets"][0]["key_id"] for d in descriptors]
    assert sealed_to[:4] == [old] * 4  # sealed before the rotation
    assert sealed_to[4:] == [new] * 3  # the client noticed the rotation and sealed to the new head
