"""The audit log of administrative actions (users, roles, nodes, API keys): written in the same transaction
as the change it describes, so an action and its entry are stored together or not at all."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.server.auth import Principal
from vfed.server.models import AuditEntry, Node, User
from vfed.server.state import SETTINGS
from vfed.server.throttle import client_address


async def _actor_name(s: AsyncSession, p: Principal) -> str:
    if p.user_id is not None:
        user = await s.get(User, p.user_id)
        return user.username if user is not None else ""
    if p.node_id is not None:
        node = await s.get(Node, p.node_id)
        return node.name if node is not None else ""
    return ""


async def record(
    request: web.Request,
    s: AsyncSession,
    p: Principal | None,
    action: str,
    target_kind: str,
    target_id: int | None,
    organization_id: int | None,
    target_name: str = "",
    **detail: Any,
) -> None:
    """Add one entry to the session (the caller commits). `p` None: the server itself acted (e.g. it
    revoked a token family). Never pass secrets in `detail`."""
    s.add(
        AuditEntry(
            actor_kind=p.kind if p is not None else "server",
            actor_id=(p.user_id if p.user_id is not None else p.node_id) if p is not None else None,
            actor_name=await _actor_name(s, p) if p is not None else "",
            organization_id=organization_id,
            action=action,
            target_kind=target_kind,
            target_id=target_id,
            target_name=target_name[:200],
            detail=detail,
            address=client_address(request, request.app[SETTINGS].trusted_proxies)[:64],
        )
    )
