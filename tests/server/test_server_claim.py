"""Two nodes of one organization race for the same runs through two server instances on one database:
exactly one claim wins each run, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

from vserver_testkit import World, client, db_url, settings, world

from vfed.server.app import create_app
from vfed.server.config import Settings

__all__ = ["client", "db_url", "settings", "world"]


async def test_racing_claims_have_one_winner(aiohttp_client: Any, settings: Settings, world: World) -> None:
    other = await aiohttp_client(create_app(settings))  # a second server process' worth of engine + pool
    tokens = {n: await world.token(n) for n in ("a_node", "a_node2")}
    runs = []
    for _ in range(12):
        task = await world.task("a_res", "ab", ["A"])
        _, listed = await world.call("a_node", "GET", f"/runs?task_id={task['id']}")
        runs.append(listed["data"][0]["id"])

    async def claim(c: Any, node: str, run_id: int) -> tuple[str, int, Any]:
        r = await c.post(f"/api/v1/runs/{run_id}/claim", headers={"Authorization": f"Bearer {tokens[node]}"})
        return node, r.status, await r.json()

    attempts = []
    for run_id in runs:
        attempts += [claim(world.client, "a_node", run_id), claim(other, "a_node2", run_id)]
        attempts += [claim(other, "a_node", run_id), claim(world.client, "a_node2", run_id)]
    results = await asyncio.gather(*attempts)
    for i, run_id in enumerate(runs):
        mine = results[4 * i : 4 * i + 4]
        winners = [(node, body) for node, status, body in mine if status == 200]
        losers = [body for _, status, body in mine if status == 409]
        assert len(winners) == 1, mine
        assert len(losers) == 3 and all(b["error"] == "already-claimed" for b in losers)
        _, run = await world.call("root", "GET", f"/runs/{run_id}")
        assert run["status"] == "initializing" and run["node_id"] == world.nodes[winners[0][0]]
