"""Zero-copy chunk AEAD: libsodium called through pynacl's own cffi module.

pynacl's public bindings take and return `bytes`, which costs an input slice, a zeroed output buffer
and a copy per chunk; on this hardware that is more than the cipher itself. Calling the same libsodium
functions with pointers into caller buffers removes all three. Output that becomes a `bytes` object is
written in place into an `io.BytesIO` buffer, whose `getvalue()` hands that buffer over without a copy.
"""

from __future__ import annotations

import importlib
import io
from typing import Any

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
    """One content key, one cipher; seals and opens chunks between raw pointers."""

    def __init__(self, cipher: Cipher, key: bytes) -> None:
        enc_name, dec_name = _FUNCTIONS[cipher]
        self._encrypt = getattr(lib, enc_name)
        self._decrypt = getattr(lib, dec_name)
        self._key = key
        self._len = ffi.new("unsigned long long *")

    def seal(self, out: Any, src: Any, length: int, aad: bytes, nonce: bytes) -> None:
        """Write ciphertext || tag (length + 16 bytes) at `out`."""
        rc = self._encrypt(out, self._len, src, length, aad, len(aad), ffi.NULL, nonce, self._key)
        if rc != 0:  # libsodium only fails here on absurd lengths
            raise OverflowError("chunk encryption failed")

    def open(self, out: Any, src: Any, sealed_length: int, aad: bytes, nonce: bytes) -> bool:
        """Write the plaintext (sealed_length - 16 bytes) at `out`; False if authentication fails."""
        if sealed_length < TAG_BYTES:
            return False
        rc = self._decrypt(out, self._len, ffi.NULL, src, sealed_length, aad, len(aad), nonce, self._key)
        return bool(rc == 0)


class OutputBytes:
    """A new `bytes` of a known size, filled in place: no zeroed temporary, no final copy."""

    def __init__(self, size: int) -> None:
        self._bio = io.BytesIO()
        if size:
            self._bio.seek(size - 1)
            self._bio.write(b"\x00")
        self.view = self._bio.getbuffer()
        self.ptr = pointer(self.view) if size else ffi.NULL

    def done(self) -> bytes:
        if self.ptr != ffi.NULL:
            release(self.ptr)
        self.view.release()
        return self._bio.getvalue()
