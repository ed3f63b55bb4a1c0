"""The MQTT doorbell: a message only says "look at the API now"; a lost one delays work, never loses it."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiomqtt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ring:
    """One doorbell message."""

    event: str
    run_id: int | None
    task_id: int | None


def topic_for(node_id: int) -> str:
    return f"vfed/nodes/{node_id}"


def parse(payload: bytes | bytearray | str | object) -> Ring | None:
    """The message, or None when it is not one of ours (never raises on junk)."""
    try:
        raw = payload.encode() if isinstance(payload, str) else bytes(payload)  # type: ignore[call-overload]
        doc = json.loads(raw)
        run_id, task_id = doc.get("run_id"), doc.get("task_id")
        return Ring(
            str(doc["event"]),
            int(run_id) if run_id is not None else None,
            int(task_id) if task_id is not None else None,
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def broker_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


class Doorbell:
    """Subscribes to our topic and calls `on_ring` per message; reconnects with jittered backoff forever."""

    def __init__(self, url: str, node_id: int, on_ring: Callable[[Ring], None]) -> None:
        self.host, self.port = broker_address(url)
        self.topic = topic_for(node_id)
        self.on_ring = on_ring
        self.connected = asyncio.Event()
        self.max_backoff_s = 30.0

    async def run(self) -> None:
        """Runs until cancelled."""
        delay = 0.5
        while True:
            try:
                async with aiomqtt.Client(self.host, self.port, keepalive=30, timeout=10) as client:
                    await client.subscribe(self.topic, qos=1)
                    self.connected.set()
                    delay = 0.5
                    log.info("doorbell subscribed to %s on %s:%s", self.topic, self.host, self.port)
                    # A reconnect may have missed messages: ring once so the agent re-reads the API.
                    self.on_ring(Ring("reconnected", None, None))
                    async for message in client.messages:
                        ring = parse(message.payload)
                        if ring is not None:
                            self.on_ring(ring)
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                wait_s = delay * random.uniform(0.5, 1.5)
                log.warning("doorbell broker unreachable (%s); polling only, retry in %.1f s", exc, wait_s)
                await asyncio.sleep(wait_s)
                delay = min(delay * 2, self.max_backoff_s)
