"""Organizations, their current public key and its history."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.common.api import resources as res
from vfed.common.crypto.errors import CryptoError
from vfed.common.crypto.keys import PublicKey
from vfed.server import audit
from vfed.server.access import Scope, org_filter, require
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
from vfed.server.auth import Principal
from vfed.server.errors import ApiError, forbidden, not_found
from vfed.server.models import Organization, OrganizationKey, collaboration_members
from vfed.server.schemas import (
    OrganizationIn,
    OrganizationKeyOut,
    OrganizationKeysOut,
    OrganizationQuery,
    PublicKeyIn,
)


def out(org: Organization) -> res.Organization:
    """The organization as the API shows it."""
    base = f"/api/v1/organizations/{org.id}"
    return res.Organization(
        id=org.id,
        name=org.name,
        public_key=org.public_key,
        key_id=org.key_id,
        links={
            "self": base,
            "keys": f"{base}/keys",
            "key_records": f"{base}/key-records",
            "certificates": f"{base}/certificates",
            "collaborations": f"/api/v1/collaborations?organization_id={org.id}",
            "nodes": f"/api/v1/nodes?organization_id={org.id}",
            "users": f"/api/v1/users?organization_id={org.id}",
        },
    )


def key_id_of(text: str) -> str:
    """Validate a public key in `vfed.common.crypto` text form; 422 naming the problem."""
    try:
        return PublicKey.from_text(text).key_id
    except CryptoError as exc:
        raise ApiError(422, "invalid-public-key", str(exc)) from exc


async def list_organizations(request: web.Request) -> web.Response:
    """Organizations the caller may see: its own and those sharing a collaboration."""
    q = read_query(request, OrganizationQuery)
    async with session(request) as s:
        p = await caller(request, s)
        where = [org_filter(p, require(p, "organization", "read"))]
        if q.name is not None:
            where.append(Organization.name == q.name)
        if q.collaboration_id is not None:
            members = select(collaboration_members.c.organization_id).where(
                collaboration_members.c.collaboration_id == q.collaboration_id
            )
            where.append(Organization.id.in_(members))
        rows, total = await paginate(s, Organization, where, q.page, q.per_page)
    return web.json_response(page_of(request, [out(o) for o in rows], total, q.page, q.per_page))


async def readable_org(s: AsyncSession, p: Principal, org_id: int) -> Organization:
    """The organization, or 404 when invisible to the caller."""
    query = select(Organization).where(
        Organization.id == org_id, org_filter(p, require(p, "organization", "read"))
    )
    org = (await s.execute(query)).scalar_one_or_none()
    if org is None:
        raise not_found("organization", org_id)
    return org


async def visible_org(request: web.Request, op: str = "read") -> Organization:
    """The organization in the path, or 404 when invisible to the caller."""
    async with session(request) as s:
        return await readable_org(s, await caller(request, s), path_id(request))


async def editable_org(s: AsyncSession, p: Principal, org_id: int) -> Organization:
    """The organization, when the caller may change its keys: root, its admin or its node (404 when
    invisible, 403 for anyone else)."""
    org = (
        await s.execute(
            select(Organization)
            .where(Organization.id == org_id, org_filter(p, Scope.COLLABORATION))
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if org is None:
        raise not_found("organization", org_id)
    scope = require(p, "organization", "edit")
    if scope < Scope.GLOBAL and org.id != p.organization_id:
        raise forbidden("only this organization's admin or node may change its keys")
    return org


def replace_key(s: AsyncSession, org: Organization, public_key: str, key_id: str) -> None:
    """Make `public_key` the organization's current key; a different previous one goes to the history."""
    if org.public_key and org.key_id != key_id:
        s.add(
            OrganizationKey(
                organization_id=org.id,
                public_key=org.public_key,
                key_id=org.key_id,
                created_at=org.created_at,
            )
        )
    org.public_key, org.key_id = public_key, key_id


async def get_organization(request: web.Request) -> web.Response:
    """One organization."""
    return json_response(out(await visible_org(request)))


async def create_organization(request: web.Request) -> web.Response:
    """Root only: a new organization, optionally with its public key."""
    body = await read_json(request, OrganizationIn)
    key_id = key_id_of(body.public_key) if body.public_key else None
    async with session(request) as s:
        p = await caller(request, s)
        if require(p, "organization", "create") < Scope.GLOBAL:
            raise forbidden("only root creates organizations")
        org = Organization(name=body.name, public_key=body.public_key, key_id=key_id)
        s.add(org)
        await commit_unique(s, f"an organization named {body.name!r} exists")
    return json_response(out(org), 201)


async def put_public_key(request: web.Request) -> web.Response:
    """Replace the organization's public key; the old one goes to the history."""
    org_id = path_id(request)
    body = await read_json(request, PublicKeyIn)
    key_id = key_id_of(body.public_key)
    async with session(request) as s:
        p = await caller(request, s)
        org = await editable_org(s, p, org_id)
        previous = org.key_id
        replace_key(s, org, body.public_key.strip(), key_id)
        action, detail = "organization.public-key", {"key_id": key_id, "previous_key_id": previous}
        await audit.record(request, s, p, action, "organization", org.id, org.id, org.name, **detail)
        await s.commit()
    return json_response(out(org))


async def list_keys(request: web.Request) -> web.Response:
    """Previous public keys, newest first (the current one is on the organization)."""
    org = await visible_org(request)
    async with session(request) as s:
        rows = (
            await s.execute(
                select(OrganizationKey)
                .where(OrganizationKey.organization_id == org.id)
                .order_by(OrganizationKey.id.desc())
            )
        ).scalars()
        data = [
            OrganizationKeyOut(
                public_key=k.public_key, key_id=k.key_id, created_at=k.created_at, retired_at=k.retired_at
            )
            for k in rows
        ]
    return json_response(OrganizationKeysOut(data=data))
