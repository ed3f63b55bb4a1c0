"""Envelope helpers over bytes, async iterators, binary file objects and paths.

All of them drive `Encryptor`/`Decryptor`, so memory stays within a few chunks except for the
bytes-in/bytes-out helpers, which hold the whole payload by design.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .aead import new_output, pointer, release
from .engine import Decryptor, Encryptor, SenderLookup
from .errors import CryptoError, TrailingData
from .format import (
    DEFAULT_CHUNK_SIZE,
    FLAG_FINAL,
    FRAME_HEAD,
    FRAME_HEAD_BYTES,
    SIGNATURE_BYTES,
    TAG_BYTES,
    Cipher,
    Header,
    read_header,
)
from .keyring import Keyring
from .keys import OrgKey, PublicKey
from .parallel import Window, plan_threads, run_chunks
from .pipeline import decrypt_pipelined, encrypt_pipelined, read_exact, read_full

ByteSource = AsyncIterable[bytes] | Iterable[bytes]


def encrypt_bytes(
    data: bytes,
    sender: OrgKey,
    recipients: Sequence[PublicKey],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    cipher: Cipher | None = None,
    commit: bool | None = None,
    threads: int | None = None,
    context: bytes | None = None,
) -> bytes:
    """Encrypt once, seal the content key per recipient, sign; returns the whole envelope.

    Chunks are sealed on `threads` threads (default: VFED_CRYPTO_THREADS, else min(4, CPUs), for
    chunks of 64 KiB or more); the envelope is the same for any thread count. `context` (e.g. a run
    or task id) binds the envelope to it: decryption must name the same context.
    """
    enc = Encryptor(sender, recipients, chunk_size=chunk_size, cipher=cipher, commit=commit, context=context)
    return enc.seal_all(data, threads=threads)


def decrypt_bytes(
    blob: bytes,
    keyring: Keyring,
    sender: SenderLookup,
    *,
    threads: int | None = None,
    context: bytes | None = None,
) -> bytes:
    """Decrypt and verify the signature before returning anything.

    Chunks are opened on `threads` threads (default: VFED_CRYPTO_THREADS, else min(4, CPUs), for
    chunks of 64 KiB or more); errors name the lowest failing chunk, as with one thread. `context`
    must name the context the envelope is bound to, None if it is unbound (else ContextMismatch).
    """
    blob = bytes(blob)
    frames = _well_formed_frames(blob)
    dec = Decryptor(keyring, sender, context=context)
    if frames is None:  # the streaming path raises the precise error, in stream order
        plain = dec.feed(blob)
        dec.finish()
        return b"".join(plain)
    return _decrypt_frames(blob, frames, dec, threads)


def _well_formed_frames(blob: bytes) -> list[tuple[int, int]] | None:
    """(offset, length) of every frame when the envelope's framing is intact, else None."""
    try:
        header = read_header(blob)
    except CryptoError:
        return None
    frames, pos, index = [], header.size, 0
    while pos + FRAME_HEAD_BYTES <= len(blob):
        got_index, flags, length = FRAME_HEAD.unpack_from(blob, pos)
        final = flags == FLAG_FINAL
        if got_index != index or flags & ~FLAG_FINAL or length > header.chunk_size:
            return None
        if not final and length != header.chunk_size:
            return None
        frames.append((pos, length))
        pos += FRAME_HEAD_BYTES + length + TAG_BYTES
        index += 1
        if final:
            return frames if pos + SIGNATURE_BYTES == len(blob) else None
    return None


def _decrypt_frames(blob: bytes, frames: list[tuple[int, int]], dec: Decryptor, threads: int | None) -> bytes:
    """Decrypt straight into one output buffer; returned only after the signature verified.

    The hash the signature covers reads only the ciphertext: for a committed envelope (SHA-256 over
    every frame byte, as costly as the cipher) it runs on the pool beside the chunks.
    """
    dec.start(blob[: frames[0][0]])
    assert dec.header is not None
    workers = plan_threads(threads, len(frames), dec.header.chunk_size)
    plain_at = list(itertools.accumulate((length for _, length in frames), initial=0))
    out = new_output(plain_at[-1])
    src_ptr = pointer(blob)
    side = Window(1)
    try:

        def work(number: int) -> bool:
            offset = frames[number][0]
            head = blob[offset : offset + FRAME_HEAD_BYTES]
            body_ptr = src_ptr + offset + FRAME_HEAD_BYTES
            out.prefault(plain_at[number], frames[number][1])
            return dec.open_frame(out.ptr + plain_at[number], body_ptr, number, head)

        if workers > 1 and dec.header.committed:
            side.submit(0, lambda: _hash_frames(dec, blob, frames))
        failed = run_chunks(len(frames), work, workers)
        if failed is not None:
            raise dec.tampered(failed)
        if not (len(side) and side.pop()[1]):
            _hash_frames(dec, blob, frames)
        dec.verify(blob[-SIGNATURE_BYTES:])
    finally:
        side.close()
        release(src_ptr)
        plain = out.done()
    return plain


