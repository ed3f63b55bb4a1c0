"""`vfed whoami`, `vfed logout`, `vfed collaborations list`, `vfed nodes list` and the task views `vfed task
show|logs` (`vfed task results --output DIR` is cli_results.py): where a researcher finds their way around."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
from datetime import UTC, datetime
from typing import Any

import aiohttp
import click

from vfed.client import credentials
from vfed.client.cli_common import FORMAT, fail, handled, print_table, run
from vfed.client.client import AsyncClient
from vfed.client.errors import ApiError, ClientError
from vfed.client.results import OrganizationResult
from vfed.client.run_logs import LogUnreadable, run_log
from vfed.client.tasks import run_failure, subtask_failures
from vfed.common.api.resources import Run, Task
from vfed.common.api.statuses import RunStatus

LOGIN_HINT = "not logged in: run `vfed login --url URL --username NAME`"
RUN_FIELDS = ("id", "organization_id", "node_id", "status", "exit_code", "reason")
RUN_TIMES = ("created_at", "started_at", "finished_at")


def token_expiry(token: str | None) -> str | None:
    """The `exp` of a JWT as ISO 8601 UTC, read without verifying it (the server verifies; this only tells
    the researcher when to log in again); None when there is no readable expiry."""
    if not token or token.count(".") != 2:
        return None
    part = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        return datetime.fromtimestamp(int(claims["exp"]), UTC).isoformat()
    except (binascii.Error, ValueError, KeyError, TypeError, OverflowError, OSError):
        return None


def _token_subject(token: str | None) -> int | None:
    if not token or token.count(".") != 2:
        return None
    part = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        return int(claims["sub"]) if claims.get("kind", "user") == "user" else None
    except (binascii.Error, ValueError, KeyError, TypeError):
        return None


def _logged_in() -> dict[str, Any]:
    """The saved login; exits 1 saying how to log in when there is none (and no VFED_TOKEN)."""
    saved = credentials.load()
    if not saved.get("access_token") and not saved.get("refresh_token") and not os.environ.get("VFED_TOKEN"):
        fail(LOGIN_HINT)
    return saved


async def _org_names(client: AsyncClient) -> dict[int, str]:
    return {o.id: o.name for o in await client.organizations()}


def _org(names: dict[int, str], org_id: Any) -> str:
    return f"{names.get(int(org_id), '?')} ({org_id})" if org_id is not None else "-"


# --- whoami, logout -----------------------------------------------------------------------------------
@click.command()
@FORMAT
@handled
def whoami(fmt: str) -> None:
    """Who you are logged in as: user, organization, roles, server URL and when the tokens expire."""
    saved = _logged_in()

    async def go(c: AsyncClient) -> dict[str, Any]:
        user_id = saved.get("user_id") or _token_subject(c.api.token)
        if user_id is None:
            raise ClientError("the saved token names no user: log in again with `vfed login`")
        user = await c.api.request("GET", f"/users/{int(user_id)}")
        org = await c.api.request("GET", f"/organizations/{int(user['organization_id'])}")
        return {
            "user": user["username"],
            "user_id": user["id"],
            "organization": org["name"],
            "organization_id": org["id"],
            "roles": list(user["roles"]),
            "server": c.url,
            "ca_file": saved.get("ca_file"),
            "key_file": saved.get("key_file"),
            # read after the requests: a refresh on the way renewed them
            "access_token_expires_at": token_expiry(c.api.token),
            "refresh_token_expires_at": token_expiry(c.api.refresh_token),
        }

    info = run(go)
    if fmt == "json":
        click.echo(json.dumps(info))
        return
    click.echo(f"user:          {info['user']} (id {info['user_id']})")
    click.echo(f"organization:  {info['organization']} (id {info['organization_id']})")
    click.echo(f"roles:         {', '.join(info['roles']) or '-'}")
    click.echo(f"server:        {info['server']}" + (f" (CA {info['ca_file']})" if info["ca_file"] else ""))
    click.echo(f"key file:      {info['key_file'] or '-'}")
    click.echo(
        f"token expires: {info['access_token_expires_at'] or '-'} (renewed on use until the login "
        f"expires: {info['refresh_token_expires_at'] or '-'})"
    )


@click.command()
@handled
def logout() -> None:
    """Log out: the server revokes the saved login's refresh token (and every token refreshed from it), and
    the tokens are forgotten here (the server URL, CA and key file stay for the next `vfed login`)."""
    saved = credentials.load()
    if not saved.get("access_token") and not saved.get("refresh_token"):
        click.echo("not logged in: no saved tokens to forget")
        return
    revoked, why = False, ""
    if saved.get("url") and saved.get("refresh_token"):
        revoked, why = asyncio.run(_revoke(str(saved["url"]), saved.get("ca_file"), saved["refresh_token"]))
    kept = {k: saved[k] for k in ("url", "ca_file", "username", "key_file") if saved.get(k) is not None}
    path = credentials.save(kept)
    click.echo(f"logged out: forgot the tokens saved in {path}")
    if revoked:
        click.echo("the server revoked the login's refresh token")
    else:
        expires = token_expiry(saved.get("refresh_token"))
        click.echo(
            f"warning: the server was not told ({why or 'no server URL saved'}); a copy of the refresh token "
            f"stays valid until {expires or 'it expires'}",
            err=True,
        )


async def _revoke(url: str, ca_file: str | None, refresh_token: str) -> tuple[bool, str]:
    """(True, "") when the server revoked the login; else (False, why)."""
    from vfed.client.http import ApiSession

    try:
        async with ApiSession(url, refresh_token=refresh_token, ca_file=ca_file) as api:
            await api.logout()
    except ApiError as exc:
        return False, f"{exc.status} {exc.error}"
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return False, f"{exc.__class__.__name__}: {exc}"
    return True, ""


# --- collaborations, nodes ----------------------------------------------------------------------------
@click.group()
def collaborations() -> None:
    """Collaborations your organization belongs to."""


@collaborations.command("list")
@FORMAT
@handled
def collaborations_list(fmt: str) -> None:
    """List collaborations: id, name, member organizations, whether their tasks are encrypted.

    Example: vfed collaborations list --format json
    """

    async def go(c: AsyncClient) -> tuple[list[dict[str, Any]], dict[int, str]]:
        found, names = await asyncio.gather(c.collaborations(), _org_names(c))
        return [x.model_dump(mode="json") for x in found], names

    found, names = run(go)
    rows = [
        {
            "id": x["id"],
            "name": x["name"],
            "organization_ids": x["organization_ids"],
            "organizations": [{"id": o, "name": names.get(int(o))} for o in x["organization_ids"]],
            "encrypted": x["encrypted"],
        }
        for x in found
    ]
    if fmt == "json":
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no collaborations")
        return
    print_table(
        ["ID", "NAME", "ORGANIZATIONS", "ENCRYPTED"],
        [
            (
                r["id"],
                r["name"],
                ", ".join(_org(names, o) for o in r["organization_ids"]),
                "yes" if r["encrypted"] else "no",
            )
            for r in rows
        ],
    )


@click.group()
def nodes() -> None:
    """The nodes of your collaborations, online or offline."""


@nodes.command("list")
@click.option("--collaboration", type=click.IntRange(min=1), default=None, help="only this collaboration's")
@click.option("--organization", type=click.IntRange(min=1), default=None, help="only this organization's")
@FORMAT
@handled
def nodes_list(collaboration: int | None, organization: int | None, fmt: str) -> None:
    """List nodes: organization, collaboration, online/offline and when the server last heard from each.

    Example: vfed nodes list --collaboration 1
    """

    async def go(c: AsyncClient) -> tuple[list[dict[str, Any]], dict[int, str]]:
        found, names = await asyncio.gather(c.nodes(collaboration, organization), _org_names(c))
        return [n.model_dump(mode="json") for n in found], names

    found, names = run(go)
    keys = ("id", "name", "organization_id", "collaboration_id", "status", "last_seen_at")
    rows = [
        {**{k: n.get(k) for k in keys}, "organization": names.get(int(n["organization_id"]))} for n in found
    ]
    if fmt == "json":
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no nodes")
        return
    print_table(
        ["ID", "NAME", "ORGANIZATION", "COLLABORATION", "STATUS", "LAST SEEN"],
        [
            (
                r["id"],
                r["name"],
                _org(names, r["organization_id"]),
                r["collaboration_id"],
                r["status"],
                r["last_seen_at"] or "never",
            )
            for r in rows
        ],
    )


# --- task show, logs, results --output ----------------------------------------------------------------
def _run_row(run: Run, names: dict[int, str]) -> dict[str, Any]:
    fields = run.model_dump(mode="json")
    row = {k: fields.get(k) for k in (*RUN_FIELDS, *RUN_TIMES)}
    row["organization"] = names.get(run.organization_id)
    row["has_result"] = bool(run.result_blob_id)
    return row


@click.command("show")
@click.argument("task_id", type=click.IntRange(min=1))
@FORMAT
@handled
def task_show(task_id: int, fmt: str) -> None:
    """Show TASK_ID and its runs, one per organization: status and the classified reason of each failure
    (never the algorithm's output; `vfed task logs` shows what you may read of that).

    Example: vfed task show 12 --format json
    """

    async def go(
        c: AsyncClient,
    ) -> tuple[Task, list[Run], list[Task], dict[int, str], list[OrganizationResult]]:
        task, runs, children, names = await asyncio.gather(
            c.task(task_id), c.runs(task_id), c.tasks(parent_id=task_id), _org_names(c)
        )
        own = [
            run_failure(r, names)
            for r in sorted(runs, key=lambda r: (r.organization_id, r.id))
            if r.finished and r.status != RunStatus.COMPLETED
        ]
        failures = own + (await subtask_failures(c, task_id, own, names, logs=False) if own else [])
        return task, runs, children, names, failures

    found, runs, children, names, failures = run(go)
    task = found.model_dump(mode="json")
    shown = {k: v for k, v in task.items() if k not in ("links", "descriptor")}
    shown["signed"] = bool(found.descriptor)
    shown["runs"] = [_run_row(r, names) for r in sorted(runs, key=lambda r: (r.organization_id, r.id))]
    shown["subtasks"] = [{"id": t.id, "status": str(t.status), "name": t.name} for t in children]
    shown["failures"] = [_failure_row(f) for f in failures]
    if fmt == "json":
        click.echo(json.dumps(shown, default=str))
        return
    click.echo(f"task {task['id']}  {task['name']}  {task['status']}")
    click.echo(
        f"  image          {task['image']}"
        + (f" @ {task['image_digest']}" if task.get("image_digest") else "")
    )
    click.echo(
        f"  collaboration  {task['collaboration_id']}   job {task['job_id']}   parent "
        f"{task.get('parent_id') or '-'}"
    )
    user = f", user {task['initiator_user_id']}" if task.get("initiator_user_id") is not None else ""
    click.echo(f"  initiator      {_org(names, task['initiator_organization_id'])}{user}")
    click.echo(f"  created        {task['created_at']}")
    if shown["subtasks"]:
        click.echo("  subtasks       " + ", ".join(f"{t['id']} {t['status']}" for t in shown["subtasks"]))
    click.echo("")
    print_table(
        ["RUN", "ORGANIZATION", "STATUS", "EXIT", "REASON", "FINISHED"],
        [
            (
                r["id"],
                _org(names, r["organization_id"]),
                r["status"],
                r["exit_code"],
                r["reason"],
                r["finished_at"],
            )
            for r in shown["runs"]
        ],
    )
    for failure in failures:
        click.echo(failure.line())


def _failure_row(failure: OrganizationResult) -> dict[str, Any]:
    keys = ("organization_id", "organization", "run_id", "task_id", "status", "code", "message")
    row = {k: getattr(failure, k) for k in keys}
    row.update(depth=failure.depth, parent_run_id=failure.parent_run_id)
    return row


@click.command("logs")
@click.argument("task_id", type=click.IntRange(min=1))
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@handled
def task_logs(task_id: int, fmt: str) -> None:
    """Print the log of every run of TASK_ID that you may read, opened with your key.

    A node seals a run's log to its own organization, and to the initiator only when it shares logs
    (`share_logs_with_initiator`): the other runs are named, with why they are not shown. A log that does
    not verify (not signed by its organization, or of another run) is reported and the exit code is 1.

    Example: vfed task logs 12
    """

    async def go(c: AsyncClient) -> tuple[list[dict[str, Any]], dict[int, str]]:
        task, runs, names = await asyncio.gather(c.task(task_id), c.runs(task_id), _org_names(c))
        del task  # asked first so an unknown task is one 404 line
        out = []
        for r in sorted(runs, key=lambda r: (r.organization_id, r.id)):
            item: dict[str, Any] = {
                "run_id": r.id,
                "organization_id": r.organization_id,
                "organization": names.get(r.organization_id),
                "status": str(r.status),
                "reason": r.reason,
            }
            try:
                item.update(readable=True, log=await run_log(c, r), why=None, problem=None)
            except LogUnreadable as exc:
                item.update(readable=False, log=None, why=_why(exc, r.organization_id))
                item["problem"] = exc.kind if exc.kind not in ("none", "not-a-recipient") else None
            out.append(item)
        return out, names

    found, names = run(go)
    if fmt == "json":
        click.echo(json.dumps(found))
    else:
        if not found:
            click.echo(f"task {task_id} has no runs")
        for item in found:
            head = f"=== run {item['run_id']} at {_org(names, item['organization_id'])}: {item['status']}"
            if item["reason"]:
                head += f" ({item['reason']})"
            if item["readable"]:
                click.echo(head + " ===")
                click.echo(item["log"], nl=not item["log"].endswith("\n"))
            else:
                click.echo(f"{head} === {item['why']}")
    bad = [i for i in found if i["problem"]]
    if bad:
        fail(f"{len(bad)} run log(s) of task {task_id} do not verify: " + "; ".join(i["why"] for i in bad))


def _why(exc: LogUnreadable, org_id: int) -> str:
    if exc.kind == "not-a-recipient":
        return f"not shared with you: sealed to organization {org_id} only (its node does not share logs)"
    if exc.kind == "none":
        return "no log: its node sent none, or the run has not ended"
    return str(exc)
