"""`vserver import FILE.yaml`: organizations, collaborations, users and nodes, idempotent by name.

Existing objects are left as they are (collaborations gain listed members, whose key records, certificates and
revocations are appended to the collaboration's ledger); a node's API key is printed only
when the node is created, because the server keeps only its hash. An organization's `fingerprint` (of its
first key, as `vnode keys show` prints it) is recorded: the server then refuses another first key. The same
file can give nodes and researchers their pins (`vnode trust import`, `vfed trust import`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.common.crypto.errors import CryptoError
from vfed.common.crypto.keys import PublicKey
from vfed.common.trust import KIND_GENESIS, parse_fingerprint, show_fingerprint
from vfed.server import auth
from vfed.server.config import ConfigError, format_validation_error, yaml_problem
from vfed.server.ledger_store import carry_members
from vfed.server.models import Collaboration, KeyRecord, Node, Organization, Role, RoleName, User

T = TypeVar("T")


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OrgSpec(_In):
    name: str = Field(min_length=1, max_length=200)
    public_key: str | None = None
    fingerprint: str | None = None  # of the organization's first key (`vnode keys show`)


class CollabSpec(_In):
    name: str = Field(min_length=1, max_length=200)
    organizations: list[str] = Field(default_factory=list)
    encrypted: bool = True


class UserSpec(_In):
    username: str = Field(min_length=1, max_length=200)
    password: str = Field(min_length=8)
    organization: str
    roles: list[RoleName] = Field(default_factory=lambda: [RoleName.RESEARCHER])


class NodeSpec(_In):
    name: str = Field(min_length=1, max_length=200)
    organization: str
    collaboration: str


class ImportFile(_In):
    organizations: list[OrgSpec] = Field(default_factory=list)
    collaborations: list[CollabSpec] = Field(default_factory=list)
    users: list[UserSpec] = Field(default_factory=list)
    nodes: list[NodeSpec] = Field(default_factory=list)


def read_import_file(path: Path) -> ImportFile:
    """Parse and validate; errors name the key (e.g. `users.0.organization`)."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from exc
    try:
        return ImportFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {format_validation_error(exc)}") from exc


async def run_import(s: AsyncSession, spec: ImportFile) -> list[str]:
    """Apply `spec`; return report lines (new node keys included, once)."""
    lines: list[str] = []
    roots = _fingerprints(spec)
    orgs = {o.name: o for o in (await s.execute(select(Organization))).scalars()}
    for i, o in enumerate(spec.organizations):
        if o.name in orgs:
            lines += await _record_root(s, orgs[o.name], roots.get(o.name))
            continue
        key_id = None
        if o.public_key:
            try:
                key_id = PublicKey.from_text(o.public_key).key_id
            except CryptoError as exc:
                raise ConfigError(f"organizations.{i}.public_key: {exc}") from exc
        root = roots.get(o.name)
        orgs[o.name] = Organization(name=o.name, public_key=o.public_key, key_id=key_id, root_key_id=root)
        s.add(orgs[o.name])
        shown = f", first key {show_fingerprint(root)}" if root else ""
        lines.append(f"organization {o.name}: created{shown}")
    await s.flush()
    collabs = {c.name: c for c in (await s.execute(select(Collaboration))).scalars()}
    joined: dict[str, list[Organization]] = {}
    for i, c in enumerate(spec.collaborations):
        members = [_named(orgs, n, f"collaborations.{i}.organizations") for n in c.organizations]
        if c.name in collabs:
            have = collabs[c.name].organizations
            added = [m for m in members if m not in have]
            collabs[c.name].organizations = have + added
            joined.setdefault(c.name, []).extend(added)
            continue
        collabs[c.name] = Collaboration(name=c.name, encrypted=c.encrypted, organizations=members)
        s.add(collabs[c.name])
        joined[c.name] = list(members)
        lines.append(f"collaboration {c.name}: created")
    await s.flush()
    for name, added in joined.items():  # what the new members signed about their keys, on the ledger
        await carry_members(s, collabs[name].id, [o.id for o in added])
    lines += await _users(s, spec, orgs)
    lines += await _nodes(s, spec, orgs, collabs)
    await s.commit()
    return lines