def _hash_frames(dec: Decryptor, blob: bytes, frames: list[tuple[int, int]]) -> bool:
    with memoryview(blob) as view:
        for offset, length in frames:
            body = offset + FRAME_HEAD_BYTES
            dec.hash_frame(blob[offset:body], view[body : body + length + TAG_BYTES])
    return True


async def _aiter(source: ByteSource) -> AsyncIterator[bytes]:
    if isinstance(source, AsyncIterable):
        async for piece in source:
            yield piece
    else:
        for piece in source:
            yield piece


async def encrypt_stream(
    source: ByteSource,
    sender: OrgKey,
    recipients: Sequence[PublicKey],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    cipher: Cipher | None = None,
    commit: bool | None = None,
    context: bytes | None = None,
) -> AsyncIterator[bytes]:
    """Yield envelope pieces as plaintext pieces of any size arrive (header first, trailer last)."""
    enc = Encryptor(sender, recipients, chunk_size=chunk_size, cipher=cipher, commit=commit, context=context)
    async for piece in _aiter(source):
        for out in enc.feed(piece):
            yield out
    for out in enc.finish():
        yield out


async def decrypt_stream(
    source: ByteSource, keyring: Keyring, sender: SenderLookup, *, context: bytes | None = None
) -> AsyncIterator[bytes]:
    """Yield plaintext of each AEAD-authenticated chunk; the signature is checked at the end.

    Plaintext yielded before the end is authentic to whoever holds the content key (the sender or a
    co-recipient) but not yet to the sender's signature: when this raises, discard what was yielded.
    A context mismatch (see decrypt_bytes) raises before any plaintext is yielded.
    """
    dec = Decryptor(keyring, sender, context=context)
    async for piece in _aiter(source):
        for out in dec.feed(piece):
            yield out
    dec.finish()


def encrypt_fileobj(
    src: BinaryIO,
    dst: BinaryIO,
    sender: OrgKey,
    recipients: Sequence[PublicKey],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    cipher: Cipher | None = None,
    commit: bool | None = None,
    threads: int | None = None,
    context: bytes | None = None,
) -> int:
    """Stream a binary file object into an envelope; returns envelope bytes written.

    With more than one thread (see encrypt_bytes) a few chunks are sealed on the pool while this
    thread reads and writes (pipeline.py); with one, three reusable buffers (two plaintext chunks for
    the look-ahead that finds the final chunk, one frame) and no per-chunk allocation.
    """
    enc = Encryptor(sender, recipients, chunk_size=chunk_size, cipher=cipher, commit=commit, context=context)
    workers = plan_threads(threads, _UNKNOWN_CHUNKS, chunk_size)
    if workers > 1:
        return encrypt_pipelined(src, dst, enc, chunk_size, workers)
    written = dst.write(enc.header)
    plain = [bytearray(chunk_size), bytearray(chunk_size)]
    plain_ptrs = [pointer(b) for b in plain]
    frame = bytearray(FRAME_HEAD_BYTES + chunk_size + TAG_BYTES)
    frame_ptr = pointer(frame)
    try:
        with memoryview(frame) as frame_view:
            size = read_full(src, plain[0])
            while True:
                ahead = read_full(src, plain[1]) if size == chunk_size else 0
                final = ahead == 0
                end = enc.seal_into(frame_view, frame_ptr, plain_ptrs[0], size, final)
                written += dst.write(frame_view[:end])
                if final:
                    break
                plain.reverse()
                plain_ptrs.reverse()
                size = ahead
    finally:
        for ptr in (*plain_ptrs, frame_ptr):
            release(ptr)
    written += dst.write(enc.signature())
    return written


_UNKNOWN_CHUNKS = 1 << 62  # a stream's length is not known up front


