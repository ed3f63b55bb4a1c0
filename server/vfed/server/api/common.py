"""Helpers every handler uses: parsing bodies and queries, the caller, pagination, JSON answers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.common.api.statuses import TERMINAL
from vfed.server import auth
from vfed.server.access import Scope
from vfed.server.config import format_validation_error
from vfed.server.errors import ApiError, bad_request, conflict, forbidden, not_found, unauthorized
from vfed.server.models import Base, Node, Run, Task, User
from vfed.server.state import PRESENCE, PRINCIPALS, SESSIONS, SETTINGS, TOKENS

M = TypeVar("M", bound=BaseModel)
PRINCIPAL = web.RequestKey("principal", auth.Principal)
PRINCIPAL_TTL_S = 5.0
TOKENS_MAX = 10_000


def session(request: web.Request) -> AsyncSession:
    """A new database session (use as `async with`)."""
    return request.app[SESSIONS]()


async def read_json(request: web.Request, model: type[M]) -> M:
    """Parse and validate a JSON body: malformed JSON is 400, a wrong shape 422, and a body that does not
    arrive whole within `limits.body_timeout_s` 408 (a client trickling a small body must not hold a
    handler)."""
    timeout = request.app[SETTINGS].limits.body_timeout_s
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except TimeoutError:
        raise ApiError(408, "body-timeout", f"the body did not arrive within {timeout} s") from None
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON: {exc}", "malformed-json") from exc
    if data is None and not raw:
        raise bad_request("this endpoint needs a JSON body", "malformed-json")
    return validate(model, data)


def validate(model: type[M], data: Any) -> M:
    """Validate `data`, or 422 naming each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "validation-error", format_validation_error(exc)) from exc


def read_query(request: web.Request, model: type[M]) -> M:
    """Validate the query string (repeated keys are refused rather than guessed)."""
    data: dict[str, str] = {}
    for key, value in request.query.items():
        if key in data:
            raise ApiError(422, "validation-error", f"{key}: given more than once")
        data[key] = value
    return validate(model, data)


def path_id(request: web.Request, name: str = "id") -> int:
    """An integer path parameter (routes only match digits; this guards the range)."""
    value = int(request.match_info[name])
    if value > 2**31 - 1:
        raise not_found("object", value)
    return value


def json_response(model: BaseModel, status: int = 200) -> web.Response:
    """Serialise a response model."""
    return web.Response(body=model.model_dump_json().encode(), status=status, content_type="application/json")


def page_of(
    request: web.Request, items: Sequence[BaseModel], total: int, page: int, per_page: int
) -> dict[str, Any]:
    """The list envelope: data, page, per_page, total and links to this and the next page."""
    url = request.rel_url
    nxt = str(url.update_query(page=page + 1, per_page=per_page)) if page * per_page < total else None
    return {
        "data": [i.model_dump(mode="json") for i in items],
        "page": page,
        "per_page": per_page,
        "total": total,
        "links": {"self": str(url), "next": nxt},
    }


def equal_filters(*pairs: tuple[Any, Any]) -> list[ColumnElement[bool]]:
    """`column == value` for each pair whose value the query gave (None means: not filtered)."""
    return [column == value for column, value in pairs if value is not None]


async def paginate(
    s: AsyncSession, model: type[Base], where: list[ColumnElement[bool]], page: int, per_page: int
) -> tuple[list[Any], int]:
    """One page of `model` rows matching `where`, ordered by id, and the total count (counted only when the
    page does not tell it: a page that is neither empty nor full is the last one)."""
    query = select(model).where(*where).order_by(model.id).offset((page - 1) * per_page).limit(per_page)  # type: ignore[attr-defined]
    rows = list((await s.execute(query)).scalars().all())
    if 0 < len(rows) < per_page or (page == 1 and not rows):
        return rows, (page - 1) * per_page + len(rows)
    total = (await s.execute(select(func.count()).select_from(model).where(*where))).scalar_one()
    return rows, int(total)


async def commit_unique(s: AsyncSession, detail: str) -> None:
    """Commit; a clash with an existing unique name answers 409 `exists` with `detail`."""
    try:
        await s.commit()
    except IntegrityError as exc:
        raise conflict("exists", detail) from exc


def own_org(p: auth.Principal, scope: Scope, requested: int | None, detail: str) -> int:
    """The organization a new account belongs to: the caller's own, unless a global scope names another."""
    org_id = requested or p.organization_id
    if scope < Scope.GLOBAL and org_id != p.organization_id:
        raise forbidden(detail)
    return org_id


