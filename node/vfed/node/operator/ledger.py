"""`vnode ledger verify|history|receipts`: the collaboration's ledger as this node verifies it.

`verify` reads the whole ledger afresh, verifies every entry, and compares it with the node's local copy (the
one the CLI keeps in the node's data folder and, for a dockerized node, the agent's in its volume) and every
head the node has seen (descriptors, receipts, checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import click
import docker
import docker.errors

from vfed.common.ledger import LedgerError, Receipt, Record, VerifyReport
from vfed.node.ledger import LEDGER_FILE, NodeLedger
from vfed.node.operator import when
from vfed.node.operator.common import CONTEXT, OperatorError, load, scope_option, to_scope
from vfed.node.operator.datasets import FORMAT
from vfed.node.operator.history import describe, entry_time, touches
from vfed.node.operator.keys import open_keyring
from vfed.node.operator.ledger_access import open_ledger, run
from vfed.node.operator.paths import NodeRef, resolve

_HELP = """Verify the collaboration's ledger, show its history, or this organization's run receipts.

\b
Examples:
  vnode ledger verify hospital-a
  vnode ledger history hospital-a --dataset patients --format json
  vnode ledger receipts hospital-a
"""


@click.group("ledger", help=_HELP, context_settings=CONTEXT)
def ledger_group() -> None:
    pass


def agent_data_dir(ref: NodeRef) -> Path | None:
    """Where a dockerized agent keeps its data (its volume's Mountpoint), when the engine shows one here."""
    try:
        client = docker.from_env(timeout=5)
        point = client.volumes.get(ref.volume_name).attrs.get("Mountpoint")
    except docker.errors.DockerException:
        return None
    return Path(point) if isinstance(point, str) and point.startswith("/") else None


async def _served_head(ledger: NodeLedger) -> str:
    """The head the server claims now (unverified), for the error message."""
    with contextlib.suppress(Exception):
        answer = await ledger.client.ledger_entries(ledger.collaboration_id, 0, 1)
        length = int(answer["length"])
        if length == 0:
            return "0 (empty)"
        last = await ledger.client.ledger_entries(ledger.collaboration_id, length - 1, 1)
        return f"{length}:{str(last['entries'][0]['hash'])[:12]}"
    return "unknown"


async def _verify_agent_copy(ledger: NodeLedger, data_dir: Path) -> VerifyReport | None:
    """The same check against the agent's own copy and heads (None when there is none to read here)."""
    path = data_dir / LEDGER_FILE
    if not path.is_file() or path.resolve() == ledger.copy.path.resolve():
        return None
    settings = ledger.settings.model_copy(update={"data_dir": data_dir})
    agent = NodeLedger(
        settings,
        ledger.client,
        organization_id=ledger.organization_id,
        collaboration_id=ledger.collaboration_id,
        store=ledger.store,
    )
    try:
        try:
            agent.view.load()
        except (sqlite3.Error, OSError):
            click.echo(f"warning: cannot read the agent's ledger copy {path}", err=True)
            return None
        return await agent.verify_full()
    finally:
        agent.close()


@ledger_group.command("verify", context_settings=CONTEXT)
@click.argument("name", required=False)
@scope_option
def verify_command(name: str | None, user_scope: bool) -> None:
    """Verify the whole ledger from the server against this node's copy and every head it saw; exit 1
    naming the entry and both heads when it does not verify."""
    ref = resolve(name, to_scope(user_scope))
    settings = load(ref)
    keyring, _ = open_keyring(settings)
    agent_dir = agent_data_dir(ref)

    async def work() -> tuple[VerifyReport, list[str]]:
        async with open_ledger(settings, keyring, sync=False) as ledger:
            local = ledger.head
            try:
                report = await ledger.verify_full()
                agent = await _verify_agent_copy(ledger, agent_dir) if agent_dir is not None else None
            except LedgerError as exc:
                served = await _served_head(ledger)
                raise OperatorError(
                    f"ledger of collaboration {ledger.collaboration_id} does not verify: {exc.message} "
                    f"(server head {served}, this node's head {local.short()})"
                ) from None
            await ledger.sync()  # the local copy takes in what was verified
            heads = report.heads_checked + (agent.heads_checked if agent is not None else 0)
            done = VerifyReport(report.length, report.head, heads, report.problems)
            return done, list(report.problems)

    report, problems = run(settings, work)
    click.echo(
        f"ledger ok: {report.length} entries, head {report.head.seq}:{report.head.hash}, "
        f"{report.heads_checked} heads checked"
    )
    for problem in problems:
        click.echo(f"note: {problem}", err=True)


def _history_row(record: Record, unverified: set[int]) -> dict[str, Any]:
    entry = record.entry
    return {
        "seq": record.seq,
        "hash": record.hash,
        "kind": entry.kind,
        "digest": entry.digest,
        "at": when.iso(entry_time(entry)),
        "summary": describe(entry),
        "verified": record.seq not in unverified,
        "body": entry.body,
    }


@ledger_group.command("history", context_settings=CONTEXT)
@click.argument("name", required=False)
@scope_option
@click.option("--dataset", "label", default=None, metavar="LABEL", help="Only entries about this dataset.")
@FORMAT
def history_command(name: str | None, user_scope: bool, label: str | None, fmt: str) -> None:
    """Every entry of the verified ledger, oldest first (with --dataset: this organization's dataset LABEL,
    its leases and the receipts of runs on it)."""
    settings = load(resolve(name, to_scope(user_scope)))
    keyring, _ = open_keyring(settings)

    async def work() -> list[dict[str, Any]]:
        async with open_ledger(settings, keyring) as ledger:
            records = ledger.copy.load()
            if label is not None:
                if ledger.state.dataset(ledger.organization_id, label) is None:
                    raise OperatorError(f"dataset {label!r} of this organization is not on the ledger")
                records = [r for r in records if touches(ledger, r.entry, label)]
            unverified = {p.seq for p in ledger.state.problems}
            return [_history_row(r, unverified) for r in records]

    rows = run(settings, work)
    if fmt == "json":
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("the ledger is empty")
    for row in rows:
        at = row["at"].replace("T", " ")[:16] + "Z" if row["at"] else "-"
        flag = "" if row["verified"] else "  (not verified here)"
        click.echo(f"{row['seq']:>6}  {at:<17}  {row['kind']:<18} {row['summary']}{flag}")


def _receipt_row(receipt: Receipt) -> dict[str, Any]:
    body = receipt.body
    return {
        "seq": receipt.seq,
        "digest": receipt.digest,
        "task": body.task,
        "run": body.run,
        "status": body.status,
        "image": body.image,
        "datasets": [use.model_dump() for use in body.datasets],
        "descriptor": body.descriptor,
        "input": body.input,
        "result": body.result,
        "started_at": when.iso(body.started_at),
        "finished_at": when.iso(body.finished_at),
    }


@ledger_group.command("receipts", context_settings=CONTEXT)
@click.argument("name", required=False)
@scope_option
@FORMAT
def receipts_command(name: str | None, user_scope: bool, fmt: str) -> None:
    """This organization's run receipts on the verified ledger, oldest first."""
    settings = load(resolve(name, to_scope(user_scope)))
    keyring, _ = open_keyring(settings)

    async def work() -> list[dict[str, Any]]:
        async with open_ledger(settings, keyring) as ledger:
            return [_receipt_row(r) for r in ledger.state.receipts_for(ledger.organization_id)]

    rows = run(settings, work)
    if fmt == "json":
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no run receipt of this organization on the ledger")
        return
    click.echo(
        f"{'SEQ':>6}  {'TASK':>6} {'RUN':>6}  {'STATUS':<10} {'FINISHED':<17}  DATASETS (lease, epsilon)"
    )
    for row in rows:
        uses = ", ".join(
            f"{u['label']} ({(u['lease'] or '-')[:8]}, {u['epsilon'] if u['epsilon'] is not None else '-'})"
            for u in row["datasets"]
        )
        finished = row["finished_at"].replace("T", " ")[:16] + "Z"
        click.echo(
            f"{row['seq']:>6}  {row['task']:>6} {row['run']:>6}  {row['status']:<10} {finished:<17}  "
            f"{uses or '-'}"
        )
