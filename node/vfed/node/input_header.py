"""What the node's checks need of a big run input, read from its file without loading it.

A run's input is TaskInput JSON (`{"method": ..., "args": [...], "kwargs": {...}}`). The budget and lease
checks need only the method and the keyword argument that carries epsilon; the big arguments are for the
container. This reads the top-level object and `kwargs` one entry at a time, skipping every other value by
its brackets and strings (regex jumps over a 1 MiB buffer, nothing kept), so memory stays bounded whatever
the size. A kwargs value over SMALL_VALUE_BYTES (or past LOADED_BYTES in all) is not loaded: it becomes
`LargeValue`, which no check takes for a number. `args` is checked to be a list and left unread.

The top level is held to TaskInput's rules (no other keys; the last of duplicate keys wins, as in Python's
json and pydantic); the loaded values are parsed by `json.loads` from their exact bytes. What is skipped is
checked for balanced brackets and closed strings only: a document malformed inside a skipped value is the
container's to refuse (the SDK parses the whole input), and no check reads a value from there.
"""

from __future__ import annotations

import json
import re
from typing import Any, BinaryIO

from vfed.common.payload import TaskInput

CHUNK_BYTES = 1 << 20
SMALL_VALUE_BYTES = 64 << 10
LOADED_BYTES = 1 << 20
_NON_WS = re.compile(rb"[^ \t\r\n]")
_STRING_SPECIAL = re.compile(rb'["\\]')
_STRUCTURE = re.compile(rb'["\[\]{}]')
_SCALAR_END = re.compile(rb"[,\]} \t\r\n]")
_CLOSING = {ord("["): ord("]"), ord("{"): ord("}")}


class InputFormatError(ValueError):
    """The input is not a TaskInput document (one line that quotes none of its content)."""


class LargeValue:
    """A keyword argument too big to load for the checks (it stays in the file for the container)."""

    def __repr__(self) -> str:
        return "LargeValue()"


def read_header(fh: BinaryIO) -> TaskInput:
    """The TaskInput with its method and small keyword arguments; `args` empty (not read)."""
    reader = _Reader(fh)
    fields: dict[str, Any] = {}
    reader.expect(b"{")
    if not reader.close_if(b"}"):
        while True:
            key = reader.key()
            if key == "method":
                fields["method"] = reader.small_value(SMALL_VALUE_BYTES)
            elif key == "kwargs":
                fields["kwargs"] = _kwargs(reader)
            elif key == "args":
                if reader.peek() != ord("["):
                    raise InputFormatError("args is not a list")
                reader.skip_value()
            else:
                raise InputFormatError("the input has a field TaskInput does not know")
            if reader.close_if(b"}"):
                break
            reader.expect(b",")
    if reader.peek() is not None:
        raise InputFormatError("bytes after the input's JSON object")
    if not isinstance(fields.get("kwargs", {}), dict):
        raise InputFormatError("kwargs is not an object")
    return TaskInput.model_validate({"args": [], **fields})


def _kwargs(reader: _Reader) -> dict[str, Any] | None:
    if reader.peek() != ord("{"):
        reader.skip_value()
        return None  # not an object: read_header refuses it
    reader.expect(b"{")
    found: dict[str, Any] = {}
    loaded = 0
    if reader.close_if(b"}"):
        return found
    while True:
        key = reader.key()
        limit = min(SMALL_VALUE_BYTES, LOADED_BYTES - loaded)
        raw = reader.raw_value(limit)
        if raw is None:
            found[key] = LargeValue()
        else:
            found[key] = _loads(raw)
            loaded += len(raw)
        if reader.close_if(b"}"):
            return found
        reader.expect(b",")


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise InputFormatError("the input is not valid JSON") from None


class _Reader:
    """A byte cursor over the file that refills its buffer as it goes; `raw_value` keeps the bytes of one
    value while skipping it (up to a limit)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.buf = b""
        self.pos = 0
        self.kept: bytearray | None = None  # the value being captured, None when not capturing
        self.kept_from = 0
        self.keep_limit = 0

    def _fill(self) -> bool:
        """More bytes after `pos` (the consumed ones go, after being kept if capturing)."""
        self._keep_consumed()
        more = self.fh.read(CHUNK_BYTES)
        if not more:
            return False
        self.buf = self.buf[self.pos :] + more
        self.pos = 0
        self.kept_from = 0
        return True

    def _keep_consumed(self) -> None:
        if self.kept is not None:
            if len(self.kept) + self.pos - self.kept_from <= self.keep_limit:
                self.kept += self.buf[self.kept_from : self.pos]
            else:
                self.keep_limit = -1  # over the limit: stop keeping (and say so at the end)
            self.kept_from = self.pos

    def _search(self, pattern: re.Pattern[bytes]) -> re.Match[bytes]:
        while (m := pattern.search(self.buf, self.pos)) is None:
            self.pos = len(self.buf)
            if not self._fill():
                raise InputFormatError("the input ends in the middle of its JSON")
        return m

    def peek(self) -> int | None:
        """The next byte that is not white space (None at the end)."""
        while (m := _NON_WS.search(self.buf, self.pos)) is None:
            self.pos = len(self.buf)
            if not self._fill():
                return None
        self.pos = m.start()
        return self.buf[self.pos]

    def expect(self, char: bytes) -> None:
        if self.peek() != char[0]:
            raise InputFormatError(f"the input's JSON lacks a {char.decode()!r} where one belongs")
        self.pos += 1

    def close_if(self, char: bytes) -> bool:
        if self.peek() == char[0]:
            self.pos += 1
            return True
        return False

    def key(self) -> str:
        if self.peek() != ord('"'):
            raise InputFormatError("an object key is not a string")
        key = self.small_value(SMALL_VALUE_BYTES)
        self.expect(b":")
        return str(key)

    def small_value(self, limit: int) -> Any:
        raw = self.raw_value(limit)
        if raw is None:
            raise InputFormatError("a field of the input is too long")
        return _loads(raw)

    def raw_value(self, limit: int) -> bytes | None:
        """The next value's bytes, or None when it is longer than `limit` (then skipped)."""
        self.peek()
        self.kept, self.kept_from, self.keep_limit = bytearray(), self.pos, limit
        try:
            self.skip_value()
            self._keep_consumed()
            return None if self.keep_limit < 0 else bytes(self.kept)
        finally:
            self.kept = None

    def skip_value(self) -> None:
        first = self.peek()
        if first is None:
            raise InputFormatError("the input ends where a value belongs")
        if first == ord('"'):
            self._skip_string()
        elif first in _CLOSING:
            self._skip_container()
        else:
            self.pos = self._search(_SCALAR_END).start()

    def _skip_string(self) -> None:
        self.pos += 1  # the opening quote
        while True:
            m = self._search(_STRING_SPECIAL)
            self.pos = m.end()
            if m.group() == b'"':
                return
            if self.pos >= len(self.buf) and not self._fill():  # a backslash: skip what it escapes
                raise InputFormatError("the input ends in the middle of a string")
            self.pos += 1

    def _skip_container(self) -> None:
        closing = [_CLOSING[self.buf[self.pos]]]
        self.pos += 1
        while closing:
            m = self._search(_STRUCTURE)
            self.pos = m.start()
            char = self.buf[self.pos]
            if char == ord('"'):
                self._skip_string()
                continue
            self.pos += 1
            if char in _CLOSING:
                closing.append(_CLOSING[char])
            elif char != closing.pop():
                raise InputFormatError("the input's JSON brackets do not match")
