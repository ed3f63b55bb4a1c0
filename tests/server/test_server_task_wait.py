"""GET /tasks/{id}/wait: answers when every run finished, when any changed (`since`), on kill, at the timeout;
the same access as GET /tasks/{id}; a client that hangs up leaves no waiter behind.

Wake-ups are proven by events, not clocks: with the periodic re-check pushed far out, only the commit of a
run change can answer a wait before its (long) timeout, and a timed-out answer says `done: false`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text, update
from vserver_testkit import World, client, db_url, settings, world

from vfed.common.api.statuses import RunStatus
from vfed.server import db, pg_events
from vfed.server.app import create_app
from vfed.server.config import Settings
from vfed.server.models import Run
from vfed.server.state import ENGINE, PG_EVENTS, TASK_EVENTS

__all__ = ["client", "db_url", "settings", "world"]
LONG_S = 50  # far beyond the test's own events: reaching it would fail the `done` assertions


@pytest.fixture
def events_only(settings: Settings) -> None:
    """No periodic re-check within a test's lifetime: only events can wake a waiter."""
    settings.task_wait_recheck_s = 3600.0


async def waiting(client: Any, n: int) -> None:
    """Until exactly `n` waiters are registered (the wait under test has reached its wait); the limit only
    keeps a broken server from hanging the test run."""
    async with asyncio.timeout(LONG_S):
        while client.app[TASK_EVENTS].waiting() != n:  # noqa: ASYNC110 (a count has no event to await)
            await asyncio.sleep(0.01)


async def node_runs(w: World, task: dict[str, Any]) -> list[tuple[str, int]]:
    """(node, run id) per run, the node being one of the run's organization."""
    node_of = {w.orgs["A"]: "a_node", w.orgs["B"]: "b_node"}
    _, runs = await w.call("root", "GET", f"/runs?task_id={task['id']}")
    return [(node_of[r["organization_id"]], r["id"]) for r in runs["data"]]


async def finish(w: World, node: str, run_id: int, status: str = "completed") -> None:
    await w.call(node, "POST", f"/runs/{run_id}/claim")
    code, body = await w.call(node, "PATCH", f"/runs/{run_id}", json={"status": status})
    assert code == 200, body


@pytest.mark.usefixtures("events_only")
async def test_answers_once_every_run_finished(client: Any, world: World) -> None:
    task = await world.task("a_res", "ab", ["A", "B"])
    (n1, r1), (n2, r2) = await node_runs(world, task)
    waiter = asyncio.create_task(world.call("a_res", "GET", f"/tasks/{task['id']}/wait?timeout_s={LONG_S}"))
    await waiting(client, 1)
    await finish(world, n1, r1)
    await asyncio.sleep(0)  # let a (wrong) early answer through, if there were one
    assert not waiter.done()  # one run still open: nothing to say yet
    await finish(world, n2, r2, "failed")
    status, body = await waiter
    assert status == 200 and body["done"] is True
    assert {r["id"]: r["status"] for r in body["runs"]} == {r1: "completed", r2: "failed"}
    assert body["task"]["id"] == task["id"] and body["task"]["status"] == "failed"
    assert client.app[TASK_EVENTS].waiting() == 0


@pytest.mark.usefixtures("events_only")
async def test_since_answers_on_any_change(client: Any, world: World) -> None:
    task = await world.task("a_res", "ab", ["A"])
    [(node, run_id)] = await node_runs(world, task)
    _, first = await world.call("a_res", "GET", f"/tasks/{task['id']}/wait?timeout_s=0")
    assert first["done"] is False and [r["status"] for r in first["runs"]] == ["pending"]
    path = f"/tasks/{task['id']}/wait?timeout_s={LONG_S}&since={first['version']}"
    waiter = asyncio.create_task(world.call("a_res", "GET", path))
    await waiting(client, 1)
    await world.call(node, "POST", f"/runs/{run_id}/claim")
    status, body = await waiter
    assert status == 200 and body["done"] is False
    assert [r["status"] for r in body["runs"]] == ["initializing"] and body["version"] != first["version"]
    _, again = await world.call(
        "a_res", "GET", f"/tasks/{task['id']}/wait?timeout_s=0&since={first['version']}"
    )
    assert again["version"] == body["version"]  # the same state reads the same in any process


@pytest.mark.usefixtures("events_only")
async def test_answers_on_kill(client: Any, world: World) -> None:
    task = await world.task("a_res", "ab", ["A", "B"])
    waiter = asyncio.create_task(world.call("a_res", "GET", f"/tasks/{task['id']}/wait?timeout_s={LONG_S}"))
    await waiting(client, 1)
    status, _ = await world.call("a_res", "POST", f"/tasks/{task['id']}/kill")
    assert status == 200
    status, body = await waiter
    assert body["done"] is True and {r["status"] for r in body["runs"]} == {"killed"}


async def test_timeout_answers_with_the_current_state(client: Any, world: World) -> None:
    task = await world.task("a_res", "ab", ["A"])
    status, body = await world.call("a_res", "GET", f"/tasks/{task['id']}/wait?timeout_s=0.2")
    assert status == 200 and body["done"] is False and [r["status"] for r in body["runs"]] == ["pending"]
    assert client.app[TASK_EVENTS].waiting() == 0


