"""The ledger interface every backend implements, and the embedded backend: the server's append-only log.

A backend orders and stores entries; it is not trusted. `read` hands out records with the backend's claimed
hashes, which `LedgerState` recomputes. The Fabric backend implements the same `Ledger` protocol.
"""

from __future__ import annotations

from typing import Any, Protocol

from vfed.common.ledger.chain import Head, Record
from vfed.common.ledger.errors import LedgerTampered
from vfed.common.trust.entries import SignedEntry
from vfed.common.trust.errors import MalformedEntry

READ_LIMIT = 1000


class Ledger(Protocol):
    """One collaboration's ledger as some backend keeps it."""

    collaboration_id: int

    async def append(self, entry: SignedEntry) -> Head:
        """Append a signed entry; its place (sequence number and chain hash) as the backend reports it."""
        ...

    async def read(self, after: int, limit: int = READ_LIMIT) -> list[Record]:
        """Records `after+1 ...`, at most `limit`, in order."""
        ...


class Transport(Protocol):
    """JSON over the server's API, authenticated as the caller (each component has its own HTTP client)."""

    async def get_json(self, path: str, params: dict[str, str]) -> Any: ...

    async def post_json(self, path: str, body: Any) -> Any: ...


class EmbeddedLedger:
    """The ledger the server keeps: `GET|POST /collaborations/{id}/ledger`."""

    def __init__(self, transport: Transport, collaboration_id: int) -> None:
        self.transport = transport
        self.collaboration_id = collaboration_id
        self._path = f"/collaborations/{collaboration_id}/ledger"

    async def append(self, entry: SignedEntry) -> Head:
        answer = await self.transport.post_json(self._path, {"entry": entry.model_dump(mode="json")})
        try:
            return Head(seq=int(answer["seq"]), hash=str(answer["hash"]))
        except (KeyError, TypeError, ValueError):
            raise LedgerTampered("the server's answer to an append names no place on the ledger") from None

    async def read(self, after: int, limit: int = READ_LIMIT) -> list[Record]:
        answer = await self.transport.get_json(self._path, {"after": str(after), "limit": str(limit)})
        return records_of(answer, after, "the server")


def records_of(answer: Any, after: int, source: str) -> list[Record]:
    """The records of a backend's answer to a read (`{"entries": [{"seq", "hash", "entry"}, ...]}`);
    LedgerTampered, naming the first malformed one, when it is not that."""
    items = answer.get("entries") if isinstance(answer, dict) else None
    if not isinstance(items, list):
        raise LedgerTampered(f"{source}'s ledger answer holds no entries")
    records = Record.page_from_wire(items)
    if records is not None:
        return records
    records = []
    for number, item in enumerate(items):
        try:
            records.append(Record.from_wire(item))
        except (MalformedEntry, ValueError) as exc:
            raise LedgerTampered(f"ledger entry {after + number + 1} is malformed: {exc}") from None
    return records
