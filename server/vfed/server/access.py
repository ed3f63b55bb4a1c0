"""Roles, their rules, and the SQL filters that make every resource show only what a caller may see.

Invisible objects answer 404 (never 403), so a caller cannot learn that another organization's object exists.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, bindparam, exists, false, or_, select, true

from vfed.server.auth import Principal
from vfed.server.errors import forbidden
from vfed.server.models import (
    Collaboration,
    Node,
    Organization,
    RoleName,
    Run,
    Task,
    User,
    collaboration_members,
)


class Scope(IntEnum):
    """How far a rule reaches, from nothing to everything."""

    NONE = 0
    OWN = 1
    ORGANIZATION = 2
    COLLABORATION = 3
    GLOBAL = 4


S = Scope
_READ_COMMON = {
    ("organization", "read"): S.COLLABORATION,
    ("collaboration", "read"): S.ORGANIZATION,
    ("task", "read"): S.ORGANIZATION,
    ("run", "read"): S.ORGANIZATION,
    ("role", "read"): S.GLOBAL,
}
RULES: dict[str, dict[tuple[str, str], Scope]] = {
    "org-admin": {
        **_READ_COMMON,
        ("organization", "edit"): S.ORGANIZATION,
        ("node", "read"): S.COLLABORATION,
        ("node", "create"): S.ORGANIZATION,
        ("node", "edit"): S.ORGANIZATION,  # rotate its API key
        ("node", "delete"): S.ORGANIZATION,
        ("user", "read"): S.ORGANIZATION,
        ("user", "create"): S.ORGANIZATION,
        ("user", "edit"): S.ORGANIZATION,  # only users whose every role the caller could grant
        ("user", "delete"): S.ORGANIZATION,
        ("audit", "read"): S.ORGANIZATION,
        ("task", "create"): S.COLLABORATION,
        ("task", "kill"): S.ORGANIZATION,
        ("blob", "create"): S.ORGANIZATION,
    },
    "researcher": {
        **_READ_COMMON,
        ("node", "read"): S.COLLABORATION,
        ("user", "read"): S.OWN,
        ("task", "create"): S.COLLABORATION,
        ("task", "kill"): S.OWN,
        ("blob", "create"): S.ORGANIZATION,
    },
    "viewer": {**_READ_COMMON, ("node", "read"): S.ORGANIZATION, ("user", "read"): S.OWN},
    "node": {
        **_READ_COMMON,
        ("organization", "edit"): S.ORGANIZATION,
        ("node", "read"): S.OWN,
        ("run", "claim"): S.ORGANIZATION,
        ("run", "edit"): S.ORGANIZATION,
        ("run", "token"): S.ORGANIZATION,
        ("blob", "create"): S.ORGANIZATION,
    },
    "run": {
        ("organization", "read"): S.COLLABORATION,
        ("collaboration", "read"): S.ORGANIZATION,
        ("task", "read"): S.OWN,
        ("task", "create"): S.OWN,
        ("run", "read"): S.OWN,
        ("blob", "create"): S.ORGANIZATION,
    },
}


def grantable_roles(scope: Scope) -> frozenset[str]:
    """The roles a caller with this user-edit scope may grant, and so the only roles a user it edits, locks or
    deletes may hold: root alone grants root and node."""
    if scope >= Scope.GLOBAL:
        return frozenset(str(r) for r in RoleName)
    return frozenset({RoleName.ORG_ADMIN, RoleName.RESEARCHER, RoleName.VIEWER})


def scope_of(p: Principal, resource: str, op: str) -> Scope:
    """The widest scope any of the caller's roles grants for `resource`/`op`."""
    if "root" in p.roles:
        return Scope.GLOBAL
    return max((RULES.get(r, {}).get((resource, op), S.NONE) for r in p.roles), default=S.NONE)


def require(p: Principal, resource: str, op: str) -> Scope:
    """The scope, or 403 when the caller has none for this operation."""
    scope = scope_of(p, resource, op)
    if scope == Scope.NONE:
        raise forbidden(f"your roles do not allow {op} on {resource}")
    return scope


