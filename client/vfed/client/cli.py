"""`vfed`: the researcher's command line. Exit codes: 0 success, 1 failure, 2 usage error; 130 when Ctrl-C
interrupted `vfed task wait` or `vfed demo` (the shell's convention for SIGINT)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import click

from vfed.client import credentials, tasks
from vfed.client.cli_algorithm import algorithm
from vfed.client.cli_common import FORMAT, handled, print_table, run
from vfed.client.cli_ledger import datasets, leases, receipts
from vfed.client.cli_researcher import (
    collaborations,
    logout,
    nodes,
    task_logs,
    task_show,
    whoami,
)
from vfed.client.cli_results import write_results
from vfed.client.cli_trust import keys, organizations, trust, untrust
from vfed.client.client import AsyncClient, interrupted_message
from vfed.client.errors import ClientError
from vfed.common import tls
from vfed.common.api.statuses import TaskStatus


@click.group(
    epilog="\b\nStart here:\n"
    "  vfed login --url https://server:7600 --username alice --key-file KEY\n"
    "  vfed whoami; vfed collaborations list; vfed organizations list; vfed nodes list\n"
    "  vfed task create --collaboration 1 --image IMAGE --method METHOD\n"
    "  vfed task show ID; vfed task logs ID; vfed task results ID --output DIR\n"
    "  vfed demo   (a whole federation on this machine, on Docker)\n"
    "Write an algorithm: vfed algorithm new NAME; vfed algorithm build NAME\n"
    "Listings take --format table|json. Exit codes: 0 success, 1 failure, 2 usage error, 130 Ctrl-C in\n"
    "`vfed task wait` (the task goes on; `vfed task kill ID` stops it) or `vfed demo`."
)
@click.version_option(package_name="vfed", prog_name="vfed")
def main() -> None:
    """Researcher commands: log in, see your collaborations, organizations and nodes, create tasks, follow
    them and read their logs and decrypted results."""


@main.command()
@click.option("--url", default="http://127.0.0.1:7600", show_default=True, help="server URL")
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False),
    help="the CA that signed an https:// server's certificate (`vserver tls init`'s ca.crt; default: the "
    "system's CAs); remembered with the login",
)
@click.option("--username", prompt=True)
@click.option("--password", prompt=True, hide_input=True)
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False),
    help="your own key file (`vfed keys generate`, certified by your admin) or your organization's keyring",
)
@handled
def login(url: str, ca_file: str | None, username: str, password: str, key_file: str | None) -> None:
    """Log in and remember the tokens (0600 file in your config folder)."""
    ca = str(Path(ca_file).resolve()) if ca_file else None

    async def go() -> dict[str, Any]:
        async with AsyncClient(url, ca_file=ca) as client:
            try:
                return await client.api.login(username, password)
            except aiohttp.ClientSSLError as exc:  # name the CA file this login used
                raise ClientError(tls.explain(exc, client.api.ca_file) or str(exc)) from None

    body = asyncio.run(go())
    path = credentials.save(
        {
            "url": url,
            "ca_file": ca,
            "username": username,
            "key_file": key_file,
            "access_token": body["access_token"],
            "refresh_token": body["refresh_token"],
            "user_id": body.get("user_id"),
            "organization_id": body.get("organization_id"),
        }
    )
    click.echo(f"logged in as {username} (organization {body['organization_id']}); saved to {path}")


@main.group()
def task() -> None:
    """Create, follow, read and kill tasks."""


@task.command("create")
@click.option("--collaboration", "collaboration", type=int, required=True)
@click.option("--image", required=True)
@click.option("--method", required=True)
@click.option("--args", "args_json", default="[]", help="JSON list of positional arguments")
@click.option("--kwargs", "kwargs_json", default="{}", help="JSON object of keyword arguments")
@click.option("--org", "orgs", type=int, multiple=True, help="target organization (repeatable; default all)")
@click.option("--dataset", "datasets", multiple=True, help="dataset label (repeatable)")
@click.option("--name", default=None)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@handled
def task_create(
    collaboration: int,
    image: str,
    method: str,
    args_json: str,
    kwargs_json: str,
    orgs: tuple[int, ...],
    datasets: tuple[str, ...],
    name: str | None,
    fmt: str,
) -> None:
    """Create a task; its input is encrypted for every target organization.

    Example: vfed task create --collaboration 1 --image vfed-examples/summary_stats --method summary
    --kwargs '{"columns": ["age"]}' --org 1
    """
    args = _json_arg("--args", args_json, list)
    kwargs = _json_arg("--kwargs", kwargs_json, dict)
    body = run(
        lambda c: c.create_task(
            collaboration,
            image,
            method,
            args=args,
            kwargs=kwargs,
            organizations=list(orgs) or None,
            datasets=datasets,
            name=name,
        )
    )
    shown = json.dumps(body.model_dump(mode="json")) if fmt == "json" else None
    click.echo(shown or f"task {body.id} created (job {body.job_id})")


def _json_arg(flag: str, text: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=flag) from exc
    if not isinstance(value, kind):
        raise click.BadParameter(f"must be a JSON {'list' if kind is list else 'object'}", param_hint=flag)
    return value


@task.command("wait")
@click.argument("task_id", type=int)
@click.option("--timeout", "timeout_s", type=float, default=None, help="seconds")
@handled
def task_wait(task_id: int, timeout_s: float | None) -> None:
    """Wait until every run of TASK_ID finished. Ctrl-C stops waiting, not the task (exit code 130)."""
    try:
        # tasks.wait, not c.wait: AsyncClient.wait would say the task goes on too, naming client.kill.
        # Progress on stderr: stdout carries only the outcome line, for scripts.
        body = run(lambda c: tasks.wait(c, task_id, timeout_s, sys.stderr.isatty(), sys.stderr))
    except KeyboardInterrupt:
        click.echo(f"vfed: {interrupted_message(task_id, f'`vfed task kill {task_id}`')}", err=True)
        sys.exit(130)
    click.echo(f"task {task_id} {body.status}")
    if body.status != TaskStatus.COMPLETED:
        sys.exit(1)


@task.command("results")
@click.argument("task_id", type=int)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "csv", "native"]),
    default="json",
    show_default=True,
    help="native (with --output only): a table as Parquet, any other value as JSON, without conversion",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="stream one file per organization into this folder (organization-<id>.<format>) instead; "
    "a broken download resumes when the command runs again",
)
@handled
def task_results(task_id: int, fmt: str, output: Path | None) -> None:
    """Print the decrypted results of TASK_ID (one per organization), or write them to --output DIR.

    Example: vfed task results 12 --output results/ --format csv
    """
    if fmt == "native" and output is None:
        raise click.UsageError("--format native writes files: give --output DIR")
    if output is not None:
        write_results(task_id, fmt, output)
        return
    results = run(lambda c: c.results(task_id))
    click.echo(_render(results, fmt), nl=False)


def _render(results: Sequence[Any], fmt: str) -> str:
    plain = [r.to_dict(orient="records") if hasattr(r, "to_dict") else r for r in results]
    if fmt == "json":
        return json.dumps(plain, indent=2, default=str) + "\n"
    out = io.StringIO()
    rows = [(i, row) for i, r in enumerate(plain) for row in (r if isinstance(r, list) else [r])]
    fields = sorted({k for _, row in rows if isinstance(row, dict) for k in row})
    writer = csv.writer(out)
    writer.writerow(["result", *(fields or ["value"])])
    for i, row in rows:
        writer.writerow([i, *([row.get(f) for f in fields] if isinstance(row, dict) else [json.dumps(row)])])
    return out.getvalue()


@task.command("kill")
@click.argument("task_id", type=int)
@handled
def task_kill(task_id: int) -> None:
    """Kill every unfinished run of TASK_ID."""
    body = run(lambda c: c.kill(task_id))
    click.echo(f"task {task_id} {body.status}")


@task.command("runs")
@click.argument("task_id", type=int)
@FORMAT
@handled
def task_runs(task_id: int, fmt: str) -> None:
    """List the runs of TASK_ID: organization, status and the classified reason of each."""
    runs = run(lambda c: c.runs(task_id))
    keys = ("id", "organization_id", "status", "exit_code", "reason")
    shown = [{k: v for k, v in r.model_dump(mode="json").items() if k in keys} for r in runs]
    if fmt == "json":
        click.echo(json.dumps(shown))
        return
    print_table(
        ["RUN", "ORGANIZATION", "STATUS", "EXIT", "REASON"],
        [(r["id"], r["organization_id"], r["status"], r["exit_code"], r["reason"]) for r in shown],
    )


@main.group("run")
def run_group() -> None:
    """One run of a task."""


@run_group.command("log")
@click.argument("run_id", type=int)
@handled
def run_log(run_id: int) -> None:
    """Print RUN_ID's log tail, opened with your key (your organization's runs, or runs of a node that shares
    logs with the initiator)."""
    click.echo(run(lambda c: c.run_log(run_id)), nl=False)


@task.command("list")
@FORMAT
@handled
def task_list(fmt: str) -> None:
    """List tasks you can see."""
    found = run(lambda c: c.tasks())
    tasks = [t.model_dump(mode="json") for t in found]
    if fmt == "json":
        click.echo(json.dumps(tasks))
        return
    if not tasks:
        click.echo("no tasks")
        return
    print_table(
        ["ID", "STATUS", "IMAGE", "NAME", "PARENT", "CREATED"],
        [
            (t["id"], t["status"], t["image"], t["name"], t.get("parent_id"), t.get("created_at"))
            for t in tasks
        ],
    )


@main.command("demo")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="keep the demo's files and logs in this folder (emptied first); default: a temporary folder, "
    "removed at the end",
)
@click.option(
    "--image",
    default=None,
    help="the algorithm image to run, one offering the summary_stats example's methods (default: "
    "vfed-examples/summary_stats:latest when present, else vfed-demo/summary_stats:<version>, built once)",
)
@click.option(
    "--base-image",
    envvar="BASE_IMAGE",
    default=None,
    help="the Python base image to build the algorithm image on, when none is present "
    "[$BASE_IMAGE; default: python:3.11-slim]",
)
@click.option(
    "--wheelhouse",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="wheels to build that image from, without a package index (`vnode image build --wheelhouse`)",
)
def demo(work_dir: Path | None, image: str | None, base_image: str | None, wheelhouse: Path | None) -> None:
    """Run a whole federation on this machine: a server, three organizations with a node agent and a
    private dataset each, and a researcher whose task computes pooled statistics across them; prints the
    federated result beside the pooled one. Needs a Docker engine you may use (no root). Everything it
    starts is removed when it ends, Ctrl-C included (exit code 130)."""
    from vfed.client import demo as demo_module  # pandas and the docker SDK only for this command
    from vfed.client.demo_images import Choice

    sys.exit(demo_module.run(work_dir, Choice(image, base_image, wheelhouse)))


task.add_command(task_show)
task.add_command(task_logs)


main.add_command(whoami)
main.add_command(logout)
main.add_command(collaborations)
main.add_command(nodes)
main.add_command(keys)
main.add_command(trust)
main.add_command(untrust)
main.add_command(organizations)
main.add_command(datasets)
main.add_command(leases)
main.add_command(receipts)
main.add_command(algorithm)

if __name__ == "__main__":
    main()
