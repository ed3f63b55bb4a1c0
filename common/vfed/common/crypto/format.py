"""Envelope v1 wire format: header, frames and trailer (byte layout in docs/crypto.md)."""

from __future__ import annotations

import hashlib
import hmac
import importlib
import struct
from dataclasses import dataclass, field
from enum import IntEnum

import nacl.bindings as nb

from .errors import (
    ContextMismatch,
    CorruptHeader,
    CryptoError,
    TruncatedPayload,
    UnknownVersion,
    UnsupportedCipher,
)

MAGIC = b"VFED"
VERSION = 1
KEY_ID_BYTES = 16
SEALED_KEY_BYTES = 32 + 48  # crypto_box_seal: ephemeral public key + box(32-byte key) with MAC
RECIPIENT_ENTRY_BYTES = KEY_ID_BYTES + SEALED_KEY_BYTES
# magic, version, cipher, header flags, chunk_size, sender id, recipient count
_FIXED = struct.Struct(">4sBBBI16sH")
HEADER_FIXED_BYTES = _FIXED.size
FRAME_HEAD = struct.Struct(">QBI")  # chunk index, flags, ciphertext length (without tag)
FRAME_HEAD_BYTES = FRAME_HEAD.size
TAG_BYTES = 16
SIGNATURE_BYTES = 64
FLAG_FINAL = 0x01
HEADER_FLAG_COMMITTED = 0x01  # the signature covers a SHA-256 of all frame bytes, not just the tags
HEADER_FLAG_BOUND = 0x02  # a context digest follows the fixed header part
HEADER_FLAGS_KNOWN = HEADER_FLAG_COMMITTED | HEADER_FLAG_BOUND
CONTEXT_DIGEST_BYTES = 32
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 16 << 20
MAX_RECIPIENTS = 0xFFFF
SIGNATURE_DOMAIN = b"vfed/envelope/v1/signature\x00"


class Cipher(IntEnum):
    """Chunk AEAD; the id byte in the header says which one encrypted the payload."""

    AES256GCM = 1
    XCHACHA20POLY1305 = 2

    @property
    def label(self) -> str:
        return {1: "AES-256-GCM", 2: "XChaCha20-Poly1305-IETF"}[self.value]


@dataclass(frozen=True)
class Aead:
    """One cipher's nonce layout (the calls themselves live in `aead.ChunkCipher`)."""

    cipher: Cipher
    nonce_bytes: int

    def nonce(self, index: int, final: bool) -> bytes:
        """Nonce = final flag byte, zero padding, chunk index (u64 big endian)."""
        pad = b"\x00" * (self.nonce_bytes - 9)
        return (b"\x01" if final else b"\x00") + pad + index.to_bytes(8, "big")


_AEADS = {
    Cipher.AES256GCM: Aead(Cipher.AES256GCM, 12),
    Cipher.XCHACHA20POLY1305: Aead(Cipher.XCHACHA20POLY1305, 24),
}


def aes_gcm_available() -> bool:
    """libsodium's AES-256-GCM needs AES-NI + PCLMUL; it has no software fallback."""
    check = getattr(nb, "crypto_aead_aes256gcm_is_available", None)
    if check is None:
        try:
            check = importlib.import_module("nacl._sodium").lib.crypto_aead_aes256gcm_is_available
        except (ImportError, AttributeError):
            return False
    return bool(check())


def default_cipher() -> Cipher:
    return Cipher.AES256GCM if aes_gcm_available() else Cipher.XCHACHA20POLY1305


def aead_for(cipher: Cipher) -> Aead:
    if cipher is Cipher.AES256GCM and not aes_gcm_available():
        raise UnsupportedCipher("envelope uses AES-256-GCM but this CPU/libsodium lacks AES-NI support")
    return _AEADS[cipher]


@dataclass(frozen=True)
class Header:
    """What a node can learn before decrypting: who sent it, for whom, how it is chunked."""

    version: int
    cipher: Cipher
    chunk_size: int
    sender_key_id: str
    recipient_key_ids: tuple[str, ...]
    size: int  # header bytes on the wire, sealed keys included
    committed: bool = False  # signature covers all frame bytes (multi-recipient default)
    sealed_keys: tuple[bytes, ...] = field(default=(), repr=False)
    context_digest: bytes | None = None  # set when the envelope is bound to a context

    @property
    def raw_sender_id(self) -> bytes:
        return bytes.fromhex(self.sender_key_id)


def context_digest(context: bytes) -> bytes:
    """What a bound header carries for `context` (e.g. a run or task id): a 32-byte BLAKE2b digest."""
    if not isinstance(context, bytes | bytearray | memoryview):
        raise CryptoError(f"an envelope context must be bytes, not {type(context).__name__}")
    return hashlib.blake2b(context, digest_size=CONTEXT_DIGEST_BYTES, person=b"vfed-env1-ctx").digest()


def pack_header(
    cipher: Cipher,
    committed: bool,
    chunk_size: int,
    sender_id: bytes,
    entries: list[tuple[bytes, bytes]],
    digest: bytes | None = None,
) -> bytes:
    """The header bytes; `digest` (a context_digest) binds the envelope to a context."""
    if digest is not None and len(digest) != CONTEXT_DIGEST_BYTES:
        raise CryptoError(f"a context digest is {CONTEXT_DIGEST_BYTES} bytes, not {len(digest)}")
    flags = HEADER_FLAG_COMMITTED if committed else 0
    if digest is not None:
        flags |= HEADER_FLAG_BOUND
    fixed = _FIXED.pack(MAGIC, VERSION, int(cipher), flags, chunk_size, sender_id, len(entries))
    return fixed + (digest or b"") + b"".join(key_id + sealed for key_id, sealed in entries)