def member_collaborations(org_id: int) -> Select[int]:
    """Subquery: ids of collaborations `org_id` belongs to."""
    return select(collaboration_members.c.collaboration_id).where(
        collaboration_members.c.organization_id == org_id
    )


def _collab_ids(p: Principal) -> Select[int]:
    if p.kind in ("node", "run"):
        return select(Collaboration.id).where(Collaboration.id == p.collaboration_id)
    return member_collaborations(p.organization_id)


def org_filter(p: Principal, scope: Scope) -> ColumnElement[bool]:
    """Organizations: own, or sharing a collaboration with the caller."""
    if scope == S.GLOBAL:
        return true()
    if scope >= S.COLLABORATION:
        peers = select(collaboration_members.c.organization_id).where(
            collaboration_members.c.collaboration_id.in_(_collab_ids(p))
        )
        return or_(Organization.id == p.organization_id, Organization.id.in_(peers))
    return Organization.id == p.organization_id


def collaboration_filter(p: Principal, scope: Scope) -> ColumnElement[bool]:
    """Collaborations the caller's organization (or node) belongs to."""
    if scope == S.GLOBAL:
        return true()
    return Collaboration.id.in_(_collab_ids(p))


def node_filter(p: Principal, scope: Scope) -> ColumnElement[bool]:
    """Nodes: the node itself, its organization's, or those of shared collaborations."""
    if scope == S.GLOBAL:
        return true()
    if p.kind in ("node", "run"):
        return Node.id == p.node_id
    if scope >= S.COLLABORATION:
        return Node.collaboration_id.in_(_collab_ids(p))
    return Node.organization_id == p.organization_id


def user_filter(p: Principal, scope: Scope) -> ColumnElement[bool]:
    """Users: oneself or one's organization's."""
    if scope == S.GLOBAL:
        return true()
    if scope >= S.ORGANIZATION:
        return User.organization_id == p.organization_id
    return User.id == p.user_id if p.user_id is not None else false()


def _has_run_for_org(org_id: int) -> ColumnElement[bool]:
    return exists().where(and_(Run.task_id == Task.id, Run.organization_id == org_id))


def task_filter(p: Principal, scope: Scope) -> ColumnElement[bool]:
    """Tasks: initiated by or targeting the caller's organization; a run token sees its subtasks."""
    if scope == S.GLOBAL:
        return true()
    if p.kind == "run":
        return or_(Task.id == p.task_id, Task.parent_id == p.task_id)
    if scope == S.OWN:
        return Task.initiator_user_id == p.user_id if p.user_id is not None else false()
    mine = or_(Task.initiator_organization_id == p.organization_id, _has_run_for_org(p.organization_id))
    if p.kind == "node":
        return and_(Task.collaboration_id == p.collaboration_id, mine)
    return mine


def run_filter(p: Principal, scope: Scope) -> ColumnElement[bool]:
    """Runs: the caller's organization's, or of tasks it initiated; a run token sees itself and subtasks."""
    if scope == S.GLOBAL:
        return true()
    if p.kind == "run":
        subtasks = select(Task.id).where(Task.parent_id == p.task_id)
        return or_(Run.id == p.run_id, Run.task_id.in_(subtasks))
    if p.kind == "node":
        return _node_runs(p.organization_id, p.collaboration_id)
    initiated = select(Task.id).where(Task.initiator_organization_id == p.organization_id)
    return or_(Run.organization_id == p.organization_id, Run.task_id.in_(initiated))


def _node_runs(org: Any, collab: Any) -> ColumnElement[bool]:
    """A node's runs: its organization's, of tasks in its collaboration (values or bound parameters)."""
    in_collab = select(Task.id).where(Task.collaboration_id == collab)
    return and_(Run.organization_id == org, Run.task_id.in_(in_collab))


# run_filter of a node with `node_org` and `node_collab` bound at execution, for statements built once
NODE_RUNS = _node_runs(bindparam("node_org"), bindparam("node_collab"))