def decrypt_fileobj(
    src: BinaryIO,
    dst: BinaryIO,
    keyring: Keyring,
    sender: SenderLookup,
    *,
    threads: int | None = None,
    context: bytes | None = None,
) -> Header:
    """Stream an envelope into `dst`; raises at the end if the signature fails (see decrypt_stream).

    Frames are read whole into reusable buffers (with several threads, a few are opened on the pool
    while this thread reads and writes); the final chunk is written only after the signature verified.
    A context mismatch (see decrypt_bytes) raises before anything is written.
    """
    dec = Decryptor(keyring, sender, context=context)
    while dec.header is None:
        piece = src.read(dec.wants)
        if not piece:
            dec.finish()
        dec.feed(piece)
    chunk_size = dec.header.chunk_size
    workers = plan_threads(threads, _UNKNOWN_CHUNKS, chunk_size)
    if workers > 1:
        last = decrypt_pipelined(src, dst, dec, workers)
        _verify_trailer(src, dec)
        dst.write(last)
    else:
        _decrypt_serially(src, dst, dec, chunk_size)
    if src.read(1):
        raise TrailingData("unexpected bytes after the signature trailer")
    return dec.header


def _verify_trailer(src: BinaryIO, dec: Decryptor) -> None:
    signature = read_exact(src, SIGNATURE_BYTES)
    if len(signature) < SIGNATURE_BYTES:
        raise dec.truncated("trailer", len(signature))
    dec.verify(signature)


def _decrypt_serially(src: BinaryIO, dst: BinaryIO, dec: Decryptor, chunk_size: int) -> None:
    body, plain = bytearray(chunk_size + TAG_BYTES), bytearray(chunk_size)
    plain_ptr = pointer(plain)
    try:
        with memoryview(plain) as plain_view:
            length = _decrypt_frames_from(src, dst, dec, body, plain_view, plain_ptr)
            _verify_trailer(src, dec)
            dst.write(plain_view[:length])
    finally:
        release(plain_ptr)


def _decrypt_frames_from(
    src: BinaryIO, dst: BinaryIO, dec: Decryptor, body: bytearray, plain: memoryview, plain_ptr: Any
) -> int:
    """Decrypt frames up to the final one; returns the final chunk's length, left in `plain`."""
    while True:
        head = read_exact(src, FRAME_HEAD_BYTES)
        if len(head) < FRAME_HEAD_BYTES:
            raise dec.truncated("frame_head", len(head))
        final, length = dec.check_frame_head(head)
        if read_full(src, body, length + TAG_BYTES) < length + TAG_BYTES:
            raise dec.truncated("frame_body", 1)
        dec.open_into(plain_ptr, head, body, 0)
        if final:
            return length
        dst.write(plain[:length])


def _atomic_output(dst_path: Path) -> tuple[int, Path]:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst_path.name}.", suffix=".part", dir=dst_path.parent)
    return fd, Path(tmp)


def encrypt_file(
    src_path: str | os.PathLike[str],
    dst_path: str | os.PathLike[str],
    sender: OrgKey,
    recipients: Sequence[PublicKey],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    cipher: Cipher | None = None,
    commit: bool | None = None,
    threads: int | None = None,
    context: bytes | None = None,
) -> int:
    """Encrypt a file into a new file (written beside it, renamed into place when complete)."""
    dst = Path(dst_path)
    fd, tmp = _atomic_output(dst)
    try:
        with open(src_path, "rb") as src, os.fdopen(fd, "wb") as out:
            written = encrypt_fileobj(
                src,
                out,
                sender,
                recipients,
                chunk_size=chunk_size,
                cipher=cipher,
                commit=commit,
                threads=threads,
                context=context,
            )
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def decrypt_file(
    src_path: str | os.PathLike[str],
    dst_path: str | os.PathLike[str],
    keyring: Keyring,
    sender: SenderLookup,
    *,
    threads: int | None = None,
    context: bytes | None = None,
) -> Header:
    """Decrypt into `dst_path` only after the signature verified; on any error `dst_path` is untouched.

    The plaintext is written to a private (0600) temporary file beside `dst_path` and renamed at the end.
    """
    dst = Path(dst_path)
    fd, tmp = _atomic_output(dst)
    try:
        with open(src_path, "rb") as src, os.fdopen(fd, "wb") as out:
            header = decrypt_fileobj(src, out, keyring, sender, threads=threads, context=context)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return header


__all__ = [
    "CryptoError",
    "decrypt_bytes",
    "decrypt_file",
    "decrypt_fileobj",
    "decrypt_stream",
    "encrypt_bytes",
    "encrypt_file",
    "encrypt_fileobj",
    "encrypt_stream",
]
