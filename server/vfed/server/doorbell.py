"""MQTT doorbell: tells a node "look at the API now". Never blocks or fails an API request.

Messages go into a bounded in-memory queue; one background task publishes them, reconnecting with jittered
backoff while the broker is away. A lost message only delays work: nodes also poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiomqtt

from vfed.server.config import MqttSettings
from vfed.server.metrics import Metrics

log = logging.getLogger(__name__)
TOPIC_PREFIX = "vfed/nodes/"
BATCH_MAX = 20  # paho's default limit of messages in flight


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """mqtt://host[:1883] or mqtts://host[:8883]."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
        raise ValueError(f"broker URL {url!r}: use mqtt://host:port or mqtts://host:port")
    tls = parts.scheme in ("mqtts", "ssl")
    return BrokerAddress(parts.hostname, parts.port or (8883 if tls else 1883), tls)


class Doorbell:
    """Queue + background publisher. `ring` is synchronous and O(1)."""

    def __init__(self, settings: MqttSettings, url: str | None, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.address = parse_broker_url(url) if url else None
        self.metrics = metrics
        self.connected = asyncio.Event()
        self._queue: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def ring(self, node_id: int, event: str, run_id: int, task_id: int, job_id: int) -> None:
        """Queue one message for one node; drops the oldest when the queue is full. The message holds ids
        only (no names, no data): what a node needs to claim the run and to prepare for it meanwhile."""
        self._queue_message(node_id, {"event": event, "run_id": run_id, "task_id": task_id, "job_id": job_id})

    def ring_ledger(self, node_id: int, collaboration_id: int, seq: int) -> None:
        """Queue one message for one node: its collaboration's ledger grew to `seq` (read it from the API)."""
        message = {"event": "ledger", "collaboration_id": collaboration_id, "seq": seq}
        self._queue_message(node_id, {**message, "run_id": None, "task_id": None})

    def _queue_message(self, node_id: int, message: dict[str, object]) -> None:
        if self.address is None:
            return
        payload = json.dumps(message).encode()
        if len(self._queue) >= self.settings.queue_max:
            self._queue.popleft()
            self._count("dropped")
        self._queue.append((f"{TOPIC_PREFIX}{node_id}", payload))
        self._wake.set()

    async def start(self) -> None:
        """Start the background publisher (no-op without a broker)."""
        if self.address is not None:
            self._task = asyncio.create_task(self._run(), name="doorbell")

    async def stop(self) -> None:
        """Cancel the publisher; queued messages are dropped (nodes poll)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _count(self, outcome: str, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.doorbell.labels(outcome).inc(n)

    def _client(self) -> aiomqtt.Client:
        assert self.address is not None
        s = self.settings
        tls_context = None
        if self.address.tls:
            tls_context = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
            if s.cert_file:
                tls_context.load_cert_chain(str(s.cert_file), str(s.key_file) if s.key_file else None)
        return aiomqtt.Client(
            self.address.host,
            self.address.port,
            username=s.username,
            password=s.password,
            tls_context=tls_context,
            timeout=10,
        )

    async def _run(self) -> None:
        delay_s = 0.5
        while True:
            try:
                async with self._client() as client:
                    self.connected.set()
                    delay_s = 0.5
                    log.info("doorbell connected to %s:%s", self.address.host, self.address.port)  # type: ignore[union-attr]
                    await self._drain(client)
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                log.warning("doorbell broker unavailable (%s); retrying in %.1f s", exc, delay_s)
            await asyncio.sleep(delay_s * (0.5 + random.random()))
            delay_s = min(delay_s * 2, self.settings.reconnect_max_s)

    async def _drain(self, client: aiomqtt.Client) -> None:
        """Publish what is queued, up to BATCH_MAX at once: the packets leave in one write and the broker
        wakes once for them, instead of one round trip per message (a task rings a node per organization)."""
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), BATCH_MAX))]
            try:
                await asyncio.gather(*(client.publish(topic, payload, qos=1) for topic, payload in batch))
            except BaseException:
                self._queue.extendleft(reversed(batch))  # again after reconnecting (a repeat is harmless)
                raise
            self._count("published", len(batch))
