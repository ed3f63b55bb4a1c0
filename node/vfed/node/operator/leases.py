"""`vnode leases grant|extend|revoke|list`: who may use the organization's datasets, until when, for what.

Lease entries are signed by an org admin's own certified key (`--identity`, see admin.py), never by the
organization's key; the node enforces them (docs/ledger.md). A grant carries the dataset's metadata (schema,
row count, column summaries) sealed to the lease holders (vfed.common.ledger.metadata).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import click

from vfed.common.ledger import Lease, extend_entry, revoke_entry
from vfed.node.config import NodeSettings
from vfed.node.ledger import EXPIRING_WITHIN_S, NodeLedger
from vfed.node.operator import server, when
from vfed.node.operator.admin import admin_of, identity_option, load_identity
from vfed.node.operator.common import CONTEXT, BadInput, OperatorError, load, scope_option, to_scope
from vfed.node.operator.datasets import FORMAT, configured, hash_of
from vfed.node.operator.keys import open_keyring
from vfed.node.operator.lease_grant import Grant, grant_lease
from vfed.node.operator.ledger_access import open_ledger, require_own_chain, run
from vfed.node.operator.paths import resolve

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HELP = """Grant, extend, revoke and list leases on the organization's datasets (org admins).

\b
Lease entries are signed with the admin's own key (--identity, or $VFED_KEY_FILE), certified by the
organization with the org-admin role: `vnode users certify USER --key K --roles org-admin`.
--expires and --not-before take a duration from now (30d, 12h, 2w) or a UTC date or time (2027-01-31,
2027-01-31T12:00). ID is the lease's digest or a unique prefix of it (`vnode leases list`).

\b
Examples:
  vnode leases grant --dataset patients --to 2 --expires 30d --identity ~/admin-key.json hospital-a
  vnode leases grant --dataset patients --to hospital-b --user 14 --image sha256:4f... --max-runs 20 \\
      --epsilon 3 --purpose "readmission study" --expires 2027-01-31 --identity ~/admin-key.json
  vnode leases extend 3fa9c2 --expires 60d --identity ~/admin-key.json
  vnode leases revoke 3fa9c2 --reason "study ended" --identity ~/admin-key.json
  vnode leases list --expiring 7d --format json
"""


@click.group("leases", help=_HELP, context_settings=CONTEXT)
def leases_group() -> None:
    pass


def _images(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    for value in values:
        if not _DIGEST.match(value):
            raise BadInput("--image", f"{value!r} is not an image digest (sha256:<64 hex>)")
    return values


def _organization(settings: NodeSettings, text: str) -> int:
    """An organization id, or the id the server gives the organization of that name."""
    if text.isdigit() and int(text) > 0:
        return int(text)
    found = server.organizations_named(server.login(settings), text)
    if len(found) != 1 or not isinstance(found[0].get("id"), int):
        raise BadInput("--to", f"unknown organization {text!r} (give its id or exact name)")
    return int(found[0]["id"])


@leases_group.command("grant", context_settings=CONTEXT)
@click.argument("name", required=False)
@click.option("--system", "system_scope", is_flag=True, help="A node of the system scope (/etc/vfed).")
@click.option("--dataset", "label", required=True, metavar="LABEL", help="A dataset this node registered.")
@click.option(
    "--to", "grantee_text", required=True, metavar="ORG", help="The grantee: organization id or name."
)
@click.option("--user", "users", multiple=True, type=click.IntRange(min=1), help="Only these users (ids).")
@click.option("--expires", required=True, help="30d, 12h, 2027-01-31, 2027-01-31T12:00 (UTC).")
@click.option("--not-before", default=None, help="Valid from (default: now); same forms as --expires.")
@click.option(
    "--image", "images", multiple=True, callback=_images, help="Allowed image digest [default: any]."
)
@click.option("--epsilon", type=click.FloatRange(min=0, min_open=True), help="Privacy budget cap.")
@click.option("--max-runs", type=click.IntRange(min=1), help="At most this many runs.")
@click.option("--purpose", default="", help="What the data may be used for (at most 2000 characters).")
@click.option("--no-metadata", is_flag=True, help="Do not seal the dataset's metadata into the lease.")
@identity_option
@FORMAT
def grant_command(
    name: str | None,
    system_scope: bool,
    label: str,
    grantee_text: str,
    users: tuple[int, ...],
    expires: str,
    not_before: str | None,
    images: tuple[str, ...],
    epsilon: float | None,
    max_runs: int | None,
    purpose: str,
    no_metadata: bool,
    identity: Path,
    fmt: str,
) -> None:
    """Grant organization ORG (optionally only some of its users) a lease on dataset LABEL.

    Here `--user` names a user of ORG; the node's scope is the user scope unless --system is given."""
    ref = resolve(name, to_scope(not system_scope))
    settings = load(ref)
    dataset = configured(settings, label, ref.name)
    now = time.time()
    expires_at = when.parse_when(expires, now, "--expires")
    start = when.parse_when(not_before, now, "--not-before") if not_before else None
    if expires_at <= max(now, start or now):
        what = "now" if start is None or start <= now else f"--not-before ({when.show(start)})"
        raise BadInput("--expires", f"{expires!r} ({when.show(expires_at)}) is not after {what}")
    if len(purpose) > 2000:
        raise BadInput("--purpose", "at most 2000 characters")
    admin_keyring = load_identity(identity)
    grantee = _organization(settings, grantee_text)
    digest = hash_of(label, dataset)
    keyring, _ = open_keyring(settings)
    terms = Grant(
        label=label,
        content_hash=digest,
        grantee=grantee,
        users=list(users),
        expires_at=expires_at,
        not_before=start,
        images=list(images),
        epsilon=epsilon,
        max_runs=max_runs,
        purpose=purpose,
        source=None if no_metadata else dataset,
    )

    async def work() -> tuple[Lease, list[str]]:
        async with open_ledger(settings, keyring) as ledger:
            require_own_chain(ledger)
            return await grant_lease(ledger, admin_of(ledger, admin_keyring), terms)

    lease, notes = run(settings, work)
    for note in notes:
        click.echo(f"warning: {note}", err=True)
    if fmt == "json":
        click.echo(json.dumps(_row(lease, time.time())))
        return
    who = f" (users {', '.join(map(str, lease.body.users))})" if lease.body.users else ""
    click.echo(
        f"granted lease {lease.id[:12]} on {label} to organization {grantee}{who} until "
        f"{when.show(lease.expires_at)} (ledger entry {lease.seq})"
    )
    click.echo(f"lease {lease.id}")


