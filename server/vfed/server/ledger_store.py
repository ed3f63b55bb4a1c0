"""Each collaboration's ledger as the server keeps it: signed entries stored verbatim, chained by hash,
appended one at a time per collaboration.

The server is not trusted with the ledger: nodes and clients verify every entry and the chain themselves. An
honest server still verifies what it appends (`LedgerStates`), so a mistake is answered at once. Key records,
certificates and revocations are carried on the ledger of every collaboration their organization belongs to,
so a verifier finds on the ledger itself every key that signs its entries.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.common.ledger import GENESIS_HASH, KEY_RECORD_KINDS, LedgerError, LedgerState, Record, link
from vfed.common.ledger.view import collector_paused
from vfed.common.trust import KIND_CERTIFICATE, KIND_REVOCATION, MalformedEntry, SignedEntry, TrustError
from vfed.server.errors import conflict
from vfed.server.models import (
    Collaboration,
    KeyRecord,
    LedgerEntry,
    Organization,
    UserCertificate,
    collaboration_members,
)

THREAD_BATCH = 256  # stored entries taken in one go above which the event loop hands the work to a thread


@dataclass(frozen=True)
class Appended:
    """An entry placed on a ledger (the doorbell and the metrics are told once it is committed)."""

    collaboration_id: int
    seq: int
    hash: str
    kind: str


@dataclass(frozen=True)
class Carried:
    """A signed key record, certificate or revocation in the form a ledger stores it."""

    kind: str
    digest: str
    text: str

    @classmethod
    def of(cls, entry: SignedEntry) -> Carried:
        return cls(entry.kind, entry.digest, entry.to_json())


async def lock_collaborations(s: AsyncSession, collaboration_ids: Iterable[int]) -> None:
    """Appends to one collaboration's ledger go one after the other: a row lock on PostgreSQL, the write lock
    on SQLite (its transaction's first write). Rows are locked in id order, so no two appends deadlock."""
    for cid in sorted(set(collaboration_ids)):
        stmt = update(Collaboration).where(Collaboration.id == cid).values(name=Collaboration.name)
        await s.execute(stmt.execution_options(synchronize_session=False))


async def lock_organizations(s: AsyncSession, organization_ids: Iterable[int]) -> None:
    """Changes to what an organization carries on ledgers (its key records, certificates, memberships) go one
    after the other; organizations are locked before collaborations, in id order."""
    for oid in sorted(set(organization_ids)):
        stmt = update(Organization).where(Organization.id == oid).values(public_key=Organization.public_key)
        await s.execute(stmt.execution_options(synchronize_session=False))


async def head(s: AsyncSession, collaboration_id: int) -> tuple[int, str]:
    """(length, hash of the last entry) as stored; (0, GENESIS_HASH) for an empty ledger."""
    row = (
        await s.execute(
            select(LedgerEntry.seq, LedgerEntry.hash)
            .where(LedgerEntry.collaboration_id == collaboration_id)
            .order_by(LedgerEntry.seq.desc())
            .limit(1)
        )
    ).first()
    return (int(row[0]), str(row[1])) if row is not None else (0, GENESIS_HASH)


def new_row(
    collaboration_id: int, seq: int, prev_hash: str, kind: str, digest: str, text: str
) -> LedgerEntry:
    return LedgerEntry(
        collaboration_id=collaboration_id,
        seq=seq,
        kind=kind,
        digest=digest,
        hash=link(collaboration_id, seq, prev_hash, text),
        entry=text,
    )


async def append_carried(s: AsyncSession, collaboration_id: int, items: Sequence[Carried]) -> list[Appended]:
    """Append, in order, those of `items` this ledger does not hold yet (the caller holds its lock)."""
    if not items:
        return []
    held = set(
        (
            await s.execute(
                select(LedgerEntry.digest).where(
                    LedgerEntry.collaboration_id == collaboration_id, LedgerEntry.kind.in_(KEY_RECORD_KINDS)
                )
            )
        ).scalars()
    )
    seq, prev = await head(s, collaboration_id)
    done: list[Appended] = []
    for item in items:
        if item.digest in held:
            continue
        held.add(item.digest)
        seq += 1
        row = new_row(collaboration_id, seq, prev, item.kind, item.digest, item.text)
        s.add(row)
        prev = row.hash
        done.append(Appended(collaboration_id, seq, prev, item.kind))
    return done


async def carry(s: AsyncSession, organization_id: int, items: Sequence[Carried]) -> list[Appended]:
    """Put an organization's new key records, certificate or revocation on the ledger of every collaboration
    it belongs to, in the caller's transaction (which holds the organization's lock)."""
    cids = list(
        (
            await s.execute(
                select(collaboration_members.c.collaboration_id)
                .where(collaboration_members.c.organization_id == organization_id)
                .order_by(collaboration_members.c.collaboration_id)
            )
        ).scalars()
    )
    await lock_collaborations(s, cids)
    done: list[Appended] = []
    for cid in cids:
        done += await append_carried(s, cid, items)
    return done


async def carried_by(s: AsyncSession, organization_id: int) -> list[Carried]:
    """What an organization carries on its collaborations' ledgers: key records, then certificates, then
    revocations, each oldest first."""
    records = await s.execute(
        select(KeyRecord.kind, KeyRecord.digest, KeyRecord.entry)
        .where(KeyRecord.organization_id == organization_id)
        .order_by(KeyRecord.id)
    )
    items = [Carried(kind, digest, text) for kind, digest, text in records]
    certs = await s.execute(
        select(UserCertificate.digest, UserCertificate.entry)
        .where(UserCertificate.organization_id == organization_id)
        .order_by(UserCertificate.id)
    )
    items += [Carried(KIND_CERTIFICATE, digest, text) for digest, text in certs]
    revocations = await s.execute(
        select(UserCertificate.revocation)
        .where(UserCertificate.organization_id == organization_id, UserCertificate.revocation.is_not(None))
        .order_by(UserCertificate.revoked_at, UserCertificate.id)
    )
    for (text,) in revocations:
        if text is not None:
            items.append(Carried(KIND_REVOCATION, SignedEntry.parse(text).digest, text))
    return items


async def carry_members(
    s: AsyncSession, collaboration_id: int, organization_ids: Iterable[int]
) -> list[Appended]:
    """Organizations joined a collaboration: put what each carries on its ledger (none twice), in the
    caller's transaction."""
    orgs = sorted(set(organization_ids))
    if not orgs:
        return []
    await lock_organizations(s, orgs)
    await lock_collaborations(s, [collaboration_id])
    done: list[Appended] = []
    for org in orgs:
        done += await append_carried(s, collaboration_id, await carried_by(s, org))
    return done


def page_text(collaboration_id: int, length: int, rows: Iterable[tuple[int, str, str]]) -> str:
    """The GET answer, with each entry's stored canonical text spliced in verbatim (never re-parsed)."""
    parts = [f'{{"seq":{seq},"hash":{json.dumps(h)},"entry":{text}}}' for seq, h, text in rows]
    return f'{{"collaboration_id":{collaboration_id},"length":{length},"entries":[{",".join(parts)}]}}'


class LedgerStates:
    """The server's verified state of each collaboration's ledger, kept between requests and caught up from
    the database, where other server processes and `vserver import` append too. Entries the server stored
    were verified on the way in (or are key records it checked), so their signatures are not checked again."""

    def __init__(self) -> None:
        self._states: dict[int, LedgerState] = {}
        self._roots: dict[int, dict[int, str | None]] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    def lock(self, collaboration_id: int) -> asyncio.Lock:
        """This process's appends to one ledger, one after the other (before the database's lock)."""
        return self._locks.setdefault(collaboration_id, asyncio.Lock())

    def forget(self, collaboration_id: int) -> None:
        self._states.pop(collaboration_id, None)

    async def current(self, s: AsyncSession, collaboration_id: int) -> LedgerState:
        """The state as of the stored head; call it holding the collaboration's locks (this process's and the
        database's). 409 `ledger-broken` when what is stored does not verify (someone edited the database)."""
        roots = self._roots.setdefault(collaboration_id, {})
        found = await s.execute(select(Organization.id, Organization.root_key_id))
        roots.update({oid: root for oid, root in found})
        state = self._states.pop(collaboration_id, None)
        if state is not None and state.length:
            stored = await s.execute(
                select(LedgerEntry.hash).where(
                    LedgerEntry.collaboration_id == collaboration_id, LedgerEntry.seq == state.length
                )
            )
            if stored.scalar_one_or_none() != state.head.hash:
                state = None  # the stored ledger is not the one taken in: take it in afresh
        if state is None:
            state = LedgerState(collaboration_id, anchors=roots.get, tofu=True)
        rows = await s.execute(
            select(LedgerEntry.seq, LedgerEntry.hash, LedgerEntry.entry)
            .where(LedgerEntry.collaboration_id == collaboration_id, LedgerEntry.seq > state.length)
            .order_by(LedgerEntry.seq)
        )
        texts = [(int(seq), str(h), str(text)) for seq, h, text in rows]
        try:
            if len(texts) > THREAD_BATCH:
                await asyncio.to_thread(_take_stored, state, texts)
            else:
                _take_stored(state, texts)
        except TrustError as exc:
            raise conflict(
                "ledger-broken",
                f"the stored ledger of collaboration {collaboration_id} does not verify: {exc.message}",
            ) from None
        self._states[collaboration_id] = state
        return state


def _take_stored(state: LedgerState, texts: Sequence[tuple[int, str, str]]) -> None:
    with collector_paused(len(texts)):
        for seq, stored_hash, text in texts:
            try:
                entry = SignedEntry.parse(text)
            except MalformedEntry as exc:
                raise LedgerError(f"ledger entry {seq} is not a signed entry: {exc.message}") from None
            state.preverified(seq, frozenset(entry.signers()))
            state.apply(Record(seq, entry, stored_hash))
