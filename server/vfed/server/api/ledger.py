"""`GET|POST /collaborations/{id}/ledger`: the collaboration's ledger, for its members only.

Reads are served from the stored canonical texts without parsing them. An append is verified first, the way
every node and client verifies it (`LedgerState`), then chained at the next place; appends to one ledger go
one after the other. Key records, certificates and revocations come through the organizations' own endpoints,
which carry them onto every ledger of the organization's collaborations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.common.ledger import KEY_RECORD_KINDS, LedgerState, Record, parse_body
from vfed.common.ledger.kinds import Body, LeaseExtended, LeaseGranted, LeaseRevoked
from vfed.common.trust import MalformedEntry, SignedEntry, TrustError
from vfed.common.trust.entries import MAX_ENTRY_BYTES
from vfed.server.access import collaboration_filter, require
from vfed.server.api.common import caller, json_response, path_id, read_json, session
from vfed.server.auth import Principal
from vfed.server.config import format_validation_error
from vfed.server.errors import ApiError, bad_request, conflict, forbidden, not_found
from vfed.server.ledger_store import Appended, lock_collaborations, new_row, page_text
from vfed.server.metrics import METRICS
from vfed.server.models import Collaboration, LedgerEntry, Node
from vfed.server.schemas import LedgerAppendIn, LedgerAppendOut, LedgerQuery
from vfed.server.state import DOORBELL, LEDGER_STATES

INVALID = "ledger-entry-invalid"


async def _member(s: AsyncSession, p: Principal, cid: int) -> None:
    """404 unless the caller is root, or a user or node of a member organization (as the rest of the API
    hides what a caller may not see)."""
    if p.kind == "run":
        raise not_found("collaboration", cid)
    where = collaboration_filter(p, require(p, "collaboration", "read"))
    found = await s.execute(select(Collaboration.id).where(Collaboration.id == cid, where))
    if found.first() is None:
        raise not_found("collaboration", cid)


def _query(request: web.Request) -> LedgerQuery:
    data: dict[str, str] = {}
    for key, value in request.query.items():
        if key in data:
            raise bad_request(f"{key}: given more than once", "bad-query")
        data[key] = value
    try:
        return LedgerQuery.model_validate(data)
    except ValidationError as exc:
        raise bad_request(format_validation_error(exc), "bad-query") from None


async def read_ledger(request: web.Request) -> web.Response:
    """Entries after `after`, at most `limit`, in order, each with its place and chain hash."""
    cid = path_id(request)
    q = _query(request)
    async with session(request) as s:
        await _member(s, await caller(request, s), cid)
        conn = await s.connection()
        rows = await conn.execute(
            select(LedgerEntry.seq, LedgerEntry.hash, LedgerEntry.entry)
            .where(LedgerEntry.collaboration_id == cid, LedgerEntry.seq > q.after)
            .order_by(LedgerEntry.seq)
            .limit(q.limit)
        )
        page = [(int(seq), str(h), str(text)) for seq, h, text in rows]
        length = (
            await conn.execute(select(func.max(LedgerEntry.seq)).where(LedgerEntry.collaboration_id == cid))
        ).scalar_one_or_none()
    text = page_text(cid, int(length or 0), page)
    return web.Response(text=text, content_type="application/json")


def _parse(raw: dict[str, Any]) -> tuple[SignedEntry, Body, str]:
    """The entry, its body and its canonical text; 400 naming what is wrong."""
    try:
        entry = SignedEntry.parse(raw)
        text = entry.to_json()
    except MalformedEntry as exc:
        raise ApiError(400, INVALID, f"the entry: {exc.message}") from None
    if len(text) > MAX_ENTRY_BYTES:
        raise ApiError(400, INVALID, f"the entry is larger than {MAX_ENTRY_BYTES} bytes")
    if entry.kind in KEY_RECORD_KINDS:
        raise ApiError(
            400,
            INVALID,
            f"a {entry.kind} entry is posted to its organization's endpoint (POST /api/v1/organizations/"
            "{id}/key-records, /certificates or /revocations), which carries it onto every ledger of the "
            "organization's collaborations",
        )
    try:
        body = parse_body(entry, "the entry")
    except TrustError as exc:
        raise ApiError(400, INVALID, exc.message) from None
    return entry, body, text


def _may_append(p: Principal) -> None:
    if p.kind == "node" or "root" in p.roles:
        return
    if p.kind != "user" or not p.roles - {"viewer"}:
        raise forbidden("your roles do not allow appending to a ledger")


def _acting_org(body: Body, state: LedgerState) -> int | None:
    """The organization an entry acts for: its own `org`, or the owner of the dataset a lease entry is about
    (as the ledger says; None when the ledger does not know it, which verifying then refuses)."""
    if isinstance(body, LeaseGranted):
        dataset = state.datasets.get(body.dataset)
        return dataset.org if dataset is not None else None
    if isinstance(body, LeaseExtended | LeaseRevoked):
        lease = state.leases.get(body.lease)
        return lease.owner if lease is not None else None
    return body.org


async def append_entry(request: web.Request) -> web.Response:
    """Verify a signed entry against the ledger as stored and append it at the next place (201)."""
    cid = path_id(request)
    raw = (await read_json(request, LedgerAppendIn)).entry
    states = request.app[LEDGER_STATES]
    async with session(request) as s:
        p = await caller(request, s)
        await _member(s, p, cid)
        _may_append(p)
        entry, body, text = _parse(raw)
        async with states.lock(cid):
            await lock_collaborations(s, [cid])
            state = await states.current(s, cid)
            actor = _acting_org(body, state)
            if actor is not None and actor != p.organization_id and "root" not in p.roles:
                raise forbidden(
                    f"this {entry.kind} entry acts for organization {actor}; you append for organization "
                    f"{p.organization_id} only"
                )
            held = await s.execute(
                select(LedgerEntry.seq).where(
                    LedgerEntry.collaboration_id == cid, LedgerEntry.digest == entry.digest
                )
            )
            if (seq := held.scalar_one_or_none()) is not None:
                raise conflict("exists", f"entry {entry.digest} is on this ledger already, at {seq}")
            seq = state.length + 1
            row = new_row(cid, seq, state.head.hash, entry.kind, entry.digest, text)
            try:
                state.apply(Record(seq, entry, row.hash))
            except TrustError as exc:
                raise ApiError(400, exc.reason, exc.message) from None
            s.add(row)
            try:
                await s.commit()
            except IntegrityError:
                states.forget(cid)  # another process appended meanwhile: take the stored ledger in afresh
                raise conflict(
                    "ledger-busy", "another append took this place; read the ledger and try again"
                ) from None
            except BaseException:
                states.forget(cid)
                raise
        await announce(request, s, [Appended(cid, seq, row.hash, entry.kind)])
    return json_response(LedgerAppendOut(seq=seq, hash=row.hash), 201)


async def announce(request: web.Request, s: AsyncSession, appended: Sequence[Appended]) -> None:
    """Count committed appends and ring every node of each collaboration whose ledger grew, once."""
    if not appended:
        return
    metrics = request.app[METRICS]
    last: dict[int, int] = {}
    for a in appended:
        metrics.ledger_appends.labels(a.kind).inc()
        last[a.collaboration_id] = max(last.get(a.collaboration_id, 0), a.seq)
    doorbell = request.app[DOORBELL]
    if doorbell.address is None:
        return
    nodes = await s.execute(
        select(Node.collaboration_id, Node.id)
        .where(Node.collaboration_id.in_(sorted(last)))
        .order_by(Node.id)
    )
    for cid, node_id in nodes:
        doorbell.ring_ledger(node_id, cid, last[cid])
