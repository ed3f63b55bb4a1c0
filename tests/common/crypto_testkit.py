"""Helpers shared by the crypto tests: walk an envelope's frames so tests can cut and splice them."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vfed.common.crypto import read_header

FRAME_HEAD = struct.Struct(">QBI")
TAG = 16
SIG = 64


@dataclass
class Layout:
    header: bytes
    frames: list[bytes]
    trailer: bytes

    def join(self) -> bytes:
        return self.header + b"".join(self.frames) + self.trailer

    def frame_offset(self, n: int) -> int:
        return len(self.header) + sum(len(f) for f in self.frames[:n])


def layout(blob: bytes) -> Layout:
    """Split a valid envelope into header, frames (head + ciphertext + tag) and signature trailer."""
    size = read_header(blob).size
    pos, frames = size, []
    while True:
        _, flags, length = FRAME_HEAD.unpack_from(blob, pos)
        end = pos + FRAME_HEAD.size + length + TAG
        frames.append(blob[pos:end])
        pos = end
        if flags & 1:
            break
    assert len(blob) - pos == SIG
    return Layout(blob[:size], frames, blob[pos:])


def flip(blob: bytes, offset: int) -> bytes:
    return blob[:offset] + bytes([blob[offset] ^ 0x01]) + blob[offset + 1 :]
