"""Organization identities: an X25519 key for sealing content keys and an Ed25519 key for signing."""

from __future__ import annotations

import base64
import binascii
import hashlib

import nacl.bindings
import nacl.exceptions
from nacl.public import PrivateKey
from nacl.public import PublicKey as BoxPublicKey
from nacl.signing import SigningKey, VerifyKey

from .errors import BadSignature, CorruptKey

KEY_ID_BYTES = 16
PUBLIC_TEXT_PREFIX = "vfedpk1:"
_CHECKSUM_BYTES = 4
_RAW_PUBLIC_BYTES = 64


def key_id_of(x25519_public: bytes, ed25519_public: bytes) -> bytes:
    """Fingerprint both public halves so one id names the whole identity (16 bytes)."""
    return hashlib.blake2b(
        x25519_public + ed25519_public, digest_size=KEY_ID_BYTES, person=b"vfed-key-id"
    ).digest()


def _checksum(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=_CHECKSUM_BYTES, person=b"vfed-pk-check").digest()


class PublicKey:
    """The public half of an organization key; this is what the server stores per organization."""

    __slots__ = ("_id", "box", "verify_key")

    def __init__(self, x25519_public: bytes, ed25519_public: bytes) -> None:
        if len(x25519_public) != 32 or len(ed25519_public) != 32:
            raise CorruptKey("public key halves must be 32 bytes each")
        if not nacl.bindings.crypto_core_ed25519_is_valid_point(ed25519_public):
            raise CorruptKey("Ed25519 public key is not a valid curve point")
        try:
            # A low-order X25519 point makes every shared secret zero; libsodium refuses it here.
            nacl.bindings.crypto_scalarmult(b"\x01" * 32, x25519_public)
        except nacl.exceptions.CryptoError as exc:
            raise CorruptKey("X25519 public key is a low-order point") from exc
        self.box = BoxPublicKey(x25519_public)
        self.verify_key = VerifyKey(ed25519_public)
        self._id = key_id_of(x25519_public, ed25519_public)

    @property
    def key_id(self) -> str:
        """Short hex fingerprint (32 characters) of both public keys."""
        return self._id.hex()

    @property
    def key_id_bytes(self) -> bytes:
        return self._id

    @property
    def x25519(self) -> bytes:
        return bytes(self.box)

    @property
    def ed25519(self) -> bytes:
        return bytes(self.verify_key)

    def to_text(self) -> str:
        """One line: prefix + base64url(x25519 || ed25519 || 4-byte checksum), no padding."""
        raw = self.x25519 + self.ed25519
        return PUBLIC_TEXT_PREFIX + base64.urlsafe_b64encode(raw + _checksum(raw)).decode().rstrip("=")

    @classmethod
    def from_text(cls, text: str) -> PublicKey:
        """Parse `to_text` output; any damage raises CorruptKey naming what is wrong."""
        if not isinstance(text, str):
            raise CorruptKey(f"public key must be text, got {type(text).__name__}")
        text = text.strip()
        if not text.startswith(PUBLIC_TEXT_PREFIX):
            raise CorruptKey(f"public key text must start with {PUBLIC_TEXT_PREFIX!r}")
        body = text[len(PUBLIC_TEXT_PREFIX) :]
        try:
            std = body.replace("-", "+").replace("_", "/")
            blob = base64.b64decode(std + "=" * (-len(std) % 4), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CorruptKey("public key text is not valid base64url") from exc
        if len(blob) != _RAW_PUBLIC_BYTES + _CHECKSUM_BYTES:
            raise CorruptKey(f"public key text decodes to {len(blob)} bytes, expected 68")
        raw, check = blob[:_RAW_PUBLIC_BYTES], blob[_RAW_PUBLIC_BYTES:]
        if _checksum(raw) != check:
            raise CorruptKey("public key text checksum mismatch (typo or truncation)")
        return cls(raw[:32], raw[32:])

    def verify(self, message: bytes, signature: bytes) -> None:
        """Check a detached Ed25519 signature made by `OrgKey.sign`; raise BadSignature if it fails."""
        try:
            self.verify_key.verify(message, signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError) as exc:
            raise BadSignature(f"signature by key {self.key_id} does not verify") from exc

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other._id == self._id

    def __hash__(self) -> int:
        return hash(self._id)

    def __repr__(self) -> str:
        return f"PublicKey({self.key_id})"


class OrgKey:
    """One private identity: X25519 (opens sealed content keys) + Ed25519 (signs envelopes)."""

    __slots__ = ("_public", "box_key", "created_s", "signing_key")

    def __init__(self, x25519_secret: bytes, ed25519_seed: bytes, created_s: int = 0) -> None:
        if len(x25519_secret) != 32 or len(ed25519_seed) != 32:
            raise CorruptKey("private key halves must be 32 bytes each")
        self.box_key = PrivateKey(x25519_secret)
        self.signing_key = SigningKey(ed25519_seed)
        self.created_s = created_s
        self._public = PublicKey(bytes(self.box_key.public_key), bytes(self.signing_key.verify_key))

    @classmethod
    def generate(cls, created_s: int = 0) -> OrgKey:
        return cls(bytes(PrivateKey.generate()), bytes(SigningKey.generate()), created_s)

    @property
    def public(self) -> PublicKey:
        return self._public

    @property
    def key_id(self) -> str:
        return self._public.key_id

    @property
    def x25519_secret(self) -> bytes:
        return bytes(self.box_key)

    @property
    def ed25519_seed(self) -> bytes:
        return bytes(self.signing_key)

    def sign(self, message: bytes) -> bytes:
        """Detached Ed25519 signature (64 bytes), e.g. for ledger entries."""
        return self.signing_key.sign(message).signature

    def __repr__(self) -> str:
        return f"OrgKey({self.key_id})"
