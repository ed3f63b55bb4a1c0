"""Nodes: one agent of an organization in a collaboration; its API key is shown once, at creation or
rotation. Creating, deleting and rotating are audited."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.common.api import resources as res
from vfed.server import audit, auth
from vfed.server.access import Scope, node_filter, require, scope_of
from vfed.server.api.common import (
    caller,
    forget_principal,
    json_response,
    node_last_seen,
    node_status,
    own_org,
    page_of,
    paginate,
    path_id,
    read_json,
    read_query,
    session,
    touch_node,
)
from vfed.server.auth import Principal
from vfed.server.broker_auth import BROKER
from vfed.server.errors import ApiError, forbidden, not_found
from vfed.server.models import Collaboration, Node
from vfed.server.schemas import NodeCreatedOut, NodeIn, NodeQuery
from vfed.server.state import SESSIONS, SETTINGS


def out(request: web.Request, n: Node) -> res.Node:
    """The node as the API shows it (never its key)."""
    seen = node_last_seen(request, n)
    return res.Node(
        id=n.id,
        name=n.name,
        organization_id=n.organization_id,
        collaboration_id=n.collaboration_id,
        status=node_status(seen, request.app[SETTINGS].online_window_s),
        last_seen_at=seen,
        links={
            "self": f"/api/v1/nodes/{n.id}",
            "organization": f"/api/v1/organizations/{n.organization_id}",
            "collaboration": f"/api/v1/collaborations/{n.collaboration_id}",
        },
    )


async def list_nodes(request: web.Request) -> web.Response:
    """Nodes the caller may see."""
    q = read_query(request, NodeQuery)
    async with session(request) as s:
        p = await caller(request, s)
        where = [node_filter(p, require(p, "node", "read"))]
        if q.organization_id is not None:
            where.append(Node.organization_id == q.organization_id)
        if q.collaboration_id is not None:
            where.append(Node.collaboration_id == q.collaboration_id)
        rows, total = await paginate(s, Node, where, q.page, q.per_page)
    return web.json_response(page_of(request, [out(request, n) for n in rows], total, q.page, q.per_page))


async def get_node(request: web.Request) -> web.Response:
    """One node."""
    nid = path_id(request)
    async with session(request) as s:
        p = await caller(request, s)
        where = node_filter(p, require(p, "node", "read"))
        n = (await s.execute(select(Node).where(Node.id == nid, where))).scalar_one_or_none()
    if n is None:
        raise not_found("node", nid)
    return json_response(out(request, n))


async def node_self(request: web.Request) -> web.Response:
    """The calling node."""
    async with session(request) as s:
        p = await caller(request, s)
        if p.kind not in ("node", "run") or p.node_id is None:
            raise forbidden("only a node token has a self")
        n = await s.get(Node, p.node_id, populate_existing=True)
    assert n is not None
    return json_response(out(request, n))


async def heartbeat(request: web.Request) -> web.Response:
    """Record that the node is alive; nothing else."""
    async with session(request) as s:
        p = await caller(request, s)
        if p.kind != "node" or p.node_id is None:
            raise forbidden("only a node token sends heartbeats")
        n = await s.get(Node, p.node_id)
        assert n is not None
        touch_node(request, n.id)
    return json_response(out(request, n))


async def create_node(request: web.Request) -> web.Response:
    """Org-admin (own organization) or root: a node and its API key, answered once."""
    body = await read_json(request, NodeIn)
    async with session(request) as s:
        p = await caller(request, s)
        scope = require(p, "node", "create")
        org_id = own_org(
            p, scope, body.organization_id, "you may create nodes for your own organization only"
        )
        collab = await s.get(Collaboration, body.collaboration_id)
        if collab is None or (
            scope < Scope.GLOBAL and p.organization_id not in {o.id for o in collab.organizations}
        ):
            raise not_found("collaboration", body.collaboration_id)
        if org_id not in {o.id for o in collab.organizations}:
            raise ApiError(
                422, "validation-error", f"organization {org_id} is not in collaboration {collab.id}"
            )
        key_id, api_key, key_hash = auth.new_api_key()
        n = Node(
            name=body.name or f"node-{org_id}-{collab.id}",
            organization_id=org_id,
            collaboration_id=collab.id,
            api_key_id=key_id,
            api_key_hash=key_hash,
        )
        s.add(n)
        await s.flush()
        await audit.record(request, s, p, "node.create", "node", n.id, org_id, n.name)
        await s.commit()
    base = out(request, n)
    return json_response(NodeCreatedOut(**base.model_dump(), api_key=api_key), 201)


async def _managed_node(request: web.Request, s: AsyncSession, p: Principal, op: str) -> Node:
    """A node the caller may `op`: invisible ones are 404, visible ones of another organization 403."""
    nid = path_id(request)
    read_scope = scope_of(p, "node", "read")
    n = None
    if read_scope > Scope.NONE:
        query = select(Node).where(Node.id == nid, node_filter(p, read_scope))
        n = (await s.execute(query)).scalar_one_or_none()
    if n is None:
        raise not_found("node", nid)
    scope = require(p, "node", op)
    if scope < Scope.GLOBAL and n.organization_id != p.organization_id:
        raise forbidden(f"node {nid} belongs to another organization")
    return n


async def delete_node(request: web.Request) -> web.Response:
    """Root or the node's org-admin: the node, its API key and its tokens are gone (its runs stay)."""
    async with session(request) as s:
        p = await caller(request, s)
        n = await _managed_node(request, s, p, "delete")
        await audit.record(request, s, p, "node.delete", "node", n.id, n.organization_id, n.name)
        await s.delete(n)
        await s.commit()
    forget_principal(request, "node", n.id)
    await request.app[BROKER].sync(request.app[SESSIONS])  # its broker account is gone
    return web.Response(status=204)


async def rotate_api_key(request: web.Request) -> web.Response:
    """Root or the node's org-admin: a new API key, answered once; the old key and every token issued to
    the node are refused from now on."""
    async with session(request) as s:
        p = await caller(request, s)
        n = await _managed_node(request, s, p, "edit")
        key_id, api_key, key_hash = auth.new_api_key()
        n.api_key_id, n.api_key_hash = key_id, key_hash
        n.token_version += 1
        n.broker_password_hash = None  # the old broker password dies with the key; the next login sets one
        await audit.record(request, s, p, "node.rotate-key", "node", n.id, n.organization_id, n.name)
        await s.commit()
    forget_principal(request, "node", n.id)
    await request.app[BROKER].sync(request.app[SESSIONS])
    base = out(request, n)
    return json_response(NodeCreatedOut(**base.model_dump(), api_key=api_key))
