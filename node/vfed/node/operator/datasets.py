"""`vnode datasets register|list|check`: the organization's datasets on its collaboration's ledger, and a look
at what the node's own datasets hold (`check`, module dataset_check).

A registration names the dataset's label, a public description and its content hash (docs/ledger.md); it is
signed with the organization's current key. Leases are granted on the latest registration of a label.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from vfed.common.ledger import Dataset, dataset_entry
from vfed.common.ledger.metadata import MetadataError, content_hash
from vfed.node.config import DatasetConfig, NodeSettings
from vfed.node.ledger import NodeLedger
from vfed.node.operator import when
from vfed.node.operator.common import CONTEXT, BadInput, OperatorError, load, scope_option, to_scope
from vfed.node.operator.dataset_check import check_command
from vfed.node.operator.keys import open_keyring
from vfed.node.operator.ledger_access import open_ledger, require_own_chain, run
from vfed.node.operator.paths import resolve

_HELP = """Register the node's datasets on the collaboration's ledger, list the datasets on it, or check what
the node's own datasets hold (rows, columns, problems).

\b
Examples:
  vnode datasets register patients hospital-a --description "admissions 2019-2024, one row per stay"
  vnode datasets list hospital-a --format json
  vnode datasets check hospital-a
"""

FORMAT = click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)


@click.group("datasets", help=_HELP, context_settings=CONTEXT)
def datasets_group() -> None:
    pass


datasets_group.add_command(check_command)


def configured(settings: NodeSettings, label: str, name: str) -> DatasetConfig:
    """The dataset LABEL of the node's config, or one line saying which labels there are."""
    found = settings.datasets.get(label)
    if found is None:
        have = ", ".join(sorted(settings.datasets)) or "none"
        raise OperatorError(
            f"dataset {label!r} is not in node {name}'s config (it has: {have}); add it with `vnode new "
            f"{name} --dataset {label}=PATH --force` or edit the config"
        )
    return found


def hash_of(label: str, dataset: DatasetConfig) -> str | None:
    try:
        return content_hash(dataset.uri, dataset.type)
    except MetadataError as exc:
        raise OperatorError(f"dataset {label!r}: {exc.message}") from None


@datasets_group.command("register", context_settings=CONTEXT)
@click.argument("label")
@click.argument("name", required=False)
@scope_option
@click.option("--description", default="", help="Public: every member of the collaboration reads it.")
@FORMAT
def register_command(label: str, name: str | None, user_scope: bool, description: str, fmt: str) -> None:
    """Register dataset LABEL of the node's config: its content hash, signed with the organization's key.

    The content hash is the SHA-256 of the file (a folder: of its files' paths and hashes; a `sql` URL has
    none). Registering again with the same content and description changes nothing."""
    ref = resolve(name, to_scope(user_scope))
    settings = load(ref)
    dataset = configured(settings, label, ref.name)
    if len(description) > 2000:
        raise BadInput("--description", "at most 2000 characters")
    digest = hash_of(label, dataset)
    keyring, _ = open_keyring(settings)

    async def work() -> tuple[Dataset, bool]:
        async with open_ledger(settings, keyring) as ledger:
            require_own_chain(ledger)
            org = ledger.organization_id
            known = ledger.state.dataset(org, label)
            if known is not None and known.content_hash == digest and known.description == description:
                return known, False
            entry = dataset_entry(
                keyring.current,
                collaboration=ledger.collaboration_id,
                organization=org,
                label=label,
                seen=ledger.head,
                description=description,
                content_hash=digest,
            )
            await ledger.append(entry)
            return ledger.state.datasets[entry.digest], True

    found, new = run(settings, work)
    if fmt == "json":
        click.echo(json.dumps({**_row(found, 0), "new": new}))
        return
    shown = f"content sha256 {found.content_hash}" if found.content_hash else "no content hash (a database)"
    if new:
        click.echo(f"registered dataset {label} ({shown}) as ledger entry {found.seq}, {found.digest[:12]}")
    else:
        click.echo(f"dataset {label} is registered already with this content (ledger entry {found.seq})")


def _row(dataset: Dataset, active: int) -> dict[str, Any]:
    return {
        "id": dataset.digest,
        "seq": dataset.seq,
        "owner": dataset.org,
        "label": dataset.label,
        "description": dataset.description,
        "content_hash": dataset.content_hash,
        "registered_at": when.iso(dataset.at),
        "active_leases": active,
    }


def latest(ledger: NodeLedger) -> list[Dataset]:
    """The latest registration of each (owner, label), in ledger order."""
    newest: dict[tuple[int, str], Dataset] = {}
    for dataset in sorted(ledger.state.datasets.values(), key=lambda d: d.seq):
        newest[(dataset.org, dataset.label)] = dataset
    return sorted(newest.values(), key=lambda d: d.seq)


@datasets_group.command("list", context_settings=CONTEXT)
@click.argument("name", required=False)
@scope_option
@FORMAT
def list_command(name: str | None, user_scope: bool, fmt: str) -> None:
    """The datasets on the collaboration's ledger: owner, label, when registered, active leases."""
    settings = load(resolve(name, to_scope(user_scope)))
    keyring, _ = open_keyring(settings)

    async def work() -> list[tuple[Dataset, int]]:
        async with open_ledger(settings, keyring) as ledger:
            now = time.time()
            rows = []
            for dataset in latest(ledger):
                leases = ledger.state.leases_on(dataset.org, dataset.label)
                rows.append((dataset, sum(1 for lease in leases if lease.status(now) == "active")))
            return rows

    rows = run(settings, work)
    if fmt == "json":
        click.echo(json.dumps([_row(dataset, active) for dataset, active in rows]))
        return
    if not rows:
        click.echo("no dataset is registered on the ledger")
        return
    click.echo(f"{'OWNER':>6}  {'LABEL':<20} {'REGISTERED':<17}  {'LEASES':>6}  {'CONTENT':<12}  DESCRIPTION")
    for dataset, active in rows:
        content = (dataset.content_hash or "-")[:12]
        click.echo(
            f"{dataset.org:>6}  {dataset.label:<20} {when.show(dataset.at):<17}  {active:>6}  "
            f"{content:<12}  {dataset.description}"
        )
