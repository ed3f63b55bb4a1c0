"""`vserver user|organization|collaboration`: the server operator's administration, straight on the database.

For the operator who has no API account yet (the first root) or lost root's password. The same rules as the
API: the API's password and name checks (`schemas.UserIn`, `UserPatch`, `OrganizationIn`, `CollaborationIn`),
argon2id hashes (`auth.hash_password`), a password change or a disabling revokes the user's tokens
(`token_version`), members joining a collaboration carry their key records onto its ledger (`carry_members`),
and every change is audited (actor kind `cli`, actor name the local account running the command).
A running server refuses revoked tokens within its principal cache's lifetime (`PRINCIPAL_TTL_S`, 5 s).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import BaseModel, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.server import auth, db
from vfed.server.config import ConfigError, format_validation_error
from vfed.server.ledger_store import carry_members
from vfed.server.models import AuditEntry, Collaboration, Organization, Role, RoleName, User
from vfed.server.schemas import CollaborationIn, OrganizationIn, UserIn, UserPatch

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# what the operator may grant: everything root may, but the node role, which belongs to nodes' logins
ROLE_CHOICES = [str(r) for r in RoleName if r != RoleName.NODE]

_config = click.option("--config", "config", type=click.Path(path_type=Path), help="YAML config file")
_data_dir = click.option("--data-dir", type=click.Path(path_type=Path), help="SQLite and blobs folder")
_format = click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
_password_file = click.option(
    "--password-file",
    type=click.File("r"),
    help="read the password from FILE (`-`: standard input; its first line); default: a hidden prompt, twice",
)


class AdminError(Exception):
    """A refusal for the operator: one line, exit code 1."""


def _valid(model: type[M], **data: Any) -> M:
    """The API's own validation of `data`, or one line naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise AdminError(format_validation_error(exc)) from None


def _password(source: Any) -> str:
    """From --password-file (first line, without its line end) or a hidden prompt typed twice; never argv."""
    if source is not None:
        return str(source.readline()).rstrip("\r\n")
    if not sys.stdin.isatty():
        raise click.UsageError("no terminal to prompt for the password on: give --password-file FILE or -")
    return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))


