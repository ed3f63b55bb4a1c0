"""Users and roles. Org-admins manage their own organization's users, but never one holding a role they could
not grant (root, node); only root grants root. Every change is audited and revokes the user's tokens."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.server import audit, auth
from vfed.server.access import RULES, Scope, grantable_roles, require, scope_of, user_filter
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
from vfed.server.errors import ApiError, forbidden, not_found
from vfed.server.models import Organization, Role, RoleName, User
from vfed.server.schemas import PageQuery, RoleOut, RuleOut, UserIn, UserOut, UserPatch, UserQuery


def out(u: User) -> UserOut:
    """The user as the API shows it (never the hash)."""
    return UserOut(
        id=u.id,
        username=u.username,
        organization_id=u.organization_id,
        roles=[r.name for r in u.roles],
        disabled=u.disabled,
        links={"self": f"/api/v1/users/{u.id}", "organization": f"/api/v1/organizations/{u.organization_id}"},
    )


async def _roles(s: AsyncSession, p: Principal, scope: Scope, names: list[RoleName]) -> list[Role]:
    if not {str(n) for n in names} <= grantable_roles(scope):
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


async def _editable_user(request: web.Request, s: AsyncSession, p: Principal, op: str) -> tuple[User, Scope]:
    """The user to edit or delete, and the caller's scope for it.

    Another organization's users stay invisible (404); in one's own organization a refusal is 403 with its
    reason: no rule for `op`, or the user holds a role the caller could not grant (an org-admin cannot touch
    root, or the password of anyone who could then become root through them)."""
    uid = path_id(request)
    u = await s.get(User, uid)
    read_scope = scope_of(p, "user", "read")
    same_org = u is not None and u.organization_id == p.organization_id
    if u is None or not (same_org or read_scope >= Scope.GLOBAL):
        raise not_found("user", uid)
    scope = scope_of(p, "user", op)
    if scope == Scope.NONE or (scope < Scope.GLOBAL and not same_org):
        raise forbidden(f"your roles do not allow {op} on user {uid}")
    beyond = sorted({r.name for r in u.roles} - grantable_roles(scope))
    if beyond:
        raise forbidden(
            f"user {uid} holds the {', '.join(beyond)} role, which you cannot grant, so you may not {op} them"
        )
    return u, scope


def _revoke_tokens(request: web.Request, u: User) -> None:
    """Every access and refresh token of `u` is refused from now on."""
    u.token_version += 1
    forget_principal(request, "user", u.id)


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
        await s.flush()
        await audit.record(
            request, s, p, "user.create", "user", u.id, org_id, u.username, roles=[r.name for r in roles]
        )
        await commit_unique(s, f"the username {body.username!r} is taken")
    return json_response(out(u), 201)


async def _own_password(request: web.Request, s: AsyncSession, p: Principal, body: UserPatch) -> User:
    """One's own password: only with the old one, so a stolen token cannot take the account over."""
    u = await _visible_user(request, s, p, "read")
    if body.old_password is None:
        raise ApiError(422, "validation-error", "old_password: needed to change your own password")
    if not await auth.verify_password(u.password_hash, body.old_password):
        raise ApiError(403, "wrong-password", "old_password is not your current password")
    return u


async def patch_user(request: web.Request) -> web.Response:
    """Change a password (oneself with the old one, or as admin), roles or disabled (admin only).

    Any of these revokes the user's tokens; an admin may only change users whose roles it could grant."""
    body = await read_json(request, UserPatch)
    async with session(request) as s:
        p = await caller(request, s)
        uid = path_id(request)
        own = uid == p.user_id
        if body.roles is not None or body.disabled is not None or not own:
            u, scope = await _editable_user(request, s, p, "edit")
            if own and body.disabled:
                raise forbidden("you may not disable your own account")
            if own and body.password is not None:
                await _own_password(request, s, p, body)
        else:
            u, scope = await _own_password(request, s, p, body), Scope.OWN
        org, name = u.organization_id, u.username
        if body.roles is not None:
            before = [r.name for r in u.roles]
            u.roles = await _roles(s, p, scope, body.roles)
            after = [r.name for r in u.roles]
            await audit.record(
                request, s, p, "user.roles", "user", uid, org, name, before=before, after=after
            )
        if body.password is not None:
            u.password_hash = await auth.hash_password(body.password)
            await audit.record(request, s, p, "user.password", "user", uid, org, name)
        if body.disabled is not None and body.disabled != u.disabled:
            u.disabled = body.disabled
            action = "user.disable" if body.disabled else "user.enable"
            await audit.record(request, s, p, action, "user", uid, org, name)
        if body.roles is not None or body.password is not None or body.disabled:
            _revoke_tokens(request, u)
        await s.commit()
    return json_response(out(u))


async def delete_user(request: web.Request) -> web.Response:
    """Root, or an org-admin for its own organization's users whose roles it could grant; not oneself."""
    async with session(request) as s:
        p = await caller(request, s)
        u, _ = await _editable_user(request, s, p, "delete")
        if u.id == p.user_id:
            raise forbidden("you may not delete your own account")
        await audit.record(request, s, p, "user.delete", "user", u.id, u.organization_id, u.username)
        await s.delete(u)
        await s.commit()
        forget_principal(request, "user", u.id)
    return web.Response(status=204)


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
