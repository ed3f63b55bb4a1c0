"""The doorbell reaches a real aiomqtt subscriber through Mosquitto and through the embedded amqtt broker,
and a missing broker never slows or fails the API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from tests import infra
from vserver_testkit import JWT_SECRET, World, seed

from vfed.server.app import create_app
from vfed.server.config import MqttSettings, Settings
from vfed.server.state import DOORBELL


def _settings(tmp_path: Path, mqtt: MqttSettings) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        jwt_secret=JWT_SECRET,
        mqtt=mqtt,
    )


async def _world(aiohttp_client: Any, settings: Settings) -> World:
    return await seed(await aiohttp_client(create_app(settings)))


async def _expect(sub: aiomqtt.Client, n: int, timeout_s: float = 20) -> list[tuple[str, dict[str, Any]]]:
    got: list[tuple[str, dict[str, Any]]] = []
    async with asyncio.timeout(timeout_s):
        async for msg in sub.messages:
            got.append((str(msg.topic), json.loads(bytes(msg.payload))))  # type: ignore[arg-type]
            if len(got) == n:
                return got
    return got


class _Nodes:
    """One subscriber per node with its own broker account (an ACL'd broker shows no one every topic),
    merged into one stream of messages."""

    def __init__(self, w: World, host: str, port: int) -> None:
        self.w, self.host, self.port = w, host, port
        self._queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
        self._stack = contextlib.AsyncExitStack()
        self._pumps: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> _Nodes:
        for name in ("a_node", "a_node2", "b_node"):
            r = await self.w.client.post("/api/v1/token/node", json={"api_key": self.w.api_keys[name]})
            account = await r.json()
            client = aiomqtt.Client(
                self.host, self.port, username=account["broker_username"], password=account["broker_password"]
            )
            await self._stack.enter_async_context(client)
            await client.subscribe(f"vfed/nodes/{account['node_id']}", qos=1)
            self._pumps.append(asyncio.create_task(self._pump(client)))
        return self

    async def _pump(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            await self._queue.put(msg)

    async def __aexit__(self, *exc: object) -> None:
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        await self._stack.aclose()

    @property
    def messages(self) -> AsyncIterator[aiomqtt.Message]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[aiomqtt.Message]:
        while True:
            yield await self._queue.get()


async def _ring_and_check(w: World, host: str, port: int, accounts: bool = False) -> None:
    await asyncio.wait_for(w.client.app[DOORBELL].connected.wait(), 20)
    async with _Nodes(w, host, port) if accounts else aiomqtt.Client(host, port) as sub:
        if not accounts:
            await sub.subscribe("vfed/nodes/#", qos=1)  # type: ignore[union-attr]
        task = await w.task("a_res", "ab", ["A", "B"])
        created = await _expect(sub, 3)  # a_node, a_node2 (org A) and b_node (org B)
        _, runs = await w.call("root", "GET", f"/runs?task_id={task['id']}")
        run_of = {r["organization_id"]: r["id"] for r in runs["data"]}
        expected = {
            (f"vfed/nodes/{w.nodes[n]}", run_of[w.orgs[o]])
            for n, o in (("a_node", "A"), ("a_node2", "A"), ("b_node", "B"))
        }
        assert {(t, m["run_id"]) for t, m in created} == expected
        assert all(
            m == {"event": "run-created", "run_id": m["run_id"], "task_id": task["id"], "job_id": task["id"]}
            for _, m in created
        )
        await w.call("a_node", "POST", f"/runs/{run_of[w.orgs['A']]}/claim")
        await w.call("a_res", "POST", f"/tasks/{task['id']}/kill")
        killed = await _expect(sub, 2)
        assert {(m["event"], m["job_id"]) for _, m in killed} == {("run-killed", task["id"])}
        # the claimed run rings only its claimer; the pending one rings every node of its organization
        assert sorted(t for t, _ in killed) == sorted(
            [f"vfed/nodes/{w.nodes['a_node']}", f"vfed/nodes/{w.nodes['b_node']}"]
        )


@pytest.mark.mqtt
async def test_doorbell_through_mosquitto(
    aiohttp_client: Any, tmp_path: Path, mqtt_broker: infra.Broker
) -> None:
    w = await _world(aiohttp_client, _settings(tmp_path, MqttSettings(url=mqtt_broker.url)))
    await _ring_and_check(w, mqtt_broker.host, mqtt_broker.port)


@pytest.mark.mqtt
async def test_doorbell_through_embedded_broker(aiohttp_client: Any, tmp_path: Path) -> None:
    port = infra.free_port()
    w = await _world(
        aiohttp_client, _settings(tmp_path, MqttSettings(embedded_broker=True, embedded_port=port))
    )
    await _ring_and_check(w, "127.0.0.1", port, accounts=True)


@pytest.mark.mqtt
async def test_broker_outage_never_blocks_the_api(
    aiohttp_client: Any, tmp_path: Path, mqtt_broker: infra.Broker, mosquitto_server: infra.Mosquitto
) -> None:
    mqtt = MqttSettings(url=mqtt_broker.url, reconnect_max_s=0.5)
    w = await _world(aiohttp_client, _settings(tmp_path, mqtt))
    await asyncio.wait_for(w.client.app[DOORBELL].connected.wait(), 20)
    mosquitto_server.stop()
    try:
        started = time.monotonic()
        task = await w.task("a_res", "ab", ["B"])
        elapsed_s = time.monotonic() - started
        status, _ = await w.call("root", "GET", f"/tasks/{task['id']}")
        assert status == 200
    finally:
        mosquitto_server.start()
    # the queued doorbell is delivered once the broker is back (a persistent session would keep it; we
    # subscribe first and let the publisher's reconnect loop find the broker again)
    async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port) as sub:
        await sub.subscribe(f"vfed/nodes/{w.nodes['b_node']}", qos=1)
        got = await _expect(sub, 1, timeout_s=30)
    assert got[0][1]["task_id"] == task["id"]
    assert elapsed_s < 5, (
        "task creation waited for the broker"
    )  # generous: it is a liveness check, not a timing


async def test_no_broker_configured_is_fine(aiohttp_client: Any, tmp_path: Path) -> None:
    w = await _world(aiohttp_client, _settings(tmp_path, MqttSettings()))
    task = await w.task("a_res", "ab", ["A"])
    assert task["status"] == "pending"
    r = await w.client.get("/api/v1/doorbell")
    assert (await r.json())["url"] is None


@pytest.mark.mqtt
async def test_embedded_broker_port_taken_still_serves(aiohttp_client: Any, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mqtt = MqttSettings(embedded_broker=True, embedded_port=port)
        w = await _world(aiohttp_client, _settings(tmp_path, mqtt))
        r = await w.client.get("/api/v1/doorbell")
        assert (await r.json())["url"] is None
        task = await w.task("a_res", "ab", ["A"])
        assert task["status"] == "pending"
