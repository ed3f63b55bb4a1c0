"""MQTT doorbell: tells a node "look at the API now". Never blocks or fails an API request.

Messages go into a bounded in-memory queue; one background task publishes them, reconnecting with jittered
backoff while the broker is away. A full queue loses no node: a message that does not fit becomes one
`{"event": "poll"}` for its node, which replaces that node's queued messages (memory stays bounded by the
queue plus one entry per node). A message lost anyway (broker gone at shutdown) only delays work: nodes
also poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections import deque

import aiomqtt

from vfed.common.api.doorbell import POLL_MESSAGE, BrokerAddress, ledger_message, run_message, topic_for
from vfed.server.config import MqttSettings
from vfed.server.metrics import Metrics

log = logging.getLogger(__name__)
BATCH_MAX = 100  # messages in flight at once (the client is told to allow as many; paho defaults to 20)


class Doorbell:
    """Queue + background publisher. `ring` is synchronous and O(1)."""

    def __init__(self, settings: MqttSettings, url: str | None, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.address = BrokerAddress.parse(url) if url else None
        self.metrics = metrics
        self.connected = asyncio.Event()
        self._queue: deque[tuple[int, int, bytes]] = deque()
        """(sequence number, node, payload), oldest first."""
        self._seq = 0
        self._live: dict[int, int] = {}
        """Queued messages per node that still go out as themselves."""
        self._superseded: dict[int, int] = {}
        """Node -> sequence number: that node's queued messages before it are replaced by a poll."""
        self._polls: dict[int, None] = {}
        """Nodes owed one `poll` message, in the order they degraded (an ordered set)."""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def spread_for(self, nodes: int) -> float:
        """Seconds over which the `nodes` nodes one task rings should spread their claims (0: at once)."""
        s = self.settings
        if nodes < s.spread_min_nodes:
            return 0.0
        return round(min(s.spread_max_s, nodes * s.spread_per_node_s), 3)

    def ring(
        self, node_id: int, event: str, run_id: int, task_id: int, job_id: int, spread_s: float = 0.0
    ) -> None:
        """Queue one message for one node. The message holds ids only (no names, no data): what a node needs
        to claim the run and to prepare for it meanwhile; `spread_s` > 0 asks the node to wait a random
        delay up to that before it claims, so the nodes of a big task do not all ask at once."""
        self._queue_message(node_id, run_message(event, run_id, task_id, job_id, spread_s))

    def ring_ledger(self, node_id: int, collaboration_id: int, seq: int) -> None:
        """Queue one message for one node: its collaboration's ledger grew to `seq` (read it from the API)."""
        self._queue_message(node_id, ledger_message(collaboration_id, seq))

    def _queue_message(self, node_id: int, message: bytes) -> None:
        if self.address is None:
            return
        if node_id in self._polls:
            self._count("degraded")  # the poll already owed to this node covers this message too
            return
        if len(self._queue) >= self.settings.queue_max:
            self._degrade(node_id)
        else:
            self._seq += 1
            self._queue.append((self._seq, node_id, message))
            self._live[node_id] = self._live.get(node_id, 0) + 1
        self._wake.set()

    def _degrade(self, node_id: int) -> None:
        """The queue is full: this node gets one `poll` instead of this message and of those queued for it.
        Its queued messages are skipped when their turn comes (removing them now would scan the queue)."""
        self._superseded[node_id] = self._seq + 1
        self._polls[node_id] = None
        self._count("degraded", self._live.pop(node_id, 0) + 1)

    def _next_batch(self) -> list[tuple[int, int, bytes]]:
        """Up to BATCH_MAX messages: the queue's oldest first, then the polls owed."""
        batch: list[tuple[int, int, bytes]] = []
        while len(batch) < BATCH_MAX and self._queue:
            seq, node_id, payload = self._queue.popleft()
            if seq < self._superseded.get(node_id, 0):
                continue  # a poll replaces it (counted when it was replaced)
            self._live[node_id] -= 1
            if not self._live[node_id]:
                del self._live[node_id]
            batch.append((seq, node_id, payload))
        if not self._queue:
            self._superseded.clear()  # nothing queued is left for them to supersede
        while len(batch) < BATCH_MAX and self._polls:
            node_id = next(iter(self._polls))
            del self._polls[node_id]
            batch.append((0, node_id, POLL_MESSAGE))
        return batch

    def _requeue(self, batch: list[tuple[int, int, bytes]]) -> None:
        """Put a batch that did not go out back in front, to be sent again after reconnecting (a repeat is
        harmless); the queue may pass `queue_max` by at most one batch."""
        for seq, node_id, payload in reversed(batch):
            if seq == 0:
                self._polls[node_id] = None
            elif node_id in self._polls:
                self._count("degraded")
            else:
                self._queue.appendleft((seq, node_id, payload))
                self._live[node_id] = self._live.get(node_id, 0) + 1

    @property
    def queued(self) -> int:
        """Messages waiting (superseded ones included until their turn) plus polls owed."""
        return len(self._queue) + len(self._polls)

    async def start(self) -> None:
        """Start the background publisher (no-op without a broker)."""
        if self.address is not None:
            self._task = asyncio.create_task(self._run(), name="doorbell")

    async def stop(self) -> None:
        """Cancel the publisher; what is still queued is dropped and counted so (nodes poll)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        dropped = sum(self._live.values()) + len(self._polls)
        if dropped:
            self._count("dropped", dropped)
        self._queue.clear()
        self._live.clear()
        self._superseded.clear()
        self._polls.clear()

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
        client = aiomqtt.Client(
            self.address.host,
            self.address.port,
            username=s.username,
            password=s.password,
            tls_context=tls_context,
            timeout=10,
            max_inflight_messages=BATCH_MAX,
        )
        # a full batch in flight is how the publisher works, not a backlog to warn about (aiomqtt logs a
        # warning per publish beyond 10 pending, which cost more than the publish itself)
        client.pending_calls_threshold = BATCH_MAX
        return client

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
            while not self._queue and not self._polls:
                self._wake.clear()
                await self._wake.wait()
            batch = self._next_batch()
            if not batch:
                continue
            try:
                await asyncio.gather(*(client.publish(topic_for(n), p, qos=1) for _, n, p in batch))
            except BaseException:
                self._requeue(batch)
                raise
            self._count("published", len(batch))