async def caller(request: web.Request, s: AsyncSession) -> auth.Principal:
    """Who is calling: from the bearer token, checked against the database on every request."""
    cached = request.get(PRINCIPAL)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    claims = _claims(request, auth.bearer(request.headers.get("Authorization")))
    kind = claims.get("kind")
    if kind == "run":
        principal = await _run_principal(request, s, claims)
    elif kind in ("user", "node"):
        principal = await _account_principal(request, s, kind, int(claims["sub"]))
        if claims.get("ver", 0) != principal.token_version:
            raise unauthorized("the token was revoked; log in again", "token-revoked")
    else:
        raise unauthorized("the token is not valid", "invalid-token")
    request[PRINCIPAL] = principal
    return principal


def _claims(request: web.Request, token: str) -> dict[str, Any]:
    """The token's claims: verified once (a JWT decode costs more than the rest of a cached login), then
    taken from the cache until the token expires."""
    cache = request.app[TOKENS]
    claims = cache.get(token)
    if claims is not None and time.time() < claims.get("exp", 0):
        return claims
    claims = auth.decode(request.app[SETTINGS].jwt_secret, token, "access")
    if len(cache) >= TOKENS_MAX:
        cache.clear()
    cache[token] = claims
    return claims


async def _account_principal(request: web.Request, s: AsyncSession, kind: str, ident: int) -> auth.Principal:
    """User or node principal, cached briefly (roles changed through the API drop the cache entry)."""
    cache = request.app[PRINCIPALS]
    now = time.monotonic()
    hit = cache.get((kind, ident))
    if hit is not None and hit[0] > now:
        principal = hit[1]
    else:
        principal = await (_user_principal(s, ident) if kind == "user" else _node_principal(s, ident))
        cache[(kind, ident)] = (now + PRINCIPAL_TTL_S, principal)
    if principal.node_id is not None:
        touch_node(request, principal.node_id)
    return principal


def forget_principal(request: web.Request, kind: str, ident: int) -> None:
    """Drop a cached principal after its account changed."""
    request.app[PRINCIPALS].pop((kind, ident), None)


async def _user_principal(s: AsyncSession, user_id: int) -> auth.Principal:
    user = await s.get(User, user_id, populate_existing=True)
    if user is None:
        raise unauthorized("the user no longer exists", "invalid-token")
    if user.disabled:
        raise unauthorized("the account is disabled", "account-disabled")
    return auth.Principal(
        "user",
        user.organization_id,
        frozenset(r.name for r in user.roles),
        user_id=user.id,
        token_version=user.token_version,
    )


async def _node_principal(s: AsyncSession, node_id: int) -> auth.Principal:
    node = await s.get(Node, node_id, populate_existing=True)
    if node is None:
        raise unauthorized("the node no longer exists", "invalid-token")
    return auth.Principal(
        "node",
        node.organization_id,
        frozenset({"node"}),
        node_id=node.id,
        collaboration_id=node.collaboration_id,
        token_version=node.token_version,
    )


async def _run_principal(request: web.Request, s: AsyncSession, claims: dict[str, Any]) -> auth.Principal:
    run = await s.get(Run, int(claims["run_id"]))
    if run is None or run.status in TERMINAL or run.node_id != int(claims["sub"]):
        raise unauthorized("the run has ended; its token expired with it", "token-expired")
    task = await s.get(Task, run.task_id)
    assert task is not None
    touch_node(request, run.node_id)
    return auth.Principal(
        "run",
        run.organization_id,
        frozenset({"run"}),
        node_id=run.node_id,
        collaboration_id=task.collaboration_id,
        run_id=run.id,
        task_id=task.id,
        job_id=task.job_id if task.job_id is not None else task.id,
    )


def touch_node(request: web.Request, node_id: int) -> datetime:
    """Note that a node was seen (written to the database in batches)."""
    return request.app[PRESENCE].note(node_id)


def node_last_seen(request: web.Request, node: Node) -> datetime | None:
    """Last contact, including contact not yet written to the database."""
    return request.app[PRESENCE].last_seen(node.id, node.last_seen_at)


def node_status(last_seen: datetime | None, window_s: int) -> str:
    """online when seen within the window."""
    if last_seen is None:
        return "offline"
    return "online" if datetime.now(UTC) - last_seen <= timedelta(seconds=window_s) else "offline"