async def test_recheck_sees_changes_without_an_event(client: Any, world: World) -> None:
    """A change committed elsewhere (another server process) rings no bell here; the re-check finds it."""
    task = await world.task("a_res", "ab", ["A"])
    waiter = asyncio.create_task(world.call("a_res", "GET", f"/tasks/{task['id']}/wait?timeout_s={LONG_S}"))
    await waiting(client, 1)
    async with db.make_sessionmaker(client.app[ENGINE])() as s:  # no task events: like another process
        await s.execute(update(Run).where(Run.task_id == task["id"]).values(status=RunStatus.COMPLETED))
        await s.commit()
    status, body = await waiter
    assert status == 200 and body["done"] is True


async def test_same_access_as_reading_the_task(world: World) -> None:
    task = await world.task("a_res", "ab", ["A"])
    for who, expected in (("c_res", 404), ("c_admin", 404), ("c_node", 404), ("b_res", 404), ("a_view", 200)):
        status, body = await world.call(who, "GET", f"/tasks/{task['id']}/wait?timeout_s=0")
        read, _ = await world.call(who, "GET", f"/tasks/{task['id']}")
        assert status == read == expected, (who, body)
    for bad in ("timeout_s=-1", "timeout_s=99999", "timeout_s=x", "since="):
        status, body = await world.call("a_res", "GET", f"/tasks/{task['id']}/wait?{bad}")
        assert status == 422 and body["error"] == "validation-error", bad


async def test_hang_up_leaves_no_waiter(client: Any, world: World) -> None:
    task = await world.task("a_res", "ab", ["A"])
    h = await world.h("a_res")
    gone = asyncio.create_task(client.get(f"/api/v1/tasks/{task['id']}/wait?timeout_s={LONG_S}", headers=h))
    await waiting(client, 1)
    gone.cancel()  # the client hangs up: its connection closes
    with pytest.raises(asyncio.CancelledError):
        await gone
    await waiting(client, 0)  # dropped at the next re-check, long before the wait's own timeout
    status, body = await world.call("a_res", "GET", f"/tasks/{task['id']}/wait?timeout_s=0")
    assert status == 200 and body["done"] is False


@pytest.fixture
async def other_process(aiohttp_client: Any, settings: Settings, world: World) -> World:
    """A second server app on the same database (what another worker or machine is): its own connections,
    its own LISTEN, its own origin; the seeded accounts log in to it with the same secrets."""
    other = await aiohttp_client(create_app(settings))
    return World(other, world.orgs, world.collabs, world.users, world.nodes, world.api_keys)


async def listening(*clients: Any) -> None:
    async with asyncio.timeout(LONG_S):
        for c in clients:
            await c.app[PG_EVENTS].listening.wait()


@pytest.mark.usefixtures("events_only")
@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
async def test_a_change_in_another_process_wakes_the_waiter(
    client: Any, world: World, other_process: World
) -> None:
    """No re-check within the test: only PostgreSQL's notice from the other app can answer the wait."""
    await listening(client, other_process.client)
    task = await world.task("a_res", "ab", ["A", "B"])
    (n1, r1), (n2, r2) = await node_runs(world, task)
    waiter = asyncio.create_task(world.call("a_res", "GET", f"/tasks/{task['id']}/wait?timeout_s={LONG_S}"))
    await waiting(client, 1)
    await finish(other_process, n1, r1)
    await finish(other_process, n2, r2)
    status, body = await waiter
    assert status == 200 and body["done"] is True
    assert {r["status"] for r in body["runs"]} == {"completed"}
    assert client.app[PG_EVENTS].received >= 1
    assert other_process.client.app[PG_EVENTS].received == 0  # its own notices are not taken twice


@pytest.mark.usefixtures("events_only")
@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
async def test_junk_on_the_channel_and_a_lost_listener_lose_nothing(
    client: Any, world: World, other_process: World
) -> None:
    """Someone else's notices on the channel are ignored; a listening connection the database drops is
    re-made, and the waiters are woken to look again, so a change made meanwhile is still answered."""
    events = client.app[PG_EVENTS]
    await listening(client, other_process.client)
    task = await world.task("a_res", "ab", ["A"])
    [(node, run_id)] = await node_runs(world, task)
    waiter = asyncio.create_task(world.call("a_res", "GET", f"/tasks/{task['id']}/wait?timeout_s={LONG_S}"))
    await waiting(client, 1)
    async with client.app[ENGINE].connect() as conn:
        for junk in ("", "not json", '{"o": 1, "t": [1]}', '{"o": "x", "t": ["1"]}', '{"o": "x"}'):
            await conn.execute(text("SELECT pg_notify(:c, :p)"), {"c": pg_events.CHANNEL, "p": junk})
        await conn.commit()
        await conn.execute(  # the database drops the listener (a restart, a failover, an idle timeout)
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN %' AND pid <> pg_backend_pid()"
            )
        )
        await conn.commit()
    async with asyncio.timeout(LONG_S):
        while events.listening.is_set():  # noqa: ASYNC110 (the listener's own state, no event to await)
            await asyncio.sleep(0.01)
    await finish(other_process, node, run_id)  # its notice may well go to nobody: the listener is down
    status, body = await waiter
    assert status == 200 and body["done"] is True
    assert events.listening.is_set()
