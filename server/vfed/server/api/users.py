"""Users and roles. Org-admins manage their own organization's users; only root grants root."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.server import auth
from vfed.server.access import RULES, Scope, require, user_filter
from vfed.server.api.common import (
    caller,
    commit_unique,
    forget_principal,
    json_response,
    own_org,
    page_of,
    paginate,
    path_id,
    read_json,
    read_query,
    session,
)
from vfed.server.auth import Principal
from vfed.server.errors import forbidden, not_found
from vfed.server.models import Organization, Role, RoleName, User
from vfed.server.schemas import PageQuery, RoleOut, RuleOut, UserIn, UserOut, UserPatch, UserQuery


def out(u: User) -> UserOut:
    """The user as the API shows it (never the hash)."""
    return UserOut(
        id=u.id,
        username=u.username,
        organization_id=u.organization_id,
        roles=[r.name for r in u.roles],
        links={"self": f"/api/v1/users/{u.id}", "organization": f"/api/v1/organizations/{u.organization_id}"},
    )


async def _roles(s: AsyncSession, p: Principal, scope: Scope, names: list[RoleName]) -> list[Role]:
    if scope < Scope.GLOBAL and (RoleName.ROOT in names or RoleName.NODE in names):
        raise forbidden("only root grants the root or node role")
    return list((await s.execute(select(Role).where(Role.name.in_([str(n) for n in names])))).scalars())


async def list_users(request: web.Request) -> web.Response:
    """Users the caller may see: oneself, or one's organization for admins."""
    q = read_query(request, UserQuery)
    async with session(request) as s:
        p = await caller(request, s)
        where = [user_filter(p, require(p, "user", "read"))]
        if q.organization_id is not None:
            where.append(User.organization_id == q.organization_id)
        rows, total = await paginate(s, User, where, q.page, q.per_page)
    return web.json_response(page_of(request, [out(u) for u in rows], total, q.page, q.per_page))


async def _visible_user(request: web.Request, s: AsyncSession, p: Principal, op: str) -> User:
    uid = path_id(request)
    read_scope = require(p, "user", "read")
    u = (await s.execute(select(User).where(User.id == uid, user_filter(p, read_scope)))).scalar_one_or_none()
    if u is None:
        raise not_found("user", uid)
    if op != "read":
        require(p, "user", op)
    return u


async def get_user(request: web.Request) -> web.Response:
    """One user."""
    async with session(request) as s:
        p = await caller(request, s)
        u = await _visible_user(request, s, p, "read")
    return json_response(out(u))


async def create_user(request: web.Request) -> web.Response:
    """Root, or an org-admin for its own organization."""
    body = await read_json(request, UserIn)
    async with session(request) as s:
        p = await caller(request, s)
        scope = require(p, "user", "create")
        org_id = own_org(p, scope, body.organization_id, "you may create users in your own organization only")
        if await s.get(Organization, org_id) is None:
            raise not_found("organization", org_id)
        roles = await _roles(s, p, scope, body.roles)
        u = User(
            username=body.username,
            password_hash=await auth.hash_password(body.password),
            organization_id=org_id,
            roles=roles,
        )
        s.add(u)
        await commit_unique(s, f"the username {body.username!r} is taken")
    return json_response(out(u), 201)


async def patch_user(request: web.Request) -> web.Response:
    """Change a password (oneself, or as admin) or roles (admin only)."""
    body = await read_json(request, UserPatch)
    async with session(request) as s:
        p = await caller(request, s)
        uid = path_id(request)
        if body.roles is not None or uid != p.user_id:
            u = await _visible_user(request, s, p, "edit")
            scope = require(p, "user", "edit")
        else:
            u = await _visible_user(request, s, p, "read")
            scope = Scope.OWN
        if body.roles is not None:
            u.roles = await _roles(s, p, scope, body.roles)
            forget_principal(request, "user", u.id)
        if body.password is not None:
            u.password_hash = await auth.hash_password(body.password)
            u.failed_logins, u.locked_until = 0, None
        await s.commit()
    return json_response(out(u))


async def list_roles(request: web.Request) -> web.Response:
    """The fixed roles and what each allows."""
    q = read_query(request, PageQuery)
    async with session(request) as s:
        p = await caller(request, s)
        require(p, "role", "read")
        rows, total = await paginate(s, Role, [], q.page, q.per_page)
    data = []
    for r in rows:
        rules = RULES.get(r.name, {})
        data.append(
            RoleOut(
                id=r.id,
                name=r.name,
                description=r.description,
                rules=[
                    RuleOut(resource=res, operation=op, scope=sc.name.lower())
                    for (res, op), sc in sorted(rules.items())
                ]
                if r.name != "root"
                else [RuleOut(resource="*", operation="*", scope="global")],
            )
        )
    return web.json_response(page_of(request, data, total, q.page, q.per_page))
