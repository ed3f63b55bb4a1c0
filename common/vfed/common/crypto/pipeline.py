"""File-object encryption and decryption with a few chunks in flight on the thread pool.

The calling thread reads, writes and hashes frames in order while pool threads seal or open the
chunks ahead of it, so file I/O and the cipher overlap. Buffers are a fixed ring of slots reused
round-robin: memory stays at a few chunks whatever the file size.
"""

from __future__ import annotations

from typing import BinaryIO

from .aead import pointer, release
from .engine import Decryptor, Encryptor
from .format import FRAME_HEAD, FRAME_HEAD_BYTES, TAG_BYTES
from .parallel import Window


def read_full(src: BinaryIO, buf: bytearray, size: int | None = None) -> int:
    """Fill buf[:size] unless the source ends first (pipes and sockets return short reads)."""
    want = len(buf) if size is None else size
    readinto = getattr(src, "readinto", None)
    got = 0
    with memoryview(buf) as view:
        while got < want:
            if readinto is not None:
                count = readinto(view[got:want])
            else:
                piece = src.read(want - got)
                view[got : got + len(piece)] = piece
                count = len(piece)
            if not count:
                break
            got += count
    return int(got)


def read_exact(src: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes, fewer only at the end of the source (a pipe may return less per read)."""
    piece = src.read(size)
    if len(piece) == size or not piece:
        return bytes(piece)
    parts = [piece]
    got = len(piece)
    while got < size and (more := src.read(size - got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class _Slots:
    """`count` pairs of (input, output) buffers with their pointers and a writable view of each output."""

    def __init__(self, count: int, in_size: int, out_size: int) -> None:
        self.ins = [bytearray(in_size) for _ in range(count)]
        self.outs = [bytearray(out_size) for _ in range(count)]
        self.in_ptrs = [pointer(b) for b in self.ins]
        self.out_ptrs = [pointer(b) for b in self.outs]
        self.out_views = [memoryview(b) for b in self.outs]

    def release(self) -> None:
        for view in self.out_views:
            view.release()
        for ptr in (*self.in_ptrs, *self.out_ptrs):
            release(ptr)


def encrypt_pipelined(src: BinaryIO, dst: BinaryIO, enc: Encryptor, chunk_size: int, threads: int) -> int:
    """Body of encrypt_fileobj for threads > 1: same bytes as the one-thread loop."""
    window = Window(threads)
    ring = threads + 2  # in flight, plus the chunk held for the look-ahead, plus the look-ahead
    slots = _Slots(ring, chunk_size, FRAME_HEAD_BYTES + chunk_size + TAG_BYTES)
    written = dst.write(enc.header)
    try:
        number, size = 0, read_full(src, slots.ins[0])
        while True:
            ahead = read_full(src, slots.ins[(number + 1) % ring]) if size == chunk_size else 0
            if window.full:
                written += _write_frame(dst, enc, slots, window)
            _submit_seal(window, enc, slots, number % ring, number, size, final=ahead == 0)
            if ahead == 0:
                break
            number, size = number + 1, ahead
        while len(window):
            written += _write_frame(dst, enc, slots, window)
    finally:
        window.close()
        slots.release()
    return written + dst.write(enc.signature())


def _submit_seal(
    window: Window, enc: Encryptor, slots: _Slots, slot: int, number: int, size: int, final: bool
) -> None:
    out_ptr, in_ptr = slots.out_ptrs[slot], slots.in_ptrs[slot]

    def job() -> bool:
        enc.seal_frame(out_ptr, in_ptr, number, size, final)
        return final

    window.submit(slot, job)


def _write_frame(dst: BinaryIO, enc: Encryptor, slots: _Slots, window: Window) -> int:
    """Take the oldest sealed frame: hash it in order, write it out."""
    slot, final = window.pop()
    view = slots.out_views[slot]
    head = bytes(view[:FRAME_HEAD_BYTES])
    end = FRAME_HEAD_BYTES + FRAME_HEAD.unpack(head)[2] + TAG_BYTES
    with view[FRAME_HEAD_BYTES:end] as sealed:
        enc.add_frame(head, sealed, final)
    return int(dst.write(view[:end]))


def decrypt_pipelined(src: BinaryIO, dst: BinaryIO, dec: Decryptor, threads: int) -> bytes:
    """Frames of decrypt_fileobj for threads > 1; returns the final chunk's plaintext, unwritten.

    Errors come in the order the one-thread loop raises them: before a read problem in frame i is
    raised, every frame before i is opened (and raises first if it fails authentication).
    """
    assert dec.header is not None
    chunk_size = dec.header.chunk_size
    window = Window(threads)
    slots = _Slots(threads, chunk_size + TAG_BYTES, chunk_size)
    heads: list[bytes] = [b""] * threads
    try:
        number = 0
        while True:
            if window.full:
                _write_plain(dst, dec, slots, window, heads)
            slot = number % threads
            try:
                heads[slot] = _read_frame(src, dec, slots.ins[slot], number)
            except Exception:
                while len(window):  # an earlier frame's error comes first, as with one thread
                    _write_plain(dst, dec, slots, window, heads)
                raise
            _submit_open(window, dec, slots, slot, number, heads[slot])
            final = bool(FRAME_HEAD.unpack(heads[slot])[1])
            if final:
                break
            number += 1
        last = b""
        while len(window):
            last = _write_plain(dst, dec, slots, window, heads)
        return last
    finally:
        window.close()
        slots.release()


def _read_frame(src: BinaryIO, dec: Decryptor, body: bytearray, number: int) -> bytes:
    """Read and check frame `number`'s head, read its body into `body`; returns the head."""
    head = read_exact(src, FRAME_HEAD_BYTES)
    if len(head) < FRAME_HEAD_BYTES:
        raise dec.truncated("frame_head", len(head), number)
    _, length = dec.check_frame_head(head, number)
    if read_full(src, body, length + TAG_BYTES) < length + TAG_BYTES:
        raise dec.truncated("frame_body", 1, number)
    return head


def _submit_open(window: Window, dec: Decryptor, slots: _Slots, slot: int, number: int, head: bytes) -> None:
    out_ptr, body_ptr = slots.out_ptrs[slot], slots.in_ptrs[slot]

    def job() -> bool:
        return dec.open_frame(out_ptr, body_ptr, number, head)

    window.submit(slot, job)


def _write_plain(dst: BinaryIO, dec: Decryptor, slots: _Slots, window: Window, heads: list[bytes]) -> bytes:
    """Take the oldest opened frame: raise if it failed, hash it in order, write its plaintext unless
    it is the final chunk (returned instead, to be written after the signature verified)."""
    slot, ok = window.pop()
    head = heads[slot]
    index, flags, length = FRAME_HEAD.unpack(head)
    if not ok:
        raise dec.tampered(index)
    with memoryview(slots.ins[slot])[: length + TAG_BYTES] as sealed:
        dec.hash_frame(head, sealed)
    plain = slots.out_views[slot][:length]
    if flags:
        return bytes(plain)
    dst.write(plain)
    return b""
