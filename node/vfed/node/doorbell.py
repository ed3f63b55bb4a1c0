"""The MQTT doorbell: a message only says "look at the API now"; a lost one delays work, never loses it."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiomqtt

log = logging.getLogger(__name__)
SPREAD_MAX_S = 10.0
"""The longest a ring's `spread_s` can hold back a claim: anyone who can publish on our topic can send one."""


@dataclass(frozen=True)
class Ring:
    """One doorbell message."""

    event: str
    run_id: int | None
    task_id: int | None
    job_id: int | None = None
    """The run's job (servers since the doorbell named it): lets the agent set up the job's folder while its
    claim is on the way. Only a hint: the claim's answer is what counts."""
    seq: int | None = None
    """For `ledger` rings: the ledger's length after the append that rang (a hint: the ledger is read)."""
    collaboration_id: int | None = None
    spread_s: float = 0.0
    """For `run-created` rings of a task that rang many nodes: wait a random delay up to this before the
    claim, so those nodes do not all ask the server at once (capped at SPREAD_MAX_S; junk reads as 0)."""


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
            _hint(doc.get("job_id")),
            _hint(doc.get("seq")),
            _hint(doc.get("collaboration_id")),
            _spread(doc.get("spread_s")),
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def claim_delay_s(ring: Ring) -> float:
    """How long to wait before acting on this ring: a random moment within a new run's spread, else none.
    Spreads the claims of the nodes one big task rang over the time the server asked for."""
    return random.uniform(0, ring.spread_s) if ring.event == "run-created" and ring.spread_s > 0 else 0.0


def _spread(value: object) -> float:
    """Seconds to spread over, capped; anything but a finite positive number is no spread."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return min(float(value), SPREAD_MAX_S) if math.isfinite(value) and value > 0 else 0.0


def _hint(value: object) -> int | None:
    """A job id that is not a positive integer is no hint; the ring still counts."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker listens: `mqtt://[user:password@]host[:port]`, or `mqtts://` for TLS."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        tls = parts.scheme == "mqtts"
        return cls(
            parts.hostname or "127.0.0.1",
            parts.port or (8883 if tls else 1883),
            tls,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
        )


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