def _run(config: Path | None, data_dir: Path | None, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Open the configured database (an empty one gets the schema; an older one is refused as by `start`),
    run `work` in one session, and turn every failure into one line and exit code 1."""
    from vfed.server.cli import _fail, _settings  # here: `python -m vfed.server.cli` loads cli as __main__

    settings = _settings(config, data_dir=data_dir)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # alembic's chatter is not the answer
        logging.getLogger("alembic").setLevel(logging.WARNING)

    async def go() -> T:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = db.open_engine(settings.db_url())
        try:
            await db.prepare(engine, upgrade_schema=False)
            async with db.make_sessionmaker(engine)() as s:
                return await work(s)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(go())
    except (AdminError, ConfigError, db.DatabaseError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{exc.filename or settings.data_dir}: {exc.strerror or exc}")
    raise AssertionError("unreachable")


def _operator() -> str:
    try:
        return getpass.getuser()[:200]
    except (KeyError, OSError):  # no name for this uid (a container without a passwd entry)
        return ""


def _audit(
    s: AsyncSession,
    action: str,
    target_kind: str,
    target_id: int | None,
    organization_id: int | None,
    target_name: str,
    **detail: Any,
) -> None:
    """What `audit.record` writes for an API caller, with the operator's command line as the actor."""
    s.add(
        AuditEntry(
            actor_kind="cli",
            actor_id=None,
            actor_name=_operator(),
            organization_id=organization_id,
            action=action,
            target_kind=target_kind,
            target_id=target_id,
            target_name=target_name[:200],
            detail=detail,
            address="",
        )
    )


async def _commit(s: AsyncSession, clash: str) -> None:
    try:
        await s.commit()
    except IntegrityError:
        raise AdminError(clash) from None


async def _by_name_or_id(s: AsyncSession, model: type[Organization] | type[Collaboration], ref: str) -> Any:
    """An organization or collaboration by its name, else by its id; unknown ones in one line."""
    found = (await s.execute(select(model).where(model.name == ref))).scalar_one_or_none()
    if found is None and ref.isdigit() and int(ref) <= 2**31 - 1:
        found = await s.get(model, int(ref))
    if found is None:
        kind = "organization" if model is Organization else "collaboration"
        raise AdminError(f"unknown {kind} {ref!r} (give its name or id)")
    return found


async def _user(s: AsyncSession, username: str) -> User:
    u = (await s.execute(select(User).where(User.username == username))).scalar_one_or_none()
    if u is None:
        raise AdminError(f"unknown user {username!r}")
    return u


def _show(rows: list[dict[str, Any]], fmt: str, columns: Sequence[str]) -> None:
    """A listing as JSON (a list of objects) or an aligned table."""
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return

    def cell(v: Any) -> str:
        if isinstance(v, list):
            return ",".join(str(x) for x in v) or "-"
        if v is None:
            return "-"
        return str(v).lower() if isinstance(v, bool) else str(v)

    table = [list(columns)] + [[cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


# --- users --------------------------------------------------------------------------------------------------


@click.group("user")
def user_group() -> None:
    """Server accounts, on the database directly (the first root, a lost password)."""


@user_group.command("create")
@click.argument("username")
@click.option("--organization", "org", required=True, metavar="ORG", help="its organization (name or id)")
@click.option(
    "--role",
    "roles",
    multiple=True,
    type=click.Choice(ROLE_CHOICES),
    help="repeatable [researcher]",
)
@_password_file
@_config
@_data_dir
def user_create(
    username: str,
    org: str,
    roles: tuple[str, ...],
    password_file: Any,
    config: Path | None,
    data_dir: Path | None,
) -> None:
    """Create USERNAME in ORG with a password (never given on the command line)."""
    password = _password(password_file)
    chosen = list(dict.fromkeys(roles)) or [str(RoleName.RESEARCHER)]

    async def work(s: AsyncSession) -> str:
        organization = await _by_name_or_id(s, Organization, org)
        body = _valid(
            UserIn, username=username, password=password, organization_id=organization.id, roles=chosen
        )
        if (await s.execute(select(User.id).where(User.username == body.username))).first() is not None:
            raise AdminError(f"the username {body.username!r} is taken")
        wanted = [str(r) for r in body.roles]
        granted = list((await s.execute(select(Role).where(Role.name.in_(wanted)))).scalars())
        u = User(
            username=body.username,
            password_hash=await auth.hash_password(body.password),
            organization_id=organization.id,
            roles=granted,
        )
        s.add(u)
        await s.flush()
        names = [r.name for r in u.roles]
        _audit(s, "user.create", "user", u.id, organization.id, u.username, roles=names)
        await _commit(s, f"the username {body.username!r} is taken")
        where = f"in organization {organization.name}"
        return f"user {u.username}: created (id {u.id}) {where}, roles {', '.join(names)}"

    click.echo(_run(config, data_dir, work))


@user_group.command("reset-password")
@click.argument("username")
@_password_file
@_config
@_data_dir
def user_reset_password(
    username: str, password_file: Any, config: Path | None, data_dir: Path | None
) -> None:
    """Give USERNAME a new password; every token the user holds is revoked."""
    password = _password(password_file)

    async def work(s: AsyncSession) -> str:
        u = await _user(s, username)
        body = _valid(UserPatch, password=password)
        assert body.password is not None
        u.password_hash = await auth.hash_password(body.password)
        u.token_version += 1
        _audit(s, "user.password", "user", u.id, u.organization_id, u.username)
        await s.commit()
        return f"user {u.username}: password changed; their tokens are revoked"

    click.echo(_run(config, data_dir, work))


@user_group.command("list")
@_format
@_config
@_data_dir
def user_list(fmt: str, config: Path | None, data_dir: Path | None) -> None:
    """Every user, with organization, roles and whether disabled."""

    async def work(s: AsyncSession) -> list[dict[str, Any]]:
        orgs = {o.id: o.name for o in (await s.execute(select(Organization))).scalars()}
        users = (await s.execute(select(User).order_by(User.id))).scalars()
        return [
            {
                "id": u.id,
                "username": u.username,
                "organization_id": u.organization_id,
                "organization": orgs.get(u.organization_id, ""),
                "roles": [r.name for r in u.roles],
                "disabled": u.disabled,
            }
            for u in users
        ]

    rows = _run(config, data_dir, work)
    _show(rows, fmt, ["id", "username", "organization", "roles", "disabled"])


def _set_disabled(username: str, disabled: bool, config: Path | None, data_dir: Path | None) -> None:
    async def work(s: AsyncSession) -> str:
        u = await _user(s, username)
        state = "disabled" if disabled else "enabled"
        if u.disabled == disabled:
            return f"user {u.username}: already {state}"
        u.disabled = disabled
        if disabled:
            u.token_version += 1
        action = "user.disable" if disabled else "user.enable"
        _audit(s, action, "user", u.id, u.organization_id, u.username)
        await s.commit()
        return f"user {u.username}: {state}" + ("; their tokens are revoked" if disabled else "")

    click.echo(_run(config, data_dir, work))


@user_group.command("disable")
@click.argument("username")
@_config
@_data_dir
def user_disable(username: str, config: Path | None, data_dir: Path | None) -> None:
    """USERNAME can no longer log in; its tokens are revoked."""
    _set_disabled(username, True, config, data_dir)


@user_group.command("enable")
@click.argument("username")
@_config
@_data_dir
def user_enable(username: str, config: Path | None, data_dir: Path | None) -> None:
    """USERNAME may log in again (with its password)."""
    _set_disabled(username, False, config, data_dir)


# --- organizations ------------------------------------------------------------------------------------------


@click.group("organization")
def organization_group() -> None:
    """Organizations, on the database directly."""


@organization_group.command("create")
@click.argument("name")
@_config
@_data_dir
def organization_create(name: str, config: Path | None, data_dir: Path | None) -> None:
    """Create organization NAME (its admin publishes its key later, `vnode keys`)."""

    async def work(s: AsyncSession) -> str:
        body = _valid(OrganizationIn, name=name)
        clash = f"an organization named {body.name!r} exists"
        if (await s.execute(select(Organization.id).where(Organization.name == body.name))).first():
            raise AdminError(clash)
        org = Organization(name=body.name)
        s.add(org)
        await s.flush()
        _audit(s, "organization.create", "organization", org.id, org.id, org.name)
        await _commit(s, clash)
        return f"organization {org.name}: created (id {org.id})"

    click.echo(_run(config, data_dir, work))


@organization_group.command("list")
@_format
@_config
@_data_dir
def organization_list(fmt: str, config: Path | None, data_dir: Path | None) -> None:
    """Every organization, with its current key id and collaborations."""

    async def work(s: AsyncSession) -> list[dict[str, Any]]:
        collabs = list((await s.execute(select(Collaboration).order_by(Collaboration.id))).scalars())
        orgs = (await s.execute(select(Organization).order_by(Organization.id))).scalars()
        return [
            {
                "id": o.id,
                "name": o.name,
                "key_id": o.key_id,
                "collaborations": [c.name for c in collabs if o in c.organizations],
            }
            for o in orgs
        ]

    _show(_run(config, data_dir, work), fmt, ["id", "name", "key_id", "collaborations"])


# --- collaborations -----------------------------------------------------------------------------------------


@click.group("collaboration")
def collaboration_group() -> None:
    """Collaborations, on the database directly."""


@collaboration_group.command("create")
@click.argument("name")
@click.option(
    "--organization", "orgs", multiple=True, metavar="ORG", help="a member (name or id); repeatable"
)
@click.option("--unencrypted", is_flag=True, help="results are not end-to-end encrypted (default: they are)")
@_config
@_data_dir
def collaboration_create(
    name: str, orgs: tuple[str, ...], unencrypted: bool, config: Path | None, data_dir: Path | None
) -> None:
    """Create collaboration NAME with the given member organizations."""

    async def work(s: AsyncSession) -> str:
        members: list[Organization] = []
        for ref in orgs:
            org = await _by_name_or_id(s, Organization, ref)
            if org not in members:
                members.append(org)
        ids = [o.id for o in members]
        body = _valid(CollaborationIn, name=name, organization_ids=ids, encrypted=not unencrypted)
        clash = f"a collaboration named {body.name!r} exists"
        if (await s.execute(select(Collaboration.id).where(Collaboration.name == body.name))).first():
            raise AdminError(clash)
        c = Collaboration(name=body.name, encrypted=body.encrypted, organizations=members)
        s.add(c)
        try:
            await s.flush()
        except IntegrityError:
            raise AdminError(clash) from None
        await carry_members(s, c.id, ids)
        names = [o.name for o in members]
        _audit(s, "collaboration.create", "collaboration", c.id, None, c.name, organizations=names)
        await _commit(s, clash)
        listed = ", ".join(names) or "none yet"
        return f"collaboration {c.name}: created (id {c.id}), organizations: {listed}"

    click.echo(_run(config, data_dir, work))


@collaboration_group.command("list")
@_format
@_config
@_data_dir
def collaboration_list(fmt: str, config: Path | None, data_dir: Path | None) -> None:
    """Every collaboration with its member organizations."""

    async def work(s: AsyncSession) -> list[dict[str, Any]]:
        rows = (await s.execute(select(Collaboration).order_by(Collaboration.id))).scalars()
        return [
            {
                "id": c.id,
                "name": c.name,
                "encrypted": c.encrypted,
                "organizations": [o.name for o in c.organizations],
            }
            for c in rows
        ]

    _show(_run(config, data_dir, work), fmt, ["id", "name", "encrypted", "organizations"])


@collaboration_group.command("add-organization")
@click.argument("collab", metavar="COLLAB")
@click.argument("org", metavar="ORG")
@_config
@_data_dir
def collaboration_add_organization(collab: str, org: str, config: Path | None, data_dir: Path | None) -> None:
    """Make ORG a member of COLLAB (names or ids); its key records go onto the collaboration's ledger."""

    async def work(s: AsyncSession) -> str:
        c = await _by_name_or_id(s, Collaboration, collab)
        o = await _by_name_or_id(s, Organization, org)
        if o in c.organizations:
            return f"organization {o.name} is already in collaboration {c.name}"
        c.organizations = [*c.organizations, o]
        await s.flush()
        await carry_members(s, c.id, [o.id])
        _audit(s, "collaboration.add-organization", "collaboration", c.id, o.id, c.name, organization=o.name)
        await s.commit()
        return f"collaboration {c.name}: organization {o.name} added"

    click.echo(_run(config, data_dir, work))


def register(main: click.Group) -> None:
    """Add the admin groups to `vserver`."""
    for group in (user_group, organization_group, collaboration_group):
        main.add_command(group)
