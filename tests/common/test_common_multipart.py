"""vfed.common.multipart: in-memory multipart splitting on python-multipart; clear errors on bad bodies."""

from __future__ import annotations

import pytest
from aiohttp import MultipartWriter, hdrs

from vfed.common import multipart

CT = "multipart/mixed; boundary=XyZ"


def body(*parts: tuple[str, bytes, str | None], close: bool = True) -> bytes:
    out = b""
    for ctype, data, name in parts:
        out += b"--XyZ\r\nContent-Type: " + ctype.encode() + b"\r\n"
        if name is not None:
            out += b'Content-Disposition: attachment; name="' + name.encode() + b'"\r\n'
        out += b"\r\n" + data + b"\r\n"
    return out + (b"--XyZ--\r\n" if close else b"")


async def test_round_trip_with_aiohttp_writer() -> None:
    """What the server writes with aiohttp's MultipartWriter splits back into the same parts."""
    writer = MultipartWriter("mixed")
    writer.append('{"a": 1}', {hdrs.CONTENT_TYPE: "application/json"})
    payload = bytes(range(256)) * 4 + b"\r\n--not-a-boundary\r\n"
    writer.append(payload, {hdrs.CONTENT_TYPE: "application/octet-stream"}).set_content_disposition(
        "attachment", name="input"
    )
    chunks: list[bytes] = []

    class Sink:
        async def write(self, data: bytes) -> None:
            chunks.append(data)

    await writer.write(Sink())  # type: ignore[arg-type]
    parts = multipart.split(writer.content_type, b"".join(chunks), "mixed")
    assert [p.content_type for p in parts] == ["application/json", "application/octet-stream"]
    assert parts[0].data == b'{"a": 1}' and parts[0].name is None
    assert parts[1].data == payload and parts[1].name == "input"


def test_by_name_and_empty_parts() -> None:
    parts = multipart.split(
        CT, body(("text/plain", b"", "a"), ("application/octet-stream", b"x", "b")), "mixed"
    )
    named = multipart.by_name(parts)
    assert named["a"].data == b"" and named["b"].data == b"x"


@pytest.mark.parametrize(
    ("content_type", "data", "message"),
    [
        ("application/json", b"{}", "expected multipart/mixed"),
        ("multipart/mixed", b"", "no valid boundary"),
        ("multipart/form-data; boundary=XyZ", b"", "expected multipart/mixed"),
        (CT, body(("text/plain", b"abc", None), close=False), "ends before its closing boundary"),
        (CT, b"garbage", "malformed multipart body"),
        (CT, b"--XyZ\r\nno colon here\r\n\r\nx\r\n--XyZ--\r\n", "malformed multipart body"),
        (CT, body(*[("text/plain", b"x", None)] * (multipart.MAX_PARTS + 1)), "more than"),
    ],
)
def test_bad_bodies_raise_one_clear_error(content_type: str, data: bytes, message: str) -> None:
    with pytest.raises(multipart.MultipartError, match=message):
        multipart.split(content_type, data, "mixed")


def test_by_name_refuses_missing_and_repeated_names() -> None:
    with pytest.raises(multipart.MultipartError, match="no Content-Disposition name"):
        multipart.by_name(multipart.split(CT, body(("text/plain", b"x", None)), "mixed"))
    twice = body(("text/plain", b"x", "a"), ("text/plain", b"y", "a"))
    with pytest.raises(multipart.MultipartError, match="appears twice"):
        multipart.by_name(multipart.split(CT, twice, "mixed"))
