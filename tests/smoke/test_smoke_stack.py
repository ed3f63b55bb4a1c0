"""Proof that the test stack is real: a Docker engine, a Mosquitto broker, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import aiomqtt
import pytest
from sqlalchemy import Integer, String, select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from tests.infra import Broker

BASE = "vfed/base"


def _connect_script(host: str, port: int) -> str:
    return (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(3)\n"
        f"try:\n s.connect(({host!r},{port})); print('CONNECTED')\n"
        "except OSError as e:\n print('REFUSED', e.__class__.__name__)\n"
    )


@pytest.fixture
def two_networks(docker_client: Any) -> Iterator[tuple[Any, Any]]:
    """An internal network and an ordinary bridge network, both removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    internal = docker_client.networks.create(f"vfed-smoke-int-{tag}", driver="bridge", internal=True)
    other = docker_client.networks.create(f"vfed-smoke-out-{tag}", driver="bridge")
    yield internal, other
    internal.remove()
    other.remove()


@pytest.mark.docker
def test_internal_network_cannot_reach_an_address_outside_it(docker_client: Any, two_networks: Any) -> None:
    internal, other = two_networks
    listener = docker_client.containers.run(
        BASE,
        [
            "python3",
            "-c",
            "import socket;s=socket.socket();s.bind(('0.0.0.0',8080));s.listen();"
            "[s.accept()[0].close() for _ in iter(int,1)]",
        ],
        network=other.name,
        detach=True,
        remove=True,
    )
    try:
        listener.reload()
        ip = listener.attrs["NetworkSettings"]["Networks"][other.name]["IPAddress"]
        # Positive control: from the listener's own network the address answers, so the probe can succeed.
        same = docker_client.containers.run(
            BASE, ["python3", "-c", _connect_script(ip, 8080)], network=other.name, remove=True
        )
        assert b"CONNECTED" in same
        # From the internal network the same address is out of reach.
        isolated = docker_client.containers.run(
            BASE, ["python3", "-c", _connect_script(ip, 8080)], network=internal.name, remove=True
        )
        assert b"REFUSED" in isolated, isolated
    finally:
        listener.kill()


@pytest.mark.mqtt
async def test_mqtt_publish_subscribe_round_trip(mqtt_broker: Broker) -> None:
    topic = f"vfed/smoke/{uuid.uuid4().hex}"
    async with (
        aiomqtt.Client(mqtt_broker.host, mqtt_broker.port) as sub,
        aiomqtt.Client(mqtt_broker.host, mqtt_broker.port) as pub,
    ):
        await sub.subscribe(topic, qos=1)
        await pub.publish(topic, b"ring", qos=1)
        async with asyncio.timeout(5):
            async for message in sub.messages:
                assert message.topic.matches(topic)
                assert message.payload == b"ring"
                break


class _Base(DeclarativeBase):
    pass


class _Item(_Base):
    __tablename__ = "smoke_item"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


async def _round_trip(url: str) -> list[str]:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_Base.metadata.create_all)
            await conn.execute(_Item.__table__.insert(), [{"name": "a"}, {"name": "b"}])
        async with engine.connect() as conn:
            rows = await conn.execute(select(_Item.name).order_by(_Item.id))
            return [r[0] for r in rows]
    finally:
        await engine.dispose()


async def test_sqlite_round_trip(tmp_path: Any) -> None:
    assert await _round_trip(f"sqlite+aiosqlite:///{tmp_path}/smoke.db") == ["a", "b"]


@pytest.mark.postgres
async def test_postgres_round_trip(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql+asyncpg://")
    assert await _round_trip(postgres_url) == ["a", "b"]