def find_lease(ledger: NodeLedger, text: str) -> Lease:
    """The lease whose digest starts with `text`, of this organization's datasets."""
    prefix = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{4,64}", prefix):
        raise BadInput("ID", f"{text!r} is not a lease id (at least 4 hex digits)")
    found = [x for x in ledger.state.leases.values() if x.id.startswith(prefix)]
    if not found:
        raise OperatorError(f"no lease {prefix} on the ledger of collaboration {ledger.collaboration_id}")
    if len(found) > 1:
        raise OperatorError(f"lease id {prefix} is ambiguous ({len(found)} leases): give more of it")
    lease = found[0]
    if lease.owner != ledger.organization_id:
        raise OperatorError(
            f"lease {lease.id[:12]} is on a dataset of organization {lease.owner}: only its admins change it"
        )
    return lease


@leases_group.command("extend", context_settings=CONTEXT)
@click.argument("lease_id", metavar="ID")
@click.argument("name", required=False)
@scope_option
@click.option("--expires", required=True, help="The new expiry: 30d (from now), 2027-01-31, ...")
@identity_option
def extend_command(lease_id: str, name: str | None, user_scope: bool, expires: str, identity: Path) -> None:
    """Move lease ID's expiry later (to end it sooner, revoke it)."""
    settings = load(resolve(name, to_scope(user_scope)))
    now = time.time()
    expires_at = when.parse_when(expires, now, "--expires")
    if expires_at <= now:
        raise BadInput("--expires", f"{expires!r} ({when.show(expires_at)}) is in the past")
    admin_keyring = load_identity(identity)
    keyring, _ = open_keyring(settings)

    async def work() -> Lease:
        async with open_ledger(settings, keyring) as ledger:
            lease = find_lease(ledger, lease_id)
            if lease.revoked is not None:
                raise OperatorError(f"lease {lease.id[:12]} was revoked: grant a new one")
            if expires_at <= lease.expires_at:
                raise OperatorError(
                    f"lease {lease.id[:12]} runs until {when.show(lease.expires_at)} already; to end it "
                    "sooner, revoke it"
                )
            admin = admin_of(ledger, admin_keyring)
            entry = extend_entry(
                admin.key,
                collaboration=ledger.collaboration_id,
                lease=lease.id,
                expires_at=expires_at,
                by_user=admin.user_id,
                certificate=admin.certificate.digest,
                seen=ledger.head,
            )
            await ledger.append(entry)
            return ledger.state.leases[lease.id]

    lease = run(settings, work)
    click.echo(f"extended lease {lease.id[:12]} on {lease.dataset.label} until {when.show(lease.expires_at)}")


