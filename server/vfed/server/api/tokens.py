"""Token endpoints: user login (throttled, then locked), node API key login, refresh."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from sqlalchemy import bindparam, select

from vfed.server import auth
from vfed.server.api.common import json_response, read_json, session, touch_node
from vfed.server.config import Settings
from vfed.server.errors import ApiError, unauthorized
from vfed.server.models import Node, User
from vfed.server.schemas import (
    TokenNodeIn,
    TokenNodeOut,
    TokenRefreshIn,
    TokenRefreshOut,
    TokenUserIn,
    TokenUserOut,
)
from vfed.server.state import SETTINGS

DUMMY_HASH = web.AppKey("dummy_password_hash", list[str])  # filled on first use
# built once, four columns rather than an ORM object: node login is the hot path of every polling node
_NODE_BY_KEY = select(Node.id, Node.organization_id, Node.collaboration_id, Node.api_key_hash).where(
    Node.api_key_id == bindparam("key_id")
)


def _pair(settings: Settings, claims: dict[str, Any]) -> tuple[str, str]:
    access, _ = auth.issue(settings.jwt_secret, {**claims, "typ": "access"}, settings.access_token_s)
    refresh, _ = auth.issue(settings.jwt_secret, {**claims, "typ": "refresh"}, settings.refresh_token_s)
    return access, refresh


def _check_throttle(user: User, settings: Settings, now: datetime) -> None:
    """Locked accounts answer 403; after a few failures each next try must wait longer (429)."""
    if user.locked_until is not None and now < user.locked_until:
        wait_s = int((user.locked_until - now).total_seconds()) + 1
        raise ApiError(
            403,
            "account-locked",
            f"too many failed logins; try again in {wait_s} s",
            {"Retry-After": str(wait_s)},
        )
    cfg = settings.login
    if user.failed_logins >= cfg.throttle_after and user.last_failed_at is not None:
        backoff_s = cfg.throttle_base_s * 2 ** (user.failed_logins - cfg.throttle_after)
        ready = user.last_failed_at + timedelta(seconds=backoff_s)
        if now < ready:
            wait_s = int((ready - now).total_seconds()) + 1
            raise ApiError(
                429, "too-many-attempts", f"wait {wait_s} s before trying again", {"Retry-After": str(wait_s)}
            )


async def _burn_time(app: web.Application) -> None:
    """An unknown username costs as much as a wrong password, so names cannot be probed by timing."""
    cache = app[DUMMY_HASH]
    if not cache:
        cache.append(await auth.hash_password("not-a-password"))
    await auth.verify_password(cache[0], "wrong")


async def token_user(request: web.Request) -> web.Response:
    """Exchange username and password for an access and a refresh token."""
    body = await read_json(request, TokenUserIn)
    settings = request.app[SETTINGS]
    async with session(request) as s:
        user = (await s.execute(select(User).where(User.username == body.username))).scalar_one_or_none()
        if user is None:
            await _burn_time(request.app)
            raise unauthorized("wrong username or password", "invalid-credentials")
        now = datetime.now(UTC)
        if user.locked_until is not None and now >= user.locked_until:
            user.locked_until, user.failed_logins = None, 0
        _check_throttle(user, settings, now)
        if not await auth.verify_password(user.password_hash, body.password):
            user.failed_logins += 1
            user.last_failed_at = now
            if user.failed_logins >= settings.login.lockout_after:
                user.locked_until = now + timedelta(seconds=settings.login.lockout_s)
            await s.commit()
            raise unauthorized("wrong username or password", "invalid-credentials")
        user.failed_logins, user.last_failed_at, user.locked_until = 0, None, None
        await s.commit()
    access, refresh = _pair(settings, {"sub": str(user.id), "kind": "user"})
    return json_response(
        TokenUserOut(
            access_token=access, refresh_token=refresh, user_id=user.id, organization_id=user.organization_id
        )
    )


async def token_node(request: web.Request) -> web.Response:
    """Exchange a node API key for tokens: one indexed lookup by key id, one constant-time check."""
    body = await read_json(request, TokenNodeIn)
    key_id, secret = auth.split_api_key(body.api_key)
    settings = request.app[SETTINGS]
    async with session(request) as s:
        node = (await s.execute(_NODE_BY_KEY, {"key_id": key_id})).one_or_none()
        if not auth.check_secret(secret, node.api_key_hash if node else None) or node is None:
            raise unauthorized("unknown or wrong API key", "invalid-api-key")
        touch_node(request, node.id)
    access, refresh = _pair(settings, {"sub": str(node.id), "kind": "node"})
    return json_response(
        TokenNodeOut(
            access_token=access,
            refresh_token=refresh,
            node_id=node.id,
            organization_id=node.organization_id,
            collaboration_id=node.collaboration_id,
        )
    )


async def token_refresh(request: web.Request) -> web.Response:
    """A fresh pair for a valid refresh token whose subject still exists."""
    body = await read_json(request, TokenRefreshIn)
    settings = request.app[SETTINGS]
    claims = auth.decode(settings.jwt_secret, body.refresh_token, "refresh")
    kind = claims.get("kind")
    model: type[User] | type[Node] = User if kind == "user" else Node
    if kind not in ("user", "node"):
        raise unauthorized("this token cannot be refreshed", "invalid-token")
    async with session(request) as s:
        if await s.get(model, int(claims["sub"])) is None:
            raise unauthorized("the account no longer exists", "invalid-token")
    access, refresh = _pair(settings, {"sub": claims["sub"], "kind": kind})
    return json_response(TokenRefreshOut(access_token=access, refresh_token=refresh))
