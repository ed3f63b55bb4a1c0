"""Zero-copy chunk AEAD: libsodium called through pynacl's own cffi module.

pynacl's public bindings take and return `bytes`, which costs an input slice, a zeroed output buffer
and a copy per chunk; on this hardware that is more than the cipher itself. Calling the same libsodium
functions with pointers into caller buffers removes all three. Output that becomes a `bytes` object is
written in place: small ones into an `io.BytesIO` buffer, whose `getvalue()` hands that buffer over
without a copy; large ones into a new, not yet faulted-in `bytes` (see FreshBytes).
"""

from __future__ import annotations

import importlib
import io
from typing import Any

from . import populate
from .format import Cipher

_sodium = importlib.import_module("nacl._sodium")
ffi: Any = _sodium.ffi
lib: Any = _sodium.lib
TAG_BYTES = 16

_FUNCTIONS = {
    Cipher.AES256GCM: ("crypto_aead_aes256gcm_encrypt", "crypto_aead_aes256gcm_decrypt"),
    Cipher.XCHACHA20POLY1305: (
        "crypto_aead_xchacha20poly1305_ietf_encrypt",
        "crypto_aead_xchacha20poly1305_ietf_decrypt",
    ),
}


def pointer(buffer: Any) -> Any:
    """A `unsigned char *` into any buffer-protocol object (bytes, bytearray, memoryview)."""
    return ffi.from_buffer("unsigned char[]", buffer)


def release(ptr: Any) -> None:
    ffi.release(ptr)


class ChunkCipher:
    """One content key, one cipher; seals and opens chunks between raw pointers.

    Stateless between calls (the length out-pointers are NULL), so threads may share one instance.
    """

    def __init__(self, cipher: Cipher, key: bytes) -> None:
        enc_name, dec_name = _FUNCTIONS[cipher]
        self._encrypt = getattr(lib, enc_name)
        self._decrypt = getattr(lib, dec_name)
        self._key = key

    def seal(self, out: Any, src: Any, length: int, aad: bytes, nonce: bytes) -> None:
        """Write ciphertext || tag (length + 16 bytes) at `out`."""
        rc = self._encrypt(out, ffi.NULL, src, length, aad, len(aad), ffi.NULL, nonce, self._key)
        if rc != 0:  # libsodium only fails here on absurd lengths
            raise OverflowError("chunk encryption failed")

    def open(self, out: Any, src: Any, sealed_length: int, aad: bytes, nonce: bytes) -> bool:
        """Write the plaintext (sealed_length - 16 bytes) at `out`; False if authentication fails."""
        if sealed_length < TAG_BYTES:
            return False
        rc = self._decrypt(out, ffi.NULL, ffi.NULL, src, sealed_length, aad, len(aad), nonce, self._key)
        return bool(rc == 0)


# Below this a `bytes(n)` might come from CPython's caches; above it, it is always a new object.
FRESH_BYTES_MIN = 64 << 10


def new_output(size: int) -> OutputBytes | FreshBytes:
    """The output buffer for `size` bytes: large ones are left untouched until the writers fault them in."""
    return FreshBytes(size) if size >= FRESH_BYTES_MIN else OutputBytes(size)


class FreshBytes:
    """A new large `bytes` filled in place through a pointer before anyone else can see it.

    `bytes(n)` is calloc'd, so its pages are faulted in by whichever (worker) thread writes them first
    rather than zero-filled up front on the calling thread; a writer calls `prefault` for its range
    first, so the kernel maps those pages in one call instead of one fault per page (populate.py).
    `done()` hands it out, after which it is never written again. Only for sizes of at least
    FRESH_BYTES_MIN (never a shared small object).
    """

    def __init__(self, size: int) -> None:
        if size < FRESH_BYTES_MIN:
            raise ValueError(f"FreshBytes is for {FRESH_BYTES_MIN} bytes or more, not {size}")
        self._obj: bytes | None = bytes(size)
        self.ptr = pointer(self._obj)
        address = int(ffi.cast("uintptr_t", self.ptr))
        self._address = address if populate.active() and populate.fresh(address, size) else None

    def prefault(self, offset: int, length: int) -> None:
        """Called by the thread about to write bytes [offset, offset + length): map their pages now."""
        if self._address is not None:
            populate.populate(self._address + offset, length)

    def done(self) -> bytes:
        obj, self._obj = self._obj, None
        if obj is None:
            raise ValueError("output already handed out")
        release(self.ptr)
        return obj


class OutputBytes:
    """A new `bytes` of a known size, filled in place: no zeroed temporary, no final copy."""

    def __init__(self, size: int) -> None:
        self._bio = io.BytesIO()
        if size:
            self._bio.seek(size - 1)
            self._bio.write(b"\x00")
        self.view = self._bio.getbuffer()
        self.ptr = pointer(self.view) if size else ffi.NULL

    def prefault(self, offset: int, length: int) -> None:
        """Nothing to do: growing the buffer above already wrote (and faulted in) every page."""

    def done(self) -> bytes:
        if self.ptr != ffi.NULL:
            release(self.ptr)
        self.view.release()
        return self._bio.getvalue()