@leases_group.command("revoke", context_settings=CONTEXT)
@click.argument("lease_id", metavar="ID")
@click.argument("name", required=False)
@scope_option
@click.option("--reason", required=True, help="Kept on the ledger (at most 500 characters).")
@identity_option
def revoke_command(lease_id: str, name: str | None, user_scope: bool, reason: str, identity: Path) -> None:
    """Revoke lease ID now: nodes refuse new runs under it and stop the ones running."""
    settings = load(resolve(name, to_scope(user_scope)))
    if not reason.strip() or len(reason) > 500:
        raise BadInput("--reason", "give a reason of 1 to 500 characters")
    admin_keyring = load_identity(identity)
    keyring, _ = open_keyring(settings)

    async def work() -> Lease:
        async with open_ledger(settings, keyring) as ledger:
            lease = find_lease(ledger, lease_id)
            if lease.revoked is not None:
                raise OperatorError(
                    f"lease {lease.id[:12]} was revoked already ({lease.revoked.reason or 'no reason given'})"
                )
            admin = admin_of(ledger, admin_keyring)
            entry = revoke_entry(
                admin.key,
                collaboration=ledger.collaboration_id,
                lease=lease.id,
                reason=reason.strip(),
                by_user=admin.user_id,
                certificate=admin.certificate.digest,
                seen=ledger.head,
            )
            await ledger.append(entry)
            return ledger.state.leases[lease.id]

    lease = run(settings, work)
    click.echo(f"revoked lease {lease.id[:12]} on {lease.dataset.label} (ledger entry {lease.revoked_seq})")


def _row(lease: Lease, now: float) -> dict[str, Any]:
    body = lease.body
    status = lease.status(now)
    return {
        "id": lease.id,
        "seq": lease.seq,
        "dataset": lease.dataset.label,
        "owner": lease.owner,
        "grantee": lease.grantee,
        "users": body.users,
        "images": body.images,
        "purpose": body.purpose,
        "not_before": when.iso(body.not_before),
        "expires_at": when.iso(lease.expires_at),
        "status": status,
        "runs": lease.runs,
        "max_runs": body.max_runs,
        "epsilon_spent": lease.epsilon_spent,
        "epsilon": body.epsilon,
        "expiring": status == "active" and lease.expires_at - now <= EXPIRING_WITHIN_S,
        "revoked_reason": lease.revoked.reason if lease.revoked is not None else None,
        "metadata": bool(body.metadata),
    }


def _cap(used: float, cap: float | None, digits: bool = False) -> str:
    shown = f"{used:g}" if digits else str(int(used))
    return f"{shown}/{cap:g}" if cap is not None else f"{shown}/-"


@leases_group.command("list", context_settings=CONTEXT)
@click.argument("name", required=False)
@scope_option
@click.option(
    "--expiring", default=None, metavar="SPAN", help="Only active leases expiring within SPAN (7d)."
)
@FORMAT
def list_command(name: str | None, user_scope: bool, expiring: str | None, fmt: str) -> None:
    """Leases on this organization's datasets and leases granted to it; `!` marks those expiring within 7
    days."""
    settings = load(resolve(name, to_scope(user_scope)))
    within_s = when.span(expiring, "--expiring") if expiring else None
    keyring, _ = open_keyring(settings)

    async def work() -> tuple[int, list[dict[str, Any]]]:
        async with open_ledger(settings, keyring) as ledger:
            now, org = time.time(), ledger.organization_id
            leases = sorted(ledger.state.leases.values(), key=lambda x: x.seq)
            rows = [_row(x, now) for x in leases if org in (x.owner, x.grantee)]
            if within_s is not None:
                keep = {x.id for x in ledger.state.expiring(None, within_s, now)}
                rows = [r for r in rows if r["id"] in keep]
            return org, rows

    org, rows = run(settings, work)
    if fmt == "json":
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no lease" + (f" expiring within {expiring}" if expiring else ""))
        return
    click.echo(
        f"  {'ID':<12}  {'DATASET':<16} {'GRANTEE':>7}  {'USERS':<9} {'IMAGES':<8} {'EXPIRES':<17}  "
        f"{'STATUS':<13} {'RUNS':<7} EPSILON"
    )
    for r in rows:
        dataset = r["dataset"] if r["owner"] == org else f"{r['dataset']}@{r['owner']}"
        users = ",".join(map(str, r["users"])) if r["users"] else "any"
        images = str(len(r["images"])) if r["images"] else "any"
        mark = "!" if r["expiring"] else " "
        expires_at = r["expires_at"].replace("T", " ")[:16] + "Z"
        click.echo(
            f"{mark} {r['id'][:12]:<12}  {dataset:<16} {r['grantee']:>7}  {users:<9} {images:<8} "
            f"{expires_at:<17}  {r['status']:<13} {_cap(r['runs'], r['max_runs']):<7} "
            f"{_cap(r['epsilon_spent'], r['epsilon'], digits=True)}"
        )
