"""A verified, up-to-date view of one collaboration's ledger, kept by a node or a client.

`sync` reads what is new and verifies it; before it does, it compares the backend's record at the view's head
with the one verified earlier, so history rewritten under a verifier is caught at its next read. Heads that
others verified (from task descriptors and receipts) are checked with `ensure_head`. A `LocalCopy` keeps the
verified records between restarts, so a restart verifies only what is new.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from vfed.common.ledger.backend import READ_LIMIT, Ledger
from vfed.common.ledger.chain import GENESIS_HASH, Head, Record, link
from vfed.common.ledger.errors import LedgerForked, LedgerTampered
from vfed.common.ledger.state import LedgerState
from vfed.common.trust.entries import SignedEntry

log = logging.getLogger("vfed.ledger")


BULK = 256
"""From this many records on, signatures are checked in bulk (fast.preverify) and the collector rests."""


@contextlib.contextmanager
def collector_paused(records: int) -> Iterator[None]:
    """Pause the cyclic garbage collector while a large batch is taken in: the verified state grows by a few
    objects per entry, and each full collection would walk all of them again (measured: about a third of a
    full verification of 100,000 entries). Reference counting still frees everything; the collector resumes
    (and catches up) afterwards."""
    if records < BULK or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class LocalCopy(Protocol):
    """Records this verifier already checked, kept between restarts (its own disk: trusted)."""

    def load(self) -> list[Record]: ...

    def save(self, records: Sequence[Record]) -> None: ...

    def heads(self) -> list[tuple[Head, str]]: ...

    def remember_head(self, head: Head, source: str) -> None: ...


class MemoryCopy:
    """A LocalCopy that lives as long as the process (clients)."""

    def __init__(self) -> None:
        self._records: list[Record] = []
        self._heads: list[tuple[Head, str]] = []

    def load(self) -> list[Record]:
        return list(self._records)

    def save(self, records: Sequence[Record]) -> None:
        self._records.extend(records)

    def heads(self) -> list[tuple[Head, str]]:
        return list(self._heads)

    def remember_head(self, head: Head, source: str) -> None:
        self._heads.append((head, source))


@dataclass(frozen=True)
class VerifyReport:
    length: int
    head: Head
    heads_checked: int
    problems: tuple[str, ...]


StateFactory = Callable[[], LedgerState]


class LedgerView:
    def __init__(self, backend: Ledger, new_state: StateFactory, copy: LocalCopy | None = None) -> None:
        self.backend = backend
        self._new_state = new_state
        self.copy = copy if copy is not None else MemoryCopy()
        self.state = new_state()
        self._lock = asyncio.Lock()
        self._loaded = False

    @property
    def collaboration_id(self) -> int:
        return self.backend.collaboration_id

    @property
    def head(self) -> Head:
        return self.state.head

    def load(self) -> None:
        """Take in the local copy (verified before it was saved: signatures are not checked again)."""
        if self._loaded:
            return
        records = self.copy.load()
        with collector_paused(len(records)):
            for record in records:
                self.state.preverified(record.seq, frozenset(record.entry.signers()))
                self.state.apply(record)
        self._loaded = True

    async def sync(self) -> int:
        """Read and verify what is new; returns how many entries were new. LedgerError if any fails."""
        async with self._lock:
            self.load()
            added = 0
            after = max(self.state.length - 1, 0)  # re-read our head: a rewrite under us shows there
            while True:
                records = await self.backend.read(after, READ_LIMIT)
                fresh = self._compare_known(records)
                self._apply_new(fresh)
                added += len(fresh)
                if len(records) < READ_LIMIT:
                    return added
                after = records[-1].seq

    def _compare_known(self, records: list[Record]) -> list[Record]:
        fresh = []
        for record in records:
            if record.seq <= self.state.length:
                ours = self.state.hash_at(record.seq)
                prev = self.state.hash_at(record.seq - 1) or GENESIS_HASH
                served = link(self.collaboration_id, record.seq, prev, record.entry.to_json())
                if (record.hash is not None and record.hash != ours) or served != ours:
                    raise LedgerForked(
                        f"the server's ledger entry {record.seq} differs from the one verified here "
                        f"({served[:12]} there, {str(ours)[:12]} here): history was rewritten",
                        record.seq,
                        ours,
                        served,
                        "server",
                    )
                continue
            fresh.append(record)
        return fresh

    def _apply_new(self, records: list[Record]) -> None:
        done: list[Record] = []
        try:
            with collector_paused(len(records)):
                if len(records) >= BULK:
                    from vfed.common.ledger.fast import preverify

                    preverify(self.state, records)
                for record in records:
                    self.state.apply(record)
                    done.append(record)
        finally:
            if done:
                self.copy.save(done)

    async def ensure_head(self, head: Head, source: str) -> None:
        """Raise LedgerForked unless `head` (verified by `source`) is on this view's chain."""
        if self.state.check_head(head, source):
            self.copy.remember_head(head, source)
            return
        await self.sync()
        if not self.state.check_head(head, source):
            raise LedgerForked(
                f"{source} verified ledger head {head.short()}, but the server shows this verifier only "
                f"{self.state.length} entries: the server shows different histories (a fork)",
                head.seq,
                None,
                head.hash,
                source,
            )
        self.copy.remember_head(head, source)

    async def append(self, entry: SignedEntry) -> Head:
        """Append and confirm: the entry must be found verified at the place the backend reported."""
        place = await self.backend.append(entry)
        await self.sync()
        if self.state.hash_at(place.seq) != place.hash or self.state.kind_at(place.seq) != entry.kind:
            raise LedgerTampered(f"the entry appended at {place.short()} is not there when read back")
        return place

    async def verify_full(self) -> VerifyReport:
        """Read the whole ledger afresh, verify every entry, and compare it with this view's chain and every
        head this verifier remembered (descriptors, receipts, checkpoints)."""
        from vfed.common.ledger.fast import preverify

        fresh = self._new_state()
        after = 0
        # A page read and handed to preverify is applied once the next one is read and handed over too: the
        # workers check one page while this thread reads the next and applies the one before.
        ahead: list[Record] = []
        with collector_paused(BULK):
            while True:
                try:
                    records = await self.backend.read(after, READ_LIMIT)
                except Exception:
                    fresh.apply_all(ahead)  # entries read before come first: the first bad one is named
                    raise
                await asyncio.to_thread(preverify, fresh, records, before=ahead)
                fresh.apply_all(ahead)
                ahead = records
                if len(records) < READ_LIMIT:
                    break
                after = records[-1].seq
            fresh.apply_all(ahead)
        async with self._lock:
            self.load()
        for seq in range(1, min(fresh.length, self.state.length) + 1):
            if fresh.hash_at(seq) != self.state.hash_at(seq):
                raise LedgerForked(
                    f"ledger entry {seq} as the server serves it now ({str(fresh.hash_at(seq))[:12]}) "
                    f"differs from the one verified here before ({str(self.state.hash_at(seq))[:12]})",
                    seq,
                    self.state.hash_at(seq),
                    str(fresh.hash_at(seq)),
                    "server",
                )
        if fresh.length < self.state.length:
            raise LedgerForked(
                f"the server now serves {fresh.length} ledger entries; {self.state.length} were "
                "verified here",
                fresh.length,
                self.state.hash_at(fresh.length + 1),
                "",
                "server",
            )
        heads = self.copy.heads()
        for head, source in heads:
            if not fresh.check_head(head, source):
                raise LedgerForked(
                    f"{source} verified ledger head {head.short()}, beyond the {fresh.length} entries the "
                    "server serves (a fork)",
                    head.seq,
                    None,
                    head.hash,
                    source,
                )
        return VerifyReport(fresh.length, fresh.head, len(heads), tuple(p.message for p in fresh.problems))
