"""Doorbell message and address parsing: junk never raises, addresses carry TLS and credentials."""

from __future__ import annotations

import pytest

from vfed.node.doorbell import BrokerAddress, Ring, parse, topic_for


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
