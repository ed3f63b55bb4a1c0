"""Collaborations: named groups of organizations that run tasks together.

An organization that joins one has its key records, certificates and revocations appended to the
collaboration's ledger in the same transaction, so the ledger holds every key that signs its entries.
"""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.common.api import resources as res
from vfed.server.access import Scope, collaboration_filter, require
from vfed.server.api.common import (
    caller,
    commit_unique,
    json_response,
    page_of,
    paginate,
    path_id,
    read_json,
    read_query,
    session,
)
from vfed.server.api.ledger import announce
from vfed.server.errors import ApiError, conflict, forbidden, not_found
from vfed.server.ledger_store import carry_members, lock_collaborations, lock_organizations
from vfed.server.models import Collaboration, Organization, collaboration_members
from vfed.server.schemas import CollaborationIn, CollaborationPatch, CollaborationQuery


def out(c: Collaboration) -> res.Collaboration:
    """The collaboration as the API shows it."""
    return res.Collaboration(
        id=c.id,
        name=c.name,
        organization_ids=[o.id for o in c.organizations],
        encrypted=c.encrypted,
        links={
            "self": f"/api/v1/collaborations/{c.id}",
            "organizations": f"/api/v1/organizations?collaboration_id={c.id}",
            "nodes": f"/api/v1/nodes?collaboration_id={c.id}",
            "tasks": f"/api/v1/tasks?collaboration_id={c.id}",
        },
    )


async def _orgs(s: AsyncSession, ids: list[int]) -> list[Organization]:
    found = list((await s.execute(select(Organization).where(Organization.id.in_(ids)))).scalars())
    missing = sorted(set(ids) - {o.id for o in found})
    if missing:
        raise ApiError(422, "validation-error", f"organization_ids: unknown organizations {missing}")
    return found


async def list_collaborations(request: web.Request) -> web.Response:
    """Collaborations the caller's organization belongs to."""
    q = read_query(request, CollaborationQuery)
    async with session(request) as s:
        p = await caller(request, s)
        where = [collaboration_filter(p, require(p, "collaboration", "read"))]
        if q.organization_id is not None:
            members = select(collaboration_members.c.collaboration_id).where(
                collaboration_members.c.organization_id == q.organization_id
            )
            where.append(Collaboration.id.in_(members))
        rows, total = await paginate(s, Collaboration, where, q.page, q.per_page)
    return web.json_response(page_of(request, [out(c) for c in rows], total, q.page, q.per_page))


async def get_collaboration(request: web.Request) -> web.Response:
    """One collaboration, 404 when the caller is not in it."""
    cid = path_id(request)
    async with session(request) as s:
        p = await caller(request, s)
        where = collaboration_filter(p, require(p, "collaboration", "read"))
        c = (
            await s.execute(select(Collaboration).where(Collaboration.id == cid, where))
        ).scalar_one_or_none()
    if c is None:
        raise not_found("collaboration", cid)
    return json_response(out(c))


async def create_collaboration(request: web.Request) -> web.Response:
    """Root only."""
    body = await read_json(request, CollaborationIn)
    async with session(request) as s:
        p = await caller(request, s)
        if require(p, "collaboration", "create") < Scope.GLOBAL:
            raise forbidden("only root creates collaborations")
        members = await _orgs(s, body.organization_ids)
        await lock_organizations(s, [o.id for o in members])
        c = Collaboration(name=body.name, encrypted=body.encrypted, organizations=members)
        s.add(c)
        await _flush_unique(s, f"a collaboration named {body.name!r} exists")
        appended = await carry_members(s, c.id, [o.id for o in members])
        await commit_unique(s, f"a collaboration named {body.name!r} exists")
        await announce(request, s, appended)
    return json_response(out(c), 201)


async def _flush_unique(s: AsyncSession, detail: str) -> None:
    try:
        await s.flush()
    except IntegrityError as exc:
        raise conflict("exists", detail) from exc


async def patch_collaboration(request: web.Request) -> web.Response:
    """Root only: rename, change members or the encrypted flag."""
    cid = path_id(request)
    body = await read_json(request, CollaborationPatch)
    async with session(request) as s:
        p = await caller(request, s)
        if require(p, "collaboration", "edit") < Scope.GLOBAL:
            raise forbidden("only root changes collaborations")
        c = await s.get(Collaboration, cid)
        if c is None:
            raise not_found("collaboration", cid)
        joined: set[int] = set()
        if body.organization_ids is not None:
            members = await _orgs(s, body.organization_ids)
            joined = {o.id for o in members} - {o.id for o in c.organizations}
            await lock_organizations(s, joined)  # before the collaboration, as every ledger append does
            await lock_collaborations(s, [c.id])
            c.organizations = members
        if body.name is not None:
            c.name = body.name
        if body.encrypted is not None:
            c.encrypted = body.encrypted
        await _flush_unique(s, f"a collaboration named {body.name!r} exists")
        appended = await carry_members(s, c.id, joined)
        await commit_unique(s, f"a collaboration named {body.name!r} exists")
        await announce(request, s, appended)
    return json_response(out(c))
