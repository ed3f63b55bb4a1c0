"""Organizations' key chains: signed records stored verbatim, append-only, in the order they came.

The server is not trusted with keys: nodes and clients verify a chain against the fingerprint they pinned.
An honest server still refuses what no verifier would accept (a record that does not verify, a second first
key, a fork), so a mistake is answered at once instead of at every node. Where the federation file named the
organization's first key (`vserver import`, `organizations.root_key_id`), it also refuses another first key:
a mis-keyed node is told at once. Nodes and clients still verify against their own pins, whatever the server
says. Each record stored is also appended to the ledger of every collaboration the organization belongs to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from aiohttp import web
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.common.crypto import PublicKey
from vfed.common.trust import (
    KIND_GENESIS,
    KIND_ROTATION,
    MalformedEntry,
    SignedEntry,
    TrustError,
    show_fingerprint,
)
from vfed.common.trust.entries import MAX_ENTRY_BYTES
from vfed.common.trust.keychain import record_key
from vfed.server import audit
from vfed.server.api.common import caller, path_id, read_json, session
from vfed.server.api.ledger import announce
from vfed.server.api.organizations import editable_org, readable_org, replace_key
from vfed.server.errors import ApiError, conflict
from vfed.server.ledger_store import Appended, Carried, carry
from vfed.server.models import KeyRecord, Organization
from vfed.server.schemas import MAX_KEY_RECORDS, KeyRecordsIn

INVALID = "invalid-key-record"


def parse_entry(raw: dict[str, Any], code: str, what: str) -> tuple[SignedEntry, str, str]:
    """A signed entry from a request, its digest and its canonical text; 422 `code` naming the problem."""
    try:
        entry = SignedEntry.parse(raw)
        digest, text = entry.digest, entry.to_json()
    except MalformedEntry as exc:
        raise ApiError(422, code, f"{what}: {exc.message}") from None
    if len(text) > MAX_ENTRY_BYTES:
        raise ApiError(422, code, f"{what}: larger than {MAX_ENTRY_BYTES} bytes")
    return entry, digest, text


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def key_of(entry: SignedEntry) -> PublicKey:
    """The public key an entry's body names (`key`); ValueError when it names none."""
    try:
        return record_key(entry)
    except TrustError as exc:
        raise ValueError(exc.message) from None


def _stored_key(text: str) -> PublicKey:
    """The key of a record this server stored (it was checked on the way in)."""
    return key_of(SignedEntry.parse(text))


async def signed_by_chain(s: AsyncSession, organization_id: int, entry: SignedEntry) -> bool:
    """True when a key the organization's stored chain ever held signed `entry`."""
    signers = entry.signers()
    if not signers:
        return False
    texts = await s.execute(
        select(KeyRecord.entry).where(
            KeyRecord.organization_id == organization_id, KeyRecord.key_id.in_(signers)
        )
    )
    return any(entry.signed_by(_stored_key(text)) for (text,) in texts)


@dataclass
class _Chain:
    """An organization's stored records, as far as appending to them needs."""

    organization_id: int
    root: str | None = None  # key id of the first key the federation file names, if it names one
    entries: list[str] = field(default_factory=list)  # canonical texts, append order
    digests: set[str] = field(default_factory=set)
    first: str | None = None  # key id of the first key
    texts: dict[str, str] = field(default_factory=dict)  # key id -> the record that introduced it
    next_of: dict[str, str] = field(default_factory=dict)  # key id -> the key that replaced it

    @classmethod
    async def load(cls, s: AsyncSession, organization_id: int, root: str | None = None) -> _Chain:
        chain = cls(organization_id, root)
        rows = await s.execute(
            select(KeyRecord.digest, KeyRecord.key_id, KeyRecord.prev_key_id, KeyRecord.entry)
            .where(KeyRecord.organization_id == organization_id)
            .order_by(KeyRecord.id)
        )
        for digest, key_id, prev_key_id, text in rows:
            chain.add(digest, key_id, prev_key_id, text)
        return chain

    def add(self, digest: str, key_id: str, prev_key_id: str | None, text: str) -> None:
        self.entries.append(text)
        self.digests.add(digest)
        self.texts[key_id] = text
        if prev_key_id is None:
            self.first = key_id
        else:
            self.next_of[prev_key_id] = key_id

    def head(self) -> str | None:
        """The newest key: the end of the (linear) chain of rotations from the first key."""
        current = self.first
        while current is not None and current in self.next_of:
            current = self.next_of[current]
        return current

    def public(self, key_id: str) -> PublicKey:
        return _stored_key(self.texts[key_id])

    def answer(self, status: int = 200) -> web.Response:
        """`{"data": [...], "head_key_id"}` with each record's stored text spliced in verbatim."""
        body = '{"data":[' + ",".join(self.entries) + '],"head_key_id":' + json.dumps(self.head()) + "}"
        return web.Response(text=body, status=status, content_type="application/json")


def _invalid(number: int, detail: str) -> ApiError:
    return ApiError(422, INVALID, f"record {number}: {detail}")


def _verify(number: int, entry: SignedEntry, key: PublicKey) -> None:
    try:
        entry.verify_by(key)
    except MalformedEntry as exc:
        raise _invalid(number, exc.message) from None


