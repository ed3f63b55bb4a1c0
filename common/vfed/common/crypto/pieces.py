"""The byte queue behind the push-style Encryptor and Decryptor."""

from __future__ import annotations

from collections import deque


class Pieces:
    """A queue of byte pieces; `take(n)` returns exactly n bytes, copying at most once.

    A read offset into the first piece avoids re-slicing a large input (which would be quadratic).
    """

    def __init__(self) -> None:
        self._parts: deque[bytes] = deque()
        self._offset = 0
        self.size = 0

    def push(self, data: bytes) -> None:
        if data:
            self._parts.append(data)
            self.size += len(data)

    def take(self, n: int) -> bytes:
        if n == 0:
            return b""
        self.size -= n
        first = self._parts[0]
        start = self._offset
        if start == 0 and len(first) == n:
            self._parts.popleft()
            return first
        if len(first) - start >= n:
            self._advance(first, start + n)
            return first[start : start + n]
        out = bytearray()
        while len(out) < n:
            part, start = self._parts[0], self._offset
            stop = min(len(part), start + n - len(out))
            out += memoryview(part)[start:stop]
            self._advance(part, stop)
        return bytes(out)

    def take_ref(self, n: int) -> tuple[bytes, int]:
        """Like `take`, but as (object, offset) so a chunk inside one piece is not copied."""
        first = self._parts[0] if self._parts else b""
        start = self._offset
        if len(first) - start >= n:
            self.size -= n
            self._advance(first, start + n)
            return first, start
        return self.take(n), 0

    def _advance(self, first: bytes, stop: int) -> None:
        if stop == len(first):
            self._parts.popleft()
            self._offset = 0
        else:
            self._offset = stop
