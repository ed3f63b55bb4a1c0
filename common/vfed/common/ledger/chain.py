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

from pydantic import BaseModel, ConfigDict, Field

from vfed.common.trust.entries import SignedEntry

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


def link(collaboration_id: int, seq: int, prev_hash: str, entry_json: str | bytes) -> str:
    raw = entry_json.encode("utf-8") if isinstance(entry_json, str) else entry_json
    h = hashlib.sha256(LEDGER_DOMAIN)
    h.update(struct.pack(">QQ", collaboration_id, seq))
    h.update(bytes.fromhex(prev_hash))
    h.update(hashlib.sha256(raw).digest())
    return h.hexdigest()


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

    def to_wire(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "entry": self.entry.model_dump(mode="json")}