def _entries_offset(flags: int) -> int:
    return HEADER_FIXED_BYTES + (CONTEXT_DIGEST_BYTES if flags & HEADER_FLAG_BOUND else 0)


def header_size(prefix: bytes) -> int:
    """Total header length once the fixed part (HEADER_FIXED_BYTES) is known."""
    fixed = _parse_fixed(prefix)
    return _entries_offset(fixed[3]) + fixed[-1] * RECIPIENT_ENTRY_BYTES


def _parse_fixed(prefix: bytes) -> tuple[bytes, int, int, int, int, bytes, int]:
    if len(prefix) < HEADER_FIXED_BYTES:
        if not MAGIC.startswith(bytes(prefix[: len(MAGIC)])):
            raise CorruptHeader("not a vfed envelope (bad magic bytes)")
        raise TruncatedPayload(
            f"envelope header needs {HEADER_FIXED_BYTES} bytes, only {len(prefix)} present"
        )
    magic, version, cipher, flags, chunk_size, sender, count = _FIXED.unpack_from(prefix)
    if magic != MAGIC:
        raise CorruptHeader("not a vfed envelope (bad magic bytes)")
    if version != VERSION:
        raise UnknownVersion(f"envelope format version {version} is not supported (this code reads 1)")
    if cipher not in Cipher._value2member_map_:
        raise CorruptHeader(f"envelope names unknown cipher id {cipher}")
    if flags & ~HEADER_FLAGS_KNOWN:
        raise CorruptHeader(f"envelope header has unknown flag bits {flags:#04x}")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise CorruptHeader(f"envelope chunk size {chunk_size} is outside 1..{MAX_CHUNK_SIZE}")
    if count == 0:
        raise CorruptHeader("envelope lists no recipients")
    return magic, version, cipher, flags, chunk_size, sender, count


def read_header(prefix: bytes) -> Header:
    """Parse the header from the first bytes of an envelope (at least `Header.size` of them)."""
    prefix = bytes(prefix)
    _, version, cipher, flags, chunk_size, sender, count = _parse_fixed(prefix)
    start = _entries_offset(flags)
    size = start + count * RECIPIENT_ENTRY_BYTES
    if len(prefix) < size:
        raise TruncatedPayload(f"envelope header needs {size} bytes, only {len(prefix)} present")
    digest = prefix[HEADER_FIXED_BYTES:start] if flags & HEADER_FLAG_BOUND else None
    ids: list[str] = []
    sealed: list[bytes] = []
    for offset in range(start, size, RECIPIENT_ENTRY_BYTES):
        key_id = prefix[offset : offset + KEY_ID_BYTES].hex()
        if key_id in ids:
            raise CorruptHeader(f"envelope lists recipient {key_id} twice")
        ids.append(key_id)
        sealed.append(prefix[offset + KEY_ID_BYTES : offset + RECIPIENT_ENTRY_BYTES])
    committed = bool(flags & HEADER_FLAG_COMMITTED)
    return Header(
        version,
        Cipher(cipher),
        chunk_size,
        sender.hex(),
        tuple(ids),
        size,
        committed,
        tuple(sealed),
        context_digest=digest,
    )


def check_context(header: Header, expected: bytes | None) -> None:
    """Raise ContextMismatch unless the envelope is bound to `expected` (a context_digest), or both
    are unbound. Runs before any key work, so a misplaced envelope releases nothing."""
    got = header.context_digest
    if expected is None:
        if got is not None:
            raise ContextMismatch("envelope is bound to a context; the caller must name the one it expects")
        return
    if got is None:
        raise ContextMismatch(
            f"envelope is not bound to a context; expected context digest {expected.hex()[:16]}..."
        )
    if not hmac.compare_digest(got, expected):
        raise ContextMismatch(
            f"envelope belongs to another context (digest {got.hex()[:16]}..., "
            f"expected {expected.hex()[:16]}...)"
        )


def header_hash(header_bytes: bytes) -> bytes:
    return hashlib.blake2b(header_bytes, digest_size=32, person=b"vfed-env1-head").digest()


class FramesHash:
    """What the signature covers besides the header: every frame head + tag, or every frame byte.

    Tags alone are cheap but only bind the ciphertext for those who lack the content key; with several
    recipients each of them has it, so those envelopes commit to all frame bytes (SHA-256).
    """

    def __init__(self, committed: bool) -> None:
        self.committed = committed
        self._sha = hashlib.sha256(b"vfed-env1-frames")
        self._tags = hashlib.blake2b(digest_size=32, person=b"vfed-env1-tags")

    def update(self, head: bytes, sealed: bytes | memoryview) -> None:
        """`sealed` is the frame's ciphertext || tag (a view into the output or input buffer)."""
        if self.committed:
            self._sha.update(head)
            self._sha.update(sealed)
        else:
            self._tags.update(head + sealed[-TAG_BYTES:])

    def digest(self) -> bytes:
        return self._sha.digest() if self.committed else self._tags.digest()


def signed_message(head_hash: bytes, tags_digest: bytes) -> bytes:
    return SIGNATURE_DOMAIN + head_hash + tags_digest
