"""Helpers shared by the crypto tests: walk an envelope's frames so tests can cut and splice them."""

from __future__ import annotations

import copy
import struct
from dataclasses import dataclass

from vfed.common.crypto import Encryptor, read_header
from vfed.common.crypto.format import FramesHash

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


def twin(enc: Encryptor) -> Encryptor:
    """A second fresh encryptor with the same content key and header as `enc` (a test hook).

    Sealing the same plaintext with both must give identical bytes, whatever path or thread count
    each one takes. Never do this outside tests: two different plaintexts would reuse the nonces.
    """
    if enc._index or enc._header_sent:
        raise ValueError("twin needs a fresh encryptor")
    other = copy.copy(enc)
    # the mutable state must not be shared; everything else (key, cipher, header) must be
    other._tags = FramesHash(enc._tags.committed)
    other._buffer = type(enc._buffer)()
    return other
