"""The canonical signed entry: one format for key records, researcher certificates, task descriptors and the
ledger's entries.

An entry is `{"v": 1, "kind": ..., "body": {...}, "sigs": [{"key_id": ..., "sig": ...}]}`. What is signed
is a domain string, the kind and the body in canonical JSON (sorted keys, no spaces, UTF-8, finite numbers
only). The entry's `digest` is the SHA-256 of that message, so it names the content whatever signatures were
added; the server stores entries verbatim and cannot make a valid one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vfed.common.crypto import BadSignature, OrgKey, PublicKey
from vfed.common.trust.errors import MalformedEntry

ENTRY_VERSION = 1
SIGN_DOMAIN = b"vfed/entry/v1\x00"
MAX_ENTRY_BYTES = 1 << 20


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
"""`json.dumps` with these options, the encoder made once (it keeps no state between calls)."""


def canonical(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no white space, UTF-8, finite numbers only."""
    try:
        return _CANONICAL.encode(value).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise MalformedEntry(f"value has no canonical JSON form: {exc}") from None


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    sig: str = Field(min_length=86, max_length=88)

    def raw(self) -> bytes:
        try:
            raw = base64.b64decode(self.sig, validate=True)
        except (binascii.Error, ValueError):
            raise MalformedEntry(f"signature by {self.key_id} is not base64") from None
        if len(raw) != 64:
            raise MalformedEntry(f"signature by {self.key_id} is not 64 bytes")
        return raw


class SignedEntry(BaseModel):
    """A signed, versioned statement; parse untrusted text with `SignedEntry.parse`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: int = ENTRY_VERSION
    kind: str = Field(min_length=1, max_length=64)
    body: dict[str, Any]
    sigs: list[Signature] = Field(default_factory=list, max_length=8)

    @classmethod
    def parse(cls, value: str | bytes | dict[str, Any]) -> SignedEntry:
        """From JSON text or a decoded object; MalformedEntry on anything else."""
        try:
            if isinstance(value, (str, bytes)):
                if len(value) > MAX_ENTRY_BYTES:
                    raise MalformedEntry(f"entry larger than {MAX_ENTRY_BYTES} bytes")
                entry = cls.model_validate_json(value)
            else:
                entry = cls.model_validate(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "entry"
            raise MalformedEntry(f"not a signed entry ({where}: {first['msg']})") from None
        if entry.v != ENTRY_VERSION:
            raise MalformedEntry(f"signed entry version {entry.v} is not supported (this code reads 1)")
        return entry

    def message(self) -> bytes:
        return signing_message(self.kind, self.body)

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of what is signed: names the content, independent of the signatures."""
        return hashlib.sha256(self.message()).hexdigest()

    def to_json(self) -> str:
        return canonical(self.model_dump(mode="json")).decode("utf-8")

    def signers(self) -> list[str]:
        return [s.key_id for s in self.sigs]

    def verify_by(self, key: PublicKey) -> None:
        """Raise MalformedEntry unless `key` signed this entry (a signature with its key id verifies)."""
        message = self.message()
        for sig in self.sigs:
            if sig.key_id == key.key_id:
                try:
                    key.verify(message, sig.raw())
                except BadSignature:
                    raise MalformedEntry(
                        f"{self.kind} entry: the signature of key {key.key_id} does not verify"
                    ) from None
                return
        raise MalformedEntry(f"{self.kind} entry is not signed by key {key.key_id}")

    def signed_by(self, key: PublicKey) -> bool:
        try:
            self.verify_by(key)
        except MalformedEntry:
            return False
        return True


def signing_message(kind: str, body: dict[str, Any]) -> bytes:
    return SIGN_DOMAIN + kind.encode("utf-8") + b"\x00" + canonical(body)


def sign_entry(kind: str, body: dict[str, Any], keys: Iterable[OrgKey]) -> SignedEntry:
    """A new entry signed by every key given (a rotation is signed by the old and the new key)."""
    message = signing_message(kind, body)
    sigs = [Signature(key_id=k.key_id, sig=base64.b64encode(k.sign(message)).decode("ascii")) for k in keys]
    # Round-trip the body through canonical JSON so what is kept is exactly what was signed.
    return SignedEntry(kind=kind, body=json.loads(message[len(SIGN_DOMAIN) + len(kind) + 1 :]), sigs=sigs)
