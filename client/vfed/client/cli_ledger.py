"""`vfed datasets`, `vfed leases`, `vfed receipts`: what the collaborations' ledgers say to you, verified by
this client (a ledger that does not verify is one line naming the entry, exit 1)."""

from __future__ import annotations

import json
import re
from typing import Any

import click

from vfed.client.catalog import DatasetInfo, LeaseInfo, ReceiptInfo, when
from vfed.client.cli_common import FORMAT, handled, run

COLLABORATION = click.option(
    "--collaboration",
    "collaboration",
    type=click.IntRange(min=1),
    default=None,
    help="one collaboration's ledger (default: every collaboration you see)",
)
UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Duration(click.ParamType[float]):
    """`7d`, `12h`, `30m`, `90s`, `2w` (a bare number is days) -> seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(value).lower())
        if found is None:
            self.fail(f"{value!r} is not a duration like 7d, 12h, 30m", param, ctx)
        return float(found.group(1)) * UNITS_S[found.group(2) or "d"]


@click.group()
def datasets() -> None:
    """Datasets on the collaborations' ledgers, with your leases on them."""


@datasets.command("list")
@COLLABORATION
@FORMAT
@handled
def datasets_list(collaboration: int | None, fmt: str) -> None:
    """Every dataset on the ledger: owner, label, description; your lease and, where your key opens it, the
    metadata sealed to lease holders (schema, rows, column summaries).

    Example: vfed datasets list --collaboration 1 --format json
    """
    found: list[DatasetInfo] = run(lambda c: c.datasets(collaboration))
    if fmt == "json":
        click.echo(json.dumps([d.to_dict() for d in found], default=str))
        return
    if not found:
        click.echo("no datasets on the ledger")
        return
    for item in found:
        lease = item.lease
        terms = "no lease for you" if lease is None else f"lease {lease.id[:12]} {_terms(lease)}"
        meta = item.metadata
        shown = f"  {meta.rows} rows, {len(meta.columns)} columns" if meta is not None else ""
        click.echo(
            f"{item.collaboration_id:>4}  org {item.owner:<4} {item.label:<24} {terms}{shown}"
            + (f"  - {item.description}" if item.description else "")
        )


@click.group()
def leases() -> None:
    """Leases on datasets granted to your organization (and to you)."""


@leases.command("list")
@COLLABORATION
@click.option(
    "--expiring",
    "expiring_s",
    type=Duration(),
    default=None,
    help="only active leases expiring within this time (7d, 12h, 30m)",
)
@FORMAT
@handled
def leases_list(collaboration: int | None, expiring_s: float | None, fmt: str) -> None:
    """Your leases: status (active, expired, revoked, exhausted), expiry, images, runs and epsilon used.

    Example: vfed leases list --expiring 7d
    """
    found: list[LeaseInfo] = run(lambda c: c.leases(collaboration, expiring_within_s=expiring_s))
    if fmt == "json":
        click.echo(json.dumps([x.to_dict() for x in found], default=str))
        return
    if not found:
        click.echo("no leases" + (" expiring that soon" if expiring_s is not None else ""))
        return
    for lease in found:
        images = "any image" if lease.images is None else f"{len(lease.images)} image(s)"
        click.echo(
            f"{lease.id[:12]}  {lease.collaboration_id:>4}  org {lease.owner:<4} {lease.dataset_label:<24} "
            f"{_terms(lease)}  {images}" + (f"  - {lease.purpose}" if lease.purpose else "")
        )


def _terms(lease: LeaseInfo) -> str:
    runs = f"runs {lease.runs_used}/{lease.max_runs if lease.max_runs is not None else '-'}"
    epsilon = (
        f" epsilon {lease.epsilon_used:g}/{lease.epsilon_cap:g}" if lease.epsilon_cap is not None else ""
    )
    status = lease.status.value
    if lease.revoked_reason:
        status += f" ({lease.revoked_reason})"
    return f"{status:<10} until {when(lease.expires_at)}  {runs}{epsilon}"


@click.group()
def receipts() -> None:
    """Receipts of runs on the ledger, signed by the organizations that ran them."""


@receipts.command("list")
@COLLABORATION
@click.option("--task", "task_id", type=click.IntRange(min=1), default=None, help="only this task's runs")
@FORMAT
@handled
def receipts_list(collaboration: int | None, task_id: int | None, fmt: str) -> None:
    """Run receipts: organization, task, run, image, status and the leases and epsilon each run used.

    Example: vfed receipts list --task 12 --format json
    """
    found: list[ReceiptInfo] = run(lambda c: c.receipts(collaboration, task=task_id))
    if fmt == "json":
        click.echo(json.dumps([r.to_dict() for r in found], default=str))
        return
    if not found:
        click.echo("no receipts")
        return
    for item in found:
        used = ", ".join(str(d.get("label")) for d in item.datasets) or "no dataset"
        click.echo(
            f"{item.seq:>6}  org {item.organization_id:<4} task {item.task_id:<6} run {item.run_id:<6} "
            f"{item.status:<10} {when(item.finished_at)}  {used}  {item.image}"
        )
