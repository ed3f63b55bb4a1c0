"""One task to 200 organizations: a real `vserver start` on PostgreSQL rings 200 simulated nodes through
Mosquitto; every node is rung exactly once, every run claimed once and completed. With a doorbell queue far
too small for the task, the degraded `poll` messages still get every run done: nothing is lost."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from tests import infra
from tests.server.fanout_sim import Simulator, federation, metric, server

pytestmark = [pytest.mark.postgres, pytest.mark.mqtt, pytest.mark.timeout(120)]
NODES = 200


@dataclass(frozen=True)
class Outcome:
    rings_per_node: set[int]
    """How many run-created rings of the task the nodes heard (as a set: {1} is once each)."""
    polls: int
    doorbells: dict[str, float]
    """The server's vserver_doorbell_messages by outcome."""


async def _fan_out(tmp_path: Path, pg: infra.Postgres, broker: infra.Broker, **mqtt: object) -> Outcome:
    """Create one task to every organization and see every run completed, each claimed exactly once."""
    fed = federation(
        tmp_path, NODES, pg.url(infra.create_database(pg)), f"mqtt://{broker.host}:{broker.port}", **mqtt
    )
    with server(fed, tmp_path / "vserver.log"):
        async with Simulator(fed, broker) as sim:
            await sim.start(timeout_s=30)
            user = await sim.researcher()
            task, _ = await sim.create_task(user)
            runs = await sim.runs_of(user, task["id"])
            assert len(runs) == NODES
            await sim.wait_completed({r["id"] for r in runs}, timeout_s=45)
            assert not sim.tally.errors
            assert all(sim.tally.claims[r["id"]] == 1 for r in runs)
            every_org = [r["organization_id"] for r in sorted(runs, key=lambda r: r["id"])]
            assert all(
                sim.tally.claimed_orgs[r["id"]] == every_org for r in runs
            )  # the claim's task is whole
            assert {r["status"] for r in await sim.runs_of(user, task["id"])} == {"completed"}
            doorbells = {
                o: await metric(
                    sim.http, fed.metrics_url, "vserver_doorbell_messages_total", f'outcome="{o}"'
                )
                for o in ("published", "degraded", "dropped")
            }
    rings = sim.tally.rings
    return Outcome(
        {sum(r.task_id == task["id"] for _, r in rings[(n, "run-created")]) for n in sim.node_ids},
        sum(len(rings[(n, "poll")]) for n in sim.node_ids),
        doorbells,
    )


async def test_every_node_rung_once_and_every_run_completed(
    tmp_path: Path, postgres_server: infra.Postgres, mqtt_broker: infra.Broker
) -> None:
    outcome = await _fan_out(tmp_path, postgres_server, mqtt_broker)
    assert outcome.rings_per_node == {1}
    assert outcome.polls == 0
    assert outcome.doorbells == {"published": NODES, "degraded": 0, "dropped": 0}


async def test_full_queue_degrades_to_polls_and_loses_nothing(
    tmp_path: Path, postgres_server: infra.Postgres, mqtt_broker: infra.Broker
) -> None:
    """A queue of 5: the first 5 nodes hear their run-created, the other 195 a poll; all 200 runs finish."""
    outcome = await _fan_out(tmp_path, postgres_server, mqtt_broker, queue_max=5)
    assert outcome.rings_per_node == {0, 1}
    assert outcome.polls == outcome.doorbells["degraded"] == NODES - 5
    assert outcome.doorbells == {"published": NODES, "degraded": NODES - 5, "dropped": 0}
