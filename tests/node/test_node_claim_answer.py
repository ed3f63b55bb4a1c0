"""The node's reading of the claim answer: JSON alone, or multipart/mixed with the sealed input as binary."""

from __future__ import annotations

import json

import pytest

from vfed.common.api.errors import ApiError
from vfed.node.server_api import parse_claim

RUN = {"id": 7, "task_id": 3, "job_id": 3, "organization_id": 1, "status": "initializing"}
CT = "multipart/mixed; boundary=B0undary"


def mixed(*parts: bytes) -> bytes:
    return b"".join(b"--B0undary\r\n" + p + b"\r\n" for p in parts) + b"--B0undary--\r\n"


def part(ctype: str, data: bytes, name: str | None = None) -> bytes:
    disposition = f'Content-Disposition: attachment; name="{name}"\r\n'.encode() if name else b""
    return f"Content-Type: {ctype}\r\n".encode() + disposition + b"\r\n" + data


def test_json_answer_has_no_input() -> None:
    claim = parse_claim("application/json; charset=utf-8", json.dumps(RUN).encode())
    assert claim.id == 7 and claim.input_bytes() is None


def test_mixed_answer_carries_the_input_bytes() -> None:
    sealed = b"\x00\r\n--B0undar\xff" * 10
    body = mixed(
        part("application/json", json.dumps(RUN).encode()), part("application/octet-stream", sealed, "input")
    )
    claim = parse_claim(CT, body)
    assert claim.task_id == 3 and claim.input_bytes() == sealed


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"{not json"),
        ("application/json", json.dumps({"id": "x"}).encode()),
        (CT, mixed(part("application/json", json.dumps(RUN).encode()))),  # the input part is missing
        (CT, mixed(part("application/json", b"[]"), part("application/octet-stream", b"x", "input"))),
        (CT, mixed(part("application/json", json.dumps(RUN).encode()), part("text/plain", b"x", "input"))),
        (
            CT,
            mixed(
                part("application/json", json.dumps(RUN).encode()),
                part("application/octet-stream", b"x", "log"),
            ),
        ),
        (CT, b"--B0undary\r\nContent-Type: application/json\r\n\r\n{}"),  # truncated
    ],
)
def test_malformed_answers_are_one_clear_error(content_type: str, body: bytes) -> None:
    with pytest.raises(ApiError) as info:
        parse_claim(content_type, body)
    assert info.value.status == 502 and info.value.error == "bad-claim-answer"
