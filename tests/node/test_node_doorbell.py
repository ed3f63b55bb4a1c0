"""Doorbell message and address parsing: junk never raises, addresses carry TLS and credentials."""

from __future__ import annotations

import pytest

from vfed.common.api.doorbell import SPREAD_MAX_S, BrokerAddress, Ring, parse, topic_for
from vfed.node.doorbell import claim_delay_s


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"event": "run-created", "run_id": 4, "task_id": 2}', Ring("run-created", 4, 2)),
        ('{"event": "run-killed", "run_id": "7"}', Ring("run-killed", 7, None)),
        (b'{"event": "run-created", "run_id": 4, "task_id": 2, "job_id": 2}', Ring("run-created", 4, 2, 2)),
        (b'{"event": "run-created", "run_id": 4, "job_id": "2/../x"}', Ring("run-created", 4, None)),
        (b'{"event": "run-created", "run_id": 4, "job_id": -3}', Ring("run-created", 4, None)),
        (b'{"event": "run-created", "run_id": 4, "job_id": true}', Ring("run-created", 4, None)),
        (b"not json", None),
        (b'{"run_id": 1}', None),
        (b'["a list"]', None),
        (b'{"event": "x", "run_id": "seven"}', None),
        (12345, None),
    ],
)
def test_parse(payload: object, expected: Ring | None) -> None:
    assert parse(payload) == expected


def test_addresses() -> None:
    plain = BrokerAddress.parse("mqtt://broker.example:1884")
    assert (plain.host, plain.port, plain.tls, plain.username) == ("broker.example", 1884, False, None)
    secure = BrokerAddress.parse("mqtts://node%40a:p%3Ass@broker.example")
    assert (secure.port, secure.tls, secure.username, secure.password) == (8883, True, "node@a", "p:ss")
    assert topic_for(3) == "vfed/nodes/3"


@pytest.mark.parametrize(
    ("spread", "expected"),
    [
        (2.5, 2.5),
        (3, 3.0),
        (1e9, SPREAD_MAX_S),  # anyone who can publish could send it: capped
        (-1, 0.0),
        (0, 0.0),
        ('"5"', 0.0),
        ("true", 0.0),
        ("NaN", 0.0),
        ("Infinity", 0.0),
        ("[1]", 0.0),
        ("null", 0.0),
    ],
)
def test_parse_spread(spread: object, expected: float) -> None:
    """A junk spread is no spread; the ring itself still counts."""
    ring = parse(f'{{"event": "run-created", "run_id": 4, "task_id": 2, "spread_s": {spread}}}')
    assert ring is not None and ring.run_id == 4
    assert ring.spread_s == expected


def test_claim_delay_within_spread() -> None:
    """A new run's claim waits a random moment within the spread (capped); other rings never wait."""
    ring = parse(b'{"event": "run-created", "run_id": 4, "task_id": 2, "spread_s": 2}')
    assert ring is not None
    delays = [claim_delay_s(ring) for _ in range(2000)]
    assert all(0 <= d <= 2 for d in delays)
    assert min(delays) < 0.2 and max(delays) > 1.8  # spread over the whole window, not a fixed wait
    huge = parse(b'{"event": "run-created", "run_id": 4, "task_id": 2, "spread_s": 1e300}')
    assert huge is not None
    assert max(claim_delay_s(huge) for _ in range(2000)) <= SPREAD_MAX_S
    for other in (
        b'{"event": "run-killed", "run_id": 4, "spread_s": 3}',
        b'{"event": "poll"}',
        b'{"event": "run-created", "run_id": 4}',
    ):
        parsed = parse(other)
        assert parsed is not None
        assert claim_delay_s(parsed) == 0.0


def test_poll_event_parses() -> None:
    """The server's "poll now" (its doorbell queue was full) is a ring without a run."""
    assert parse(b'{"event": "poll"}') == Ring("poll", None, None)
