"""Token endpoints: user login and node API-key login (both throttled, never locked), and refresh.

Every token carries its account's `token_version` (`ver`); raising it revokes them all. Refresh tokens are
recorded by id and rotate: each is exchanged once, and a second presentation of one means it was copied, so
the whole family (every token descended from that login) dies and the account's version is raised.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from aiohttp import web
from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.server import audit, auth, broker_auth
from vfed.server.api.common import forget_principal, json_response, read_json, session, touch_node
from vfed.server.broker_auth import BROKER
from vfed.server.errors import ApiError, unauthorized
from vfed.server.models import Node, RefreshToken, User
from vfed.server.schemas import (
    TokenNodeIn,
    TokenNodeOut,
    TokenRefreshIn,
    TokenRefreshOut,
    TokenUserIn,
    TokenUserOut,
)
from vfed.server.state import SESSIONS, SETTINGS
from vfed.server.throttle import THROTTLES, client_address, too_many

DUMMY_HASH = web.AppKey("dummy_password_hash", list[str])  # filled on first use
# built once, a few columns rather than an ORM object: node login is the hot path of every polling node
_NODE_BY_KEY = select(
    Node.id,
    Node.organization_id,
    Node.collaboration_id,
    Node.api_key_hash,
    Node.token_version,
    Node.broker_password_hash,
).where(Node.api_key_id == bindparam("key_id"))
WRONG_PASSWORD = "wrong username or password"


async def _pair(
    request: web.Request, s: AsyncSession, kind: str, subject_id: int, version: int, family: str | None = None
) -> tuple[str, str]:
    """An access and a refresh token; the refresh token is recorded (the caller commits)."""
    settings = request.app[SETTINGS]
    claims = {"sub": str(subject_id), "kind": kind, "ver": version}
    access, _ = auth.issue(settings.jwt_secret, {**claims, "typ": "access"}, settings.access_token_s)
    jti, family = secrets.token_hex(16), family or secrets.token_hex(16)
    refresh, expires = auth.issue(
        settings.jwt_secret, {**claims, "typ": "refresh", "jti": jti, "fam": family}, settings.refresh_token_s
    )
    now = datetime.now(UTC)
    await s.execute(delete(RefreshToken).where(RefreshToken.expires_at < now))
    s.add(RefreshToken(jti=jti, family=family, kind=kind, subject_id=subject_id, expires_at=expires))
    return access, refresh


async def _burn_time(app: web.Application) -> None:
    """An unknown username costs as much as a wrong password, so names cannot be probed by timing."""
    cache = app[DUMMY_HASH]
    if not cache:
        cache.append(await auth.hash_password("not-a-password"))
    await auth.verify_password(cache[0], "wrong")


async def token_user(request: web.Request) -> web.Response:
    """Exchange username and password for an access and a refresh token.

    Throttled per client address and per (username, address), whether or not the user exists: unknown and
    known names get the same answers (401, then 429) at the same cost.
    """
    body = await read_json(request, TokenUserIn)
    settings = request.app[SETTINGS]
    throttles = request.app[THROTTLES]
    address = client_address(request, settings.trusted_proxies)
    account_key = (body.username, address)
    wait_s = max(throttles.address.wait_s(address), throttles.account.wait_s(account_key))
    if wait_s > 0:
        raise too_many(wait_s)
    async with session(request) as s:
        user = (await s.execute(select(User).where(User.username == body.username))).scalar_one_or_none()
        if user is None:
            await _burn_time(request.app)
            ok = False
        else:
            ok = await auth.verify_password(user.password_hash, body.password)
        if user is None or not ok:
            throttles.address.fail(address)
            throttles.account.fail(account_key)
            raise unauthorized(WRONG_PASSWORD, "invalid-credentials")
        throttles.account.forget(account_key)
        if user.disabled:
            raise ApiError(403, "account-disabled", "this account is disabled; ask an administrator")
        access, refresh = await _pair(request, s, "user", user.id, user.token_version)
        await s.commit()
    return json_response(
        TokenUserOut(
            access_token=access, refresh_token=refresh, user_id=user.id, organization_id=user.organization_id
        )
    )


async def token_node(request: web.Request) -> web.Response:
    """Exchange a node API key for tokens: one indexed lookup by key id, one constant-time check; failures
    are throttled per key id."""
    body = await read_json(request, TokenNodeIn)
    key_id, secret = auth.split_api_key(body.api_key)
    brake = request.app[THROTTLES].node_key
    wait_s = brake.wait_s(key_id)
    if wait_s > 0:
        raise too_many(wait_s)
    async with session(request) as s:
        node = (await s.execute(_NODE_BY_KEY, {"key_id": key_id})).one_or_none()
        if not auth.check_secret(secret, node.api_key_hash if node else None) or node is None:
            brake.fail(key_id)
            raise unauthorized("unknown or wrong API key", "invalid-api-key")
        brake.forget(key_id)
        touch_node(request, node.id)
        access, refresh = await _pair(request, s, "node", node.id, node.token_version)
        accounts = request.app[BROKER]
        broker_password = broker_auth.node_password(body.api_key) if accounts.enabled else None
        new_hash = broker_password is not None and not (
            node.broker_password_hash
            and broker_auth.verify_mosquitto_hash(broker_password, node.broker_password_hash)
        )
        if new_hash:  # a node from before broker accounts, or the first login after a key rotation
            stored = broker_auth.mosquitto_hash(str(broker_password))
            await s.execute(update(Node).where(Node.id == node.id).values(broker_password_hash=stored))
        await s.commit()
    if new_hash:
        await accounts.sync(request.app[SESSIONS])
    return json_response(
        TokenNodeOut(
            access_token=access,
            refresh_token=refresh,
            node_id=node.id,
            organization_id=node.organization_id,
            collaboration_id=node.collaboration_id,
            broker_username=broker_auth.node_username(node.id) if broker_password else None,
            broker_password=broker_password,
        )
    )


async def _account(s: AsyncSession, kind: str, subject_id: int) -> User | Node | None:
    if kind == "user":
        return await s.get(User, subject_id)
    return await s.get(Node, subject_id)


async def _reused(request: web.Request, s: AsyncSession, row: RefreshToken) -> ApiError:
    """A used refresh token came back: revoke its family and every token of the account."""
    await s.execute(update(RefreshToken).where(RefreshToken.family == row.family).values(revoked=True))
    account = await _account(s, row.kind, row.subject_id)
    if account is not None:
        account.token_version += 1
        org = account.organization_id
        name = account.username if isinstance(account, User) else account.name
        await audit.record(request, s, None, "token.reuse-revoked", row.kind, row.subject_id, org, name)
    await s.commit()
    forget_principal(request, row.kind, row.subject_id)
    return unauthorized(
        "this refresh token was used before; all tokens of the account are revoked, log in again",
        "token-reused",
    )


async def token_refresh(request: web.Request) -> web.Response:
    """A fresh pair for a valid, unused refresh token of an account whose token version it still carries."""
    body = await read_json(request, TokenRefreshIn)
    settings = request.app[SETTINGS]
    claims = auth.decode(settings.jwt_secret, body.refresh_token, "refresh")
    kind, jti, family = claims.get("kind"), claims.get("jti"), claims.get("fam")
    if kind not in ("user", "node") or not isinstance(jti, str) or not isinstance(family, str):
        raise unauthorized("this token cannot be refreshed", "invalid-token")
    now = datetime.now(UTC)
    async with session(request) as s:
        taken = await s.execute(
            update(RefreshToken)
            .where(
                RefreshToken.jti == jti,
                RefreshToken.used_at.is_(None),
                RefreshToken.revoked.is_(False),
                RefreshToken.expires_at > now,
            )
            .values(used_at=now)
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            row = await s.get(RefreshToken, jti)
            if row is not None and row.used_at is not None and not row.revoked:
                raise await _reused(request, s, row)
            raise unauthorized("the refresh token was revoked or has expired; log in again", "token-revoked")
        account = await _account(s, kind, int(claims["sub"]))
        if account is None:
            raise unauthorized("the account no longer exists", "invalid-token")
        if claims.get("ver", 0) != account.token_version or (isinstance(account, User) and account.disabled):
            raise unauthorized("the token was revoked; log in again", "token-revoked")
        access, refresh = await _pair(request, s, kind, account.id, account.token_version, family)
        await s.commit()
    return json_response(TokenRefreshOut(access_token=access, refresh_token=refresh))


async def token_revoke(request: web.Request) -> web.Response:
    """Log out: the refresh token's family (every token descended from that login) is revoked, so neither it
    nor a copy of it refreshes again. Access tokens of the login expire on their own (access_token_s); a
    password change or disabling the account ends them at once. 204 also for a family revoked before."""
    body = await read_json(request, TokenRefreshIn)
    claims = auth.decode(request.app[SETTINGS].jwt_secret, body.refresh_token, "refresh")
    family = claims.get("fam")
    if claims.get("kind") not in ("user", "node") or not isinstance(family, str):
        raise unauthorized("this token cannot be revoked", "invalid-token")
    async with session(request) as s:
        await s.execute(update(RefreshToken).where(RefreshToken.family == family).values(revoked=True))
        await s.commit()
    return web.Response(status=204)
