"""Multipart bodies held in memory, split with python-multipart's parser (strict, ~30 us for a small body).

Used where a small JSON document and a small binary body travel together in one round trip (a run claim
with its sealed input, a task with its input): the binary part stays binary, never base64 inside JSON.
aiohttp's streaming reader is the tool for large bodies; for a few KiB its per-part `email` header parsing
costs more than the rest of the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

MAX_PARTS = 16


class MultipartError(ValueError):
    """The body is not the multipart document its Content-Type announces; the message says what is wrong."""


@dataclass
class Part:
    """One part: its headers (lower-case names) and its bytes."""

    headers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "text/plain").split(";", 1)[0].strip().lower()

    @property
    def name(self) -> str | None:
        """The `name` parameter of its Content-Disposition, if any."""
        disposition = self.headers.get("content-disposition")
        if disposition is None:
            return None
        _, params = parse_options_header(disposition)
        name = params.get(b"name")
        return name.decode("utf-8", "replace") if name is not None else None


def boundary_of(content_type: str, subtype: str) -> bytes:
    """The boundary of a `multipart/<subtype>` Content-Type; MultipartError for anything else."""
    kind, params = parse_options_header(content_type)
    if kind.decode("latin-1").lower() != f"multipart/{subtype}":
        raise MultipartError(f"expected multipart/{subtype}, got {kind.decode('latin-1') or 'nothing'}")
    boundary = params.get(b"boundary")
    if not boundary or len(boundary) > 70:
        raise MultipartError("the Content-Type names no valid boundary")
    return boundary


class _Collector:
    """python-multipart callbacks that gather parts into memory."""

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self.ended = False
        self._field = b""
        self._value = b""
        self._data: list[bytes] = []

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._add("_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_part_data": lambda d, s, e: self._data.append(d[s:e]),
            "on_part_end": self._end_part,
            "on_end": self._end,
        }

    def _add(self, attr: str, piece: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + piece)

    def _begin(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise MultipartError(f"more than {MAX_PARTS} parts")
        self.parts.append(Part())
        self._data = []

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self.parts[-1].headers[name] = self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def _end_part(self) -> None:
        self.parts[-1].data = b"".join(self._data)

    def _end(self) -> None:
        self.ended = True


def split(content_type: str, body: bytes, subtype: str) -> list[Part]:
    """Every part of a complete `multipart/<subtype>` body, in order; MultipartError when malformed."""
    collector = _Collector()
    parser = MultipartParser(boundary_of(content_type, subtype), collector.callbacks())  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise MultipartError(f"malformed multipart body: {exc}") from None
    if not collector.ended:
        raise MultipartError("the multipart body ends before its closing boundary")
    return collector.parts


def by_name(parts: list[Part]) -> dict[str, Part]:
    """Parts keyed by their Content-Disposition name; MultipartError on a missing or repeated name."""
    named: dict[str, Part] = {}
    for part in parts:
        name = part.name
        if name is None:
            raise MultipartError("a part has no Content-Disposition name")
        if name in named:
            raise MultipartError(f"part {name!r} appears twice")
        named[name] = part
    return named


def is_type(content_type: str, subtype: str) -> bool:
    """True for a `multipart/<subtype>` Content-Type (a cheap check before parsing it properly)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == f"multipart/{subtype}"