def _checked_body(chain: _Chain, number: int, entry: SignedEntry) -> PublicKey:
    """The key a record introduces, once its kind and body are those of a key record of this organization."""
    body = entry.body
    if entry.kind not in (KIND_GENESIS, KIND_ROTATION):
        raise _invalid(number, f"kind {entry.kind!r} is not a key record ({KIND_GENESIS} or {KIND_ROTATION})")
    if not is_int(body.get("org")) or body["org"] != chain.organization_id:
        raise _invalid(number, f"names organization {body.get('org')!r}, not {chain.organization_id}")
    created = body.get("created_at")
    if not is_int(created) or created < 0:
        raise _invalid(number, "has no valid created_at")
    try:
        return key_of(entry)
    except ValueError as exc:
        raise _invalid(number, str(exc)) from None


def _new_genesis(chain: _Chain, number: int, entry: SignedEntry, key: PublicKey) -> bool:
    """True for the organization's first key; False when that key is the first key already."""
    _verify(number, entry, key)  # self-signed
    if chain.first is None:
        if chain.root is not None and chain.root != key.key_id:
            raise conflict(
                "key-chain-conflict",
                f"record {number}: the federation file names first key {show_fingerprint(chain.root)} for "
                f"this organization ({chain.organization_id}); this record's key is "
                f"{show_fingerprint(key.key_id)} (is the node using the right key file?)",
            )
        return True
    if chain.first == key.key_id:
        return False
    raise conflict(
        "key-chain-conflict",
        f"record {number}: organization {chain.organization_id} already has its first key "
        f"{show_fingerprint(chain.first)}; another first key is refused (publish a rotation instead)",
    )


def _new_rotation(chain: _Chain, number: int, entry: SignedEntry, key: PublicKey) -> bool:
    """True for a rotation from the head; False when this very rotation is stored already."""
    prev = entry.body.get("prev")
    if not isinstance(prev, str) or prev not in chain.texts:
        raise _invalid(
            number,
            f"rotates from key {prev!r}, which is not on organization {chain.organization_id}'s chain "
            "(publish the first key record first, and records oldest first)",
        )
    _verify(number, entry, chain.public(prev))  # signed by the previous key ...
    _verify(number, entry, key)  # ... and by the new one
    successor = chain.next_of.get(prev)
    if successor == key.key_id:
        return False
    if successor is not None:
        raise conflict(
            "key-chain-fork",
            f"record {number}: key {prev} was rotated to {successor} already; a second rotation from it "
            "would fork the chain (nodes would refuse the organization)",
        )
    if key.key_id in chain.texts:
        raise _invalid(number, f"rotates back to key {key.key_id}, which is on the chain already")
    return True


def _append(chain: _Chain, number: int, raw: dict[str, Any]) -> KeyRecord | None:
    """The row for a record the chain does not hold yet; None for one it holds (idempotent)."""
    entry, digest, text = parse_entry(raw, INVALID, f"record {number}")
    if digest in chain.digests:
        return None
    key = _checked_body(chain, number, entry)
    if entry.kind == KIND_GENESIS:
        fresh, prev = _new_genesis(chain, number, entry, key), None
    else:
        fresh, prev = _new_rotation(chain, number, entry, key), str(entry.body["prev"])
    if not fresh:
        return None
    if len(chain.digests) >= MAX_KEY_RECORDS:
        raise conflict("key-chain-full", f"an organization's chain holds at most {MAX_KEY_RECORDS} records")
    chain.add(digest, key.key_id, prev, text)
    return KeyRecord(
        organization_id=chain.organization_id,
        kind=entry.kind,
        digest=digest,
        key_id=key.key_id,
        prev_key_id=prev,
        entry=text,
    )


async def list_key_records(request: web.Request) -> web.Response:
    """The organization's key records in append order (whoever may read the organization)."""
    async with session(request) as s:
        org = await readable_org(s, await caller(request, s), path_id(request))
        chain = await _Chain.load(s, org.id)
    return chain.answer()


async def append_key_records(request: web.Request) -> web.Response:
    """Append records in order, in one transaction; the organization's current key follows the head."""
    body = await read_json(request, KeyRecordsIn)
    org_id = path_id(request)
    async with session(request) as s:
        p = await caller(request, s)
        org = await editable_org(s, p, org_id)
        # appends to one organization's chain go one after the other (a row lock on PostgreSQL, the write
        # lock on SQLite), so two cannot both extend the head they read
        lock = (
            update(Organization).where(Organization.id == org.id).values(public_key=Organization.public_key)
        )
        await s.execute(lock.execution_options(synchronize_session=False))
        await s.refresh(org)
        chain = await _Chain.load(s, org.id, org.root_key_id)
        rows = [row for number, raw in enumerate(body.records) if (row := _append(chain, number, raw))]
        appended: list[Appended] = []
        if rows:
            s.add_all(rows)
            head = chain.head()
            if head is not None and head != org.key_id:
                replace_key(s, org, chain.public(head).to_text(), head)
            # on every ledger of the organization's collaborations too, in the same transaction
            appended = await carry(s, org.id, [Carried(r.kind, r.digest, r.entry) for r in rows])
            keys = [r.key_id for r in rows]
            action = "organization.key-records"
            await audit.record(request, s, p, action, "organization", org.id, org.id, org.name, key_ids=keys)
        await s.commit()
        await announce(request, s, appended)
    return chain.answer(201 if rows else 200)