def _fingerprints(spec: ImportFile) -> dict[str, str]:
    """Organization name -> key id of its first key, for the organizations the file gives a fingerprint."""
    roots: dict[str, str] = {}
    for i, o in enumerate(spec.organizations):
        if o.fingerprint is None:
            continue
        try:
            root = parse_fingerprint(o.fingerprint)
        except ValueError as exc:
            raise ConfigError(f"organizations.{i}.fingerprint: organization {o.name!r}: {exc}") from None
        if roots.setdefault(o.name, root) != root:
            raise ConfigError(
                f"organizations.{i}.fingerprint: organization {o.name!r} is listed with two fingerprints"
            )
    return roots


async def _record_root(s: AsyncSession, org: Organization, root: str | None) -> list[str]:
    """Record (or change) an existing organization's first key fingerprint; refused when the organization
    published a first key already and it is another one."""
    if root is None or root == org.root_key_id:
        return []
    genesis = select(KeyRecord.key_id).where(
        KeyRecord.organization_id == org.id, KeyRecord.kind == KIND_GENESIS
    )
    published = (await s.execute(genesis)).scalars().first()
    if published is not None and published != root:
        raise ConfigError(
            f"organization {org.name!r}: the file names first key {show_fingerprint(root)}, but the "
            f"organization published first key {show_fingerprint(published)} already; ask its admin which "
            "is right (`vnode keys show` prints it)"
        )
    was = f" (was {show_fingerprint(org.root_key_id)})" if org.root_key_id else ""
    org.root_key_id = root
    return [f"organization {org.name}: first key {show_fingerprint(root)} recorded{was}"]


def _named(table: dict[str, T], name: str, where: str) -> T:
    if name not in table:
        raise ConfigError(f"{where}: unknown name {name!r}")
    return table[name]


async def _users(s: AsyncSession, spec: ImportFile, orgs: dict[str, Organization]) -> list[str]:
    roles = {r.name: r for r in (await s.execute(select(Role))).scalars()}
    existing = set((await s.execute(select(User.username))).scalars())
    lines = []
    for i, u in enumerate(spec.users):
        org = _named(orgs, u.organization, f"users.{i}.organization")
        if u.username in existing:
            continue
        user = User(
            username=u.username,
            password_hash=await auth.hash_password(u.password),
            organization_id=org.id,
            roles=[roles[str(r)] for r in u.roles],
        )
        s.add(user)
        lines.append(f"user {u.username}: created")
    return lines


async def _nodes(
    s: AsyncSession, spec: ImportFile, orgs: dict[str, Organization], collabs: dict[str, Collaboration]
) -> list[str]:
    lines = []
    for i, n in enumerate(spec.nodes):
        org = _named(orgs, n.organization, f"nodes.{i}.organization")
        collab = _named(collabs, n.collaboration, f"nodes.{i}.collaboration")
        if org not in collab.organizations:
            raise ConfigError(f"nodes.{i}: organization {org.name!r} is not in collaboration {collab.name!r}")
        found = await s.execute(
            select(Node.id).where(
                Node.name == n.name, Node.organization_id == org.id, Node.collaboration_id == collab.id
            )
        )
        if found.first() is not None:
            lines.append(f"node {n.name}: exists; its key is not shown again")
            continue
        key_id, api_key, key_hash = auth.new_api_key()
        s.add(
            Node(
                name=n.name,
                organization_id=org.id,
                collaboration_id=collab.id,
                api_key_id=key_id,
                api_key_hash=key_hash,
            )
        )
        lines.append(f"node {n.name}: created; API key (shown once): {api_key}")
    return lines
