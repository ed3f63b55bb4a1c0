"""The hash chain of one collaboration's ledger.

Entry `n` (1-based) is chained as `hash_n = SHA-256(domain, collaboration, n, hash_{n-1}, SHA-256(entry))`,
where `entry` is the signed entry's canonical JSON (signatures included) and `hash_0` is 32 zero bytes. The
server computes and stores the hashes; verifiers recompute them and never take the server's word.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from vfed.common.ledger.fastwork import entry_text, json_native
from vfed.common.trust.entries import ENTRY_VERSION, SIGN_DOMAIN, SignedEntry

LEDGER_DOMAIN = b"vfed/ledger/v1\x00"
GENESIS_HASH = "0" * 64


class Head(BaseModel):
    """A position on the ledger as some verifier saw it: the last entry's number and chain hash."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int = Field(ge=0)
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")

    def short(self) -> str:
        return f"{self.seq}:{self.hash[:12]}"


EMPTY_HEAD = Head(seq=0, hash=GENESIS_HASH)
_ENTRIES = TypeAdapter(list[SignedEntry])
"""`SignedEntry.parse` of decoded objects, a list of them in one call."""


def link(collaboration_id: int, seq: int, prev_hash: str, entry_json: str | bytes) -> str:
    raw = entry_json.encode("utf-8") if isinstance(entry_json, str) else entry_json
    return link_hashed(collaboration_id, seq, prev_hash, hashlib.sha256(raw).digest())


def link_hashed(collaboration_id: int, seq: int, prev_hash: str, entry_sha256: bytes) -> str:
    """`link` given the SHA-256 of the entry's canonical JSON (made in bulk by `fast.preverify`'s workers)."""
    h = hashlib.sha256(LEDGER_DOMAIN)
    h.update(struct.pack(">QQ", collaboration_id, seq))
    h.update(bytes.fromhex(prev_hash))
    h.update(entry_sha256)
    return h.hexdigest()


def entry_json(entry: SignedEntry, message: bytes) -> bytes:
    """`entry.to_json()` in UTF-8, given `message = entry.message()`: built around the canonical body already
    in the message when that is exactly the same text (the body holds only what JSON text decodes to, as every
    entry read from a backend does), else made by `to_json` (which `model_dump` first)."""
    if type(entry.v) is int and json_native(entry.body):
        try:
            body = message[len(SIGN_DOMAIN) + len(entry.kind.encode("utf-8")) + 1 :]
            return entry_text(body, entry.kind, tuple((s.key_id, s.sig) for s in entry.sigs), entry.v)
        except ValueError:  # text that UTF-8 cannot hold: to_json says what is wrong
            pass
    return entry.to_json().encode("utf-8")


@dataclass(frozen=True)
class Record:
    """One entry at its place on the ledger, as a backend serves it; `hash` is the backend's claim."""

    seq: int
    entry: SignedEntry
    hash: str | None = None

    @classmethod
    def from_wire(cls, item: Any) -> Record:
        """From `{"seq", "hash", "entry"}`; MalformedEntry/ValueError on anything else."""
        if not isinstance(item, dict):
            raise ValueError("a ledger record is an object")
        seq, claimed = item.get("seq"), item.get("hash")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise ValueError("a ledger record's seq is a positive integer")
        if claimed is not None and not isinstance(claimed, str):
            raise ValueError("a ledger record's hash is text")
        entry = item.get("entry")
        if not isinstance(entry, (str, bytes, dict)):
            raise ValueError("a ledger record holds no entry")
        return cls(seq, SignedEntry.parse(entry), claimed)

    @classmethod
    def page_from_wire(cls, items: list[Any]) -> list[Record] | None:
        """`from_wire` of every item, the entries validated in one call (a page of a backend's answer);
        None when any item is not a record with an entry object (then `from_wire` on each says which and
        why)."""
        places: list[tuple[int, str | None]] = []
        entries: list[Any] = []
        for item in items:
            if not isinstance(item, dict):
                return None
            seq, claimed, entry = item.get("seq"), item.get("hash"), item.get("entry")
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
                return None
            if (claimed is not None and not isinstance(claimed, str)) or not isinstance(entry, dict):
                return None
            places.append((seq, claimed))
            entries.append(entry)
        try:
            parsed = _ENTRIES.validate_python(entries)
        except ValidationError:
            return None
        for entry in parsed:
            if entry.v != ENTRY_VERSION:
                return None
        return [cls(seq, entry, claimed) for (seq, claimed), entry in zip(places, parsed, strict=True)]

    def to_wire(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "entry": self.entry.model_dump(mode="json")}
