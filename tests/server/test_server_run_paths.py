"""The node's run paths (claim, PATCH) as single conditional statements: every refusal still answers with the
code of the first check that fails, the task's status follows its runs, and two servers completing the runs
of one task at the same moment leave it `completed` (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from typing import Any

from vserver_testkit import World, client, db_url, settings, world

from vfed.server.app import create_app
from vfed.server.config import Settings

__all__ = ["client", "db_url", "settings", "world"]


async def _run_of(world: World, node: str, task: dict[str, Any]) -> int:
    _, runs = await world.call(node, "GET", f"/runs?task_id={task['id']}")
    return int(runs["data"][0]["id"])


async def test_claim_refusals_and_task_status(world: World) -> None:
    task = await world.task("a_res", "ab", ["A", "B"])
    a_run, b_run = await _run_of(world, "a_node", task), await _run_of(world, "b_node", task)
    status, body = await world.call("c_node", "POST", f"/runs/{a_run}/claim")
    assert status == 404 and body["error"] == "not-found"  # another collaboration's run does not exist
    status, body = await world.call("b_node", "POST", f"/runs/{a_run}/claim")
    assert status == 404  # another organization's run neither
    status, body = await world.call("a_res", "POST", f"/runs/{a_run}/claim")
    assert status == 403
    status, claimed = await world.call("a_node", "POST", f"/runs/{a_run}/claim")
    assert status == 200 and claimed["task"]["status"] == "active"
    assert claimed["task"]["organization_ids"] == [world.orgs["A"], world.orgs["B"]]
    assert claimed["claimed_at"] is not None and claimed["links"]["node"].endswith(str(world.nodes["a_node"]))
    status, body = await world.call("a_node2", "POST", f"/runs/{a_run}/claim")
    assert status == 409 and body["error"] == "already-claimed"
    status, seen = await world.call("a_res", "GET", f"/tasks/{task['id']}")
    assert seen["status"] == "active"
    await world.call("b_node", "POST", f"/runs/{b_run}/claim")
    for node, run_id in (("a_node", a_run), ("b_node", b_run)):
        status, _ = await world.call(node, "PATCH", f"/runs/{run_id}", json={"status": "completed"})
        assert status == 200
    status, seen = await world.call("a_res", "GET", f"/tasks/{task['id']}")
    assert seen["status"] == "completed"


async def test_patch_refusals_keep_their_order(world: World) -> None:
    task = await world.task("a_res", "ab", ["A"])
    run_id = await _run_of(world, "a_node", task)
    path = f"/runs/{run_id}"
    foreign = await world.upload("a_node2", b"not yours")
    status, _ = await world.call("a_node2", "PATCH", path, json={"status": "active"})
    assert status == 403  # nobody claimed it yet: not a_node2's to update
    await world.call("a_node", "POST", f"{path}/claim")
    status, _ = await world.call("b_node", "PATCH", path, json={"status": "pending", "result_blob_id": "x"})
    assert status == 404  # invisible first
    status, _ = await world.call("a_node2", "PATCH", path, json={"status": "pending", "result_blob_id": "x"})
    assert status == 403  # then not the claimer
    status, body = await world.call("a_node", "PATCH", path, json={"status": "pending"})
    assert status == 422 and "pending" in body["detail"]
    status, body = await world.call("a_node", "PATCH", path, json={"result_blob_id": foreign})
    assert status == 422 and foreign in body["detail"]
    status, same = await world.call("a_node", "PATCH", path, json={})
    assert status == 200 and same["status"] == "initializing"
    status, first = await world.call("a_node", "PATCH", path, json={"status": "active", "image_digest": "d1"})
    assert status == 200 and first["started_at"] is not None and first["image_digest"] == "d1"
    status, second = await world.call("a_node", "PATCH", path, json={"status": "active", "exit_code": 0})
    assert status == 200 and second["started_at"] == first["started_at"]  # the first start is kept
    assert second["image_digest"] == "d1" and second["exit_code"] == 0
    mine = await world.upload("a_node", b"result")
    failed = {"status": "failed", "result_blob_id": mine}
    status, done = await world.call("a_node", "PATCH", path, json=failed)
    assert status == 200 and done["result_blob_id"] == mine and done["finished_at"] is not None
    status, body = await world.call("a_node", "PATCH", path, json={"exit_code": 1})
    assert status == 409 and body["error"] == "run-final"
    status, seen = await world.call("a_res", "GET", f"/tasks/{task['id']}")
    assert seen["status"] == "failed"


async def test_simultaneous_completions_finish_the_task(
    aiohttp_client: Any, settings: Settings, world: World
) -> None:
    """Each PATCH re-derives the task's status from all its runs; two servers doing that at once must not
    both see the other's run still open."""
    other = await aiohttp_client(create_app(settings))
    tokens = {n: await world.token(n) for n in ("a_node", "b_node")}
    tasks = []
    for _ in range(8):
        task = await world.task("a_res", "ab", ["A", "B"])
        runs = {n: await _run_of(world, n, task) for n in tokens}
        for node, run_id in runs.items():
            status, _ = await world.call(node, "POST", f"/runs/{run_id}/claim")
            assert status == 200
        tasks.append((task["id"], runs))

    async def complete(c: Any, node: str, run_id: int) -> int:
        headers = {"Authorization": f"Bearer {tokens[node]}"}
        r = await c.patch(f"/api/v1/runs/{run_id}", json={"status": "completed"}, headers=headers)
        return r.status

    done = await asyncio.gather(
        *(
            complete(c, node, runs[node])
            for _, runs in tasks
            for c, node in ((world.client, "a_node"), (other, "b_node"))
        )
    )
    assert set(done) == {200}
    for task_id, _ in tasks:
        status, seen = await world.call("a_res", "GET", f"/tasks/{task_id}")
        assert status == 200 and seen["status"] == "completed", seen
