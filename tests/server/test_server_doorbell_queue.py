"""The doorbell queue loses no node when it is full (a node's messages become one `poll`, counted), and a task
that rings many nodes asks them to spread their claims."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiomqtt
import pytest
from tests import infra

from vfed.server.config import MqttSettings
from vfed.server.doorbell import Doorbell
from vfed.server.metrics import Metrics


def _doorbell(queue_max: int, url: str = "mqtt://127.0.0.1:1", **spread: Any) -> tuple[Doorbell, Metrics]:
    metrics = Metrics()
    return Doorbell(MqttSettings(url=url, queue_max=queue_max, **spread), url, metrics), metrics


def _count(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("vserver_doorbell_messages_total", {"outcome": outcome})
    return value or 0.0


def _drain(doorbell: Doorbell) -> list[tuple[int, dict[str, Any]]]:
    out: list[tuple[int, dict[str, Any]]] = []
    while batch := doorbell._next_batch():
        out.extend((node, json.loads(payload)) for _, node, payload in batch)
    return out


def test_full_queue_degrades_to_one_poll_per_node() -> None:
    doorbell, metrics = _doorbell(queue_max=3)
    for run in range(1, 4):  # fills the queue: node 1 twice, node 2 once
        doorbell.ring(1 if run < 3 else 2, "run-created", run, 1, 1)
    doorbell.ring(1, "run-created", 4, 2, 2)  # full: node 1's two queued messages and this one become a poll
    doorbell.ring(1, "run-killed", 5, 2, 2)  # node 1 already owes a poll: covered by it
    doorbell.ring(3, "run-created", 6, 2, 2)  # still full (the superseded entries wait for their turn)
    assert _count(metrics, "degraded") == 5  # runs 1, 2, 4, 5 of node 1 and run 6 of node 3
    assert doorbell.queued <= 3 + 2  # the queue plus one poll per node
    got = _drain(doorbell)
    assert got == [
        (2, {"event": "run-created", "run_id": 3, "task_id": 1, "job_id": 1}),
        (1, {"event": "poll"}),
        (3, {"event": "poll"}),
    ]
    assert doorbell.queued == 0
    doorbell.ring(1, "run-created", 7, 3, 3)  # room again: node 1 gets its messages as themselves
    assert _drain(doorbell) == [(1, {"event": "run-created", "run_id": 7, "task_id": 3, "job_id": 3})]
    assert _count(metrics, "dropped") == 0


def test_memory_bounded_by_queue_and_nodes() -> None:
    """10,000 rings for 50 nodes into a queue of 100: at most 100 queued plus one poll per node."""
    doorbell, metrics = _doorbell(queue_max=100)
    for i in range(10_000):
        doorbell.ring(i % 50, "run-created", i, i, i)
    assert doorbell.queued <= 100 + 50
    got = _drain(doorbell)
    assert {node for node, m in got if m == {"event": "poll"}} == set(range(50))
    assert len(got) + _count(metrics, "degraded") == 10_000 + 50  # every ring sent itself or became a poll


def test_spread_grows_with_nodes_rung() -> None:
    doorbell, _ = _doorbell(10, spread_min_nodes=50, spread_per_node_s=0.005, spread_max_s=4.0)
    assert doorbell.spread_for(3) == 0.0
    assert doorbell.spread_for(49) == 0.0
    assert doorbell.spread_for(200) == 1.0
    assert doorbell.spread_for(100_000) == 4.0
    doorbell.ring(1, "run-created", 1, 1, 1, doorbell.spread_for(200))
    doorbell.ring(2, "run-created", 2, 1, 1, doorbell.spread_for(3))
    assert _drain(doorbell) == [
        (1, {"event": "run-created", "run_id": 1, "task_id": 1, "job_id": 1, "spread_s": 1.0}),
        (2, {"event": "run-created", "run_id": 2, "task_id": 1, "job_id": 1}),
    ]


def test_spread_settings_refuse_nonsense() -> None:
    """Nodes cap a spread at 10 s: a larger setting would promise what never happens."""
    with pytest.raises(ValueError):
        MqttSettings(spread_max_s=60)
    with pytest.raises(ValueError):
        MqttSettings(spread_per_node_s=-1)


@pytest.mark.mqtt
async def test_degraded_polls_reach_subscribers(mqtt_broker: infra.Broker) -> None:
    """Rung while the publisher is not running (as during a broker outage), then delivered through Mosquitto:
    every node hears something (its own message or a poll), and nothing is counted dropped."""
    url = f"mqtt://{mqtt_broker.host}:{mqtt_broker.port}"
    doorbell, metrics = _doorbell(queue_max=5, url=url)
    for node in range(10):
        doorbell.ring(node, "run-created", 100 + node, 1, 1)
    heard: dict[int, dict[str, Any]] = {}
    async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port) as sub:
        await sub.subscribe("vfed/nodes/#", qos=1)
        await doorbell.start()
        try:
            async with asyncio.timeout(20):
                async for msg in sub.messages:
                    heard[int(str(msg.topic).rsplit("/", 1)[1])] = json.loads(bytes(msg.payload))  # type: ignore[arg-type]
                    if len(heard) == 10:
                        break
            for _ in range(100):  # the last PUBACKs: the batch counts as published once they are in
                if _count(metrics, "published") == 10:
                    break
                await asyncio.sleep(0.05)
        finally:
            await doorbell.stop()
    assert heard == {
        **{n: {"event": "run-created", "run_id": 100 + n, "task_id": 1, "job_id": 1} for n in range(5)},
        **{n: {"event": "poll"} for n in range(5, 10)},
    }
    assert [_count(metrics, o) for o in ("published", "degraded", "dropped")] == [10, 5, 0]


async def test_stop_counts_what_never_went_out() -> None:
    """No broker: what is still queued (messages and polls owed) when the server stops is counted dropped."""
    doorbell, metrics = _doorbell(queue_max=2, url=f"mqtt://127.0.0.1:{infra.free_port()}")
    await doorbell.start()
    for node in range(3):
        doorbell.ring(node, "run-created", node, 1, 1)
    await doorbell.stop()
    assert [_count(metrics, o) for o in ("published", "degraded", "dropped")] == [0, 1, 3]
    assert doorbell.queued == 0
