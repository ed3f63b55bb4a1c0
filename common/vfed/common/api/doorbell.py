"""The MQTT doorbell's wire contract, the server's (which publishes) and the node's (which listens): the
broker address, the topic of each node and the messages.

A message holds ids only (no names, no data) and is only a hint: "look at the API now". A node reads what it
says from the REST API before it acts, so a forged or lost message delays work and never decides anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

TOPIC_PREFIX = "vfed/nodes/"
SPREAD_MAX_S = 10.0
"""The longest a ring's `spread_s` can hold back a claim: anyone who can publish on our topic can send one."""

RUN_CREATED = "run-created"
LEDGER = "ledger"
POLL = "poll"
"""Events the server names; others (`run-killed`, ...) are the event of the run change that rang."""


def topic_for(node_id: int) -> str:
    """The topic node `node_id` reads (and only it, under the broker's ACL)."""
    return f"{TOPIC_PREFIX}{node_id}"


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker listens: `mqtt://[user:password@]host[:port]`, or `mqtts://` for TLS (`tcp://` and
    `ssl://` are the same two)."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """ValueError for another scheme or no host."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise ValueError(f"broker URL {url!r}: use mqtt://host:port or mqtts://host:port")
        tls = parts.scheme in ("mqtts", "ssl")
        return cls(
            parts.hostname,
            parts.port or (8883 if tls else 1883),
            tls,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
        )


@dataclass(frozen=True)
class Ring:
    """One doorbell message."""

    event: str
    run_id: int | None
    task_id: int | None
    job_id: int | None = None
    """The run's job: lets the agent set up the job's folder while its claim is on the way. Only a hint: the
    claim's answer is what counts."""
    seq: int | None = None
    """For `ledger` rings: the ledger's length after the append that rang (a hint: the ledger is read)."""
    collaboration_id: int | None = None
    spread_s: float = 0.0
    """For `run-created` rings of a task that rang many nodes: wait a random delay up to this before the
    claim, so those nodes do not all ask the server at once (capped at SPREAD_MAX_S; junk reads as 0)."""


def run_message(event: str, run_id: int, task_id: int, job_id: int, spread_s: float = 0.0) -> bytes:
    """A run changed (`run-created`, `run-killed`, ...): what the node needs to claim it and prepare."""
    message: dict[str, object] = {"event": event, "run_id": run_id, "task_id": task_id, "job_id": job_id}
    if spread_s > 0:
        message["spread_s"] = spread_s
    return json.dumps(message).encode()


def ledger_message(collaboration_id: int, seq: int) -> bytes:
    """The collaboration's ledger grew to `seq` entries (the node reads it from the API)."""
    message = {
        "event": LEDGER,
        "collaboration_id": collaboration_id,
        "seq": seq,
        "run_id": None,
        "task_id": None,
    }
    return json.dumps(message).encode()


POLL_MESSAGE = json.dumps({"event": POLL}).encode()
"""What a node gets instead of the messages a full queue could not hold: look at everything now."""


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


def _spread(value: object) -> float:
    """Seconds to spread over, capped; anything but a finite positive number is no spread."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return min(float(value), SPREAD_MAX_S) if math.isfinite(value) and value > 0 else 0.0


def _hint(value: object) -> int | None:
    """An id that is not a positive integer is no hint; the ring still counts."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
