"""The MQTT doorbell: a message only says "look at the API now"; a lost one delays work, never loses it."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable
from pathlib import Path

import aiomqtt

from vfed.common.api.doorbell import BrokerAddress, Ring, parse, topic_for

log = logging.getLogger(__name__)


def claim_delay_s(ring: Ring) -> float:
    """How long to wait before acting on this ring: a random moment within a new run's spread, else none.
    Spreads the claims of the nodes one big task rang over the time the server asked for."""
    return random.uniform(0, ring.spread_s) if ring.event == "run-created" and ring.spread_s > 0 else 0.0


class Doorbell:
    """Subscribes to our topic and calls `on_ring` per message; reconnects with jittered backoff forever."""

    def __init__(
        self,
        url: str,
        node_id: int,
        on_ring: Callable[[Ring], None],
        credentials: Callable[[], tuple[str | None, str | None]] | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.address = BrokerAddress.parse(url)
        self.topic = topic_for(node_id)
        self.on_ring = on_ring
        self.credentials = credentials
        """The broker account the server gave at the last login; asked at every connect, so a login after a
        key rotation brings the new password. Credentials in the URL win."""
        self.ca_file = ca_file
        self.connected = asyncio.Event()
        self.max_backoff_s = 30.0

    def _client(self) -> aiomqtt.Client:
        a = self.address
        username, password = a.username, a.password
        if username is None and self.credentials is not None:
            username, password = self.credentials()
        ca = str(self.ca_file) if self.ca_file is not None else None
        return aiomqtt.Client(
            a.host,
            a.port,
            username=username,
            password=password,
            tls_context=ssl.create_default_context(cafile=ca) if a.tls else None,
            keepalive=30,
            timeout=10,
        )

    async def run(self) -> None:
        """Runs until cancelled."""
        delay = 0.5
        while True:
            try:
                async with self._client() as client:
                    await client.subscribe(self.topic, qos=1)
                    self.connected.set()
                    delay = 0.5
                    where = f"{self.address.host}:{self.address.port}"
                    log.info("doorbell subscribed to %s on %s", self.topic, where)
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
