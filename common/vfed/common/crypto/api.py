"""Envelope helpers over bytes, async iterators, binary file objects and paths.

All of them drive `Encryptor`/`Decryptor`, so memory stays within a few chunks except for the
bytes-in/bytes-out helpers, which hold the whole payload by design.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

from .engine import Decryptor, Encryptor, SenderLookup
from .errors import CryptoError, TrailingData
from .format import DEFAULT_CHUNK_SIZE, Cipher, Header
from .keyring import Keyring
from .keys import OrgKey, PublicKey

ByteSource = AsyncIterable[bytes] | Iterable[bytes]
_READ_BYTES = 1 << 20


def encrypt_bytes(
    data: bytes,
    sender: OrgKey,
    recipients: Sequence[PublicKey],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    cipher: Cipher | None = None,
    commit: bool | None = None,
) -> bytes:
    """Encrypt once, seal the content key per recipient, sign; returns the whole envelope."""
    enc = Encryptor(sender, recipients, chunk_size=chunk_size, cipher=cipher, commit=commit)
    return b"".join(enc.feed(bytes(data)) + enc.finish())


def decrypt_bytes(blob: bytes, keyring: Keyring, sender: SenderLookup) -> bytes:
    """Decrypt and verify the signature before returning anything."""
    dec = Decryptor(keyring, sender)
    plain = dec.feed(bytes(blob))
    dec.finish()
    return b"".join(plain)


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
) -> AsyncIterator[bytes]:
    """Yield envelope pieces as plaintext pieces of any size arrive (header first, trailer last)."""
    enc = Encryptor(sender, recipients, chunk_size=chunk_size, cipher=cipher, commit=commit)
    async for piece in _aiter(source):
        for out in enc.feed(piece):
            yield out
    for out in enc.finish():
        yield out


async def decrypt_stream(source: ByteSource, keyring: Keyring, sender: SenderLookup) -> AsyncIterator[bytes]:
    """Yield plaintext of each AEAD-authenticated chunk; the signature is checked at the end.

    Plaintext yielded before the end is authentic to whoever holds the content key (the sender or a
    co-recipient) but not yet to the sender's signature: when this raises, discard what was yielded.
    """
    dec = Decryptor(keyring, sender)
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
) -> int:
    """Stream a binary file object into an envelope; returns envelope bytes written."""
    enc = Encryptor(sender, recipients, chunk_size=chunk_size, cipher=cipher, commit=commit)
    written = 0
    while piece := src.read(max(chunk_size, _READ_BYTES)):
        for out in enc.feed(piece):
            written += dst.write(out)
    for out in enc.finish():
        written += dst.write(out)
    return written


def decrypt_fileobj(src: BinaryIO, dst: BinaryIO, keyring: Keyring, sender: SenderLookup) -> Header:
    """Stream an envelope into `dst`; raises at the end if the signature fails (see decrypt_stream)."""
    dec = Decryptor(keyring, sender)
    while not dec.verified:
        piece = src.read(dec.wants)
        if not piece:
            break
        for out in dec.feed(piece):
            dst.write(out)
    dec.finish()
    extra = src.read(1)
    if extra:
        raise TrailingData("unexpected bytes after the signature trailer")
    assert dec.header is not None
    return dec.header


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
) -> int:
    """Encrypt a file into a new file (written beside it, renamed into place when complete)."""
    dst = Path(dst_path)
    fd, tmp = _atomic_output(dst)
    try:
        with open(src_path, "rb") as src, os.fdopen(fd, "wb") as out:
            written = encrypt_fileobj(
                src, out, sender, recipients, chunk_size=chunk_size, cipher=cipher, commit=commit
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
) -> Header:
    """Decrypt into `dst_path` only after the signature verified; on any error `dst_path` is untouched.

    The plaintext is written to a private (0600) temporary file beside `dst_path` and renamed at the end.
    """
    dst = Path(dst_path)
    fd, tmp = _atomic_output(dst)
    try:
        with open(src_path, "rb") as src, os.fdopen(fd, "wb") as out:
            header = decrypt_fileobj(src, out, keyring, sender)
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
