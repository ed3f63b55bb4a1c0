"""The audit log, read through the API: root sees every entry, an org-admin its organization's."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import func, select

from vfed.server.access import Scope, require
from vfed.server.api.common import caller, equal_filters, page_of, read_query, session
from vfed.server.models import AuditEntry
from vfed.server.schemas import AuditEntryOut, AuditQuery


async def list_audit(request: web.Request) -> web.Response:
    """Entries newest first, filtered by organization, action or target."""
    q = read_query(request, AuditQuery)
    async with session(request) as s:
        p = await caller(request, s)
        scope = require(p, "audit", "read")
        where = equal_filters(
            (AuditEntry.organization_id, q.organization_id),
            (AuditEntry.action, q.action),
            (AuditEntry.target_kind, q.target_kind),
            (AuditEntry.target_id, q.target_id),
        )
        if scope < Scope.GLOBAL:
            where.append(AuditEntry.organization_id == p.organization_id)
        query = select(AuditEntry).where(*where).order_by(AuditEntry.id.desc())
        rows = (await s.execute(query.offset((q.page - 1) * q.per_page).limit(q.per_page))).scalars().all()
        total = (await s.execute(select(func.count()).select_from(AuditEntry).where(*where))).scalar_one()
    data = [AuditEntryOut.model_validate(r, from_attributes=True) for r in rows]
    return web.json_response(page_of(request, data, int(total), q.page, q.per_page))
