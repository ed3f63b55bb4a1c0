"""`vnode list` and `vnode files`: what is configured, what runs, what the server sees, where things are."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import click
import docker.errors
from docker import DockerClient

from vfed.node.config import ConfigError, load_settings
from vfed.node.operator import container as agent
from vfed.node.operator import server
from vfed.node.operator.common import CONTEXT, OperatorError, engine, load, scope_option, to_scope
from vfed.node.operator.paths import NodeRef, all_nodes, resolve
from vfed.node.policy import ALLOWS_EVERY_IMAGE, allows_every_image

_LIST_HELP = """List every node configuration in both scopes: running or not, online or offline as the server
sees it, runtime and datasets, then a warning for each node that allows every image (no allowed_images). A
node whose container is not running here is listed offline without asking the server (asking with the node's
key would count as a sign of life).

\b
Examples:
  vnode list
  vnode list --format json | jq '.[] | select(.status == "online") | .name'
"""


def describe(ref: NodeRef, client: DockerClient | None) -> dict[str, Any]:
    """One row of `vnode list`; a broken config is listed with its error instead of hiding it."""
    row: dict[str, Any] = {
        "name": ref.name,
        "scope": ref.scope.value,
        "config": str(ref.config_path),
        "container": ref.container_name,
        "running": False,
        "status": "unknown",
        "runtime": None,
        "datasets": [],
        "server_url": None,
        "error": None,
        "warnings": [],
    }
    try:
        settings = load_settings(ref.config_path)
    except ConfigError as exc:
        row["error"] = f"invalid config: {exc}"
        return row
    row.update(
        runtime=settings.runtime.kind, datasets=sorted(settings.datasets), server_url=settings.server_url
    )
    if allows_every_image(settings):
        row["warnings"].append(ALLOWS_EVERY_IMAGE)
    if client is not None:
        try:
            row["running"] = agent.is_running(agent.find_agent(client, ref))
        except docker.errors.DockerException as exc:
            row["error"] = f"Docker engine: {exc}"
    # Any request with the node's key counts as a sign of life on the server (docs/api.md), so asking about a
    # node that is not running here would itself make it look online for a minute: such a node is offline.
    row["status"] = server.node_status(settings) if row["running"] else "offline"
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("NAME", "SCOPE", "RUNNING", "SERVER", "RUNTIME", "DATASETS")
    lines = [head] + [
        (
            r["name"],
            r["scope"],
            "yes" if r["running"] else "no",
            r["status"],
            r["runtime"] or "-",
            ",".join(r["datasets"]) or ("! " + r["error"] if r["error"] else "-"),
        )
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=False)) + "  " + line[-1]
        for line in lines
    )


@click.command("list", help=_LIST_HELP, context_settings=CONTEXT)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def list_command(fmt: str) -> None:
    refs = all_nodes()
    try:
        client: DockerClient | None = engine()
    except OperatorError as exc:
        client = None
        click.echo(f"warning: {exc.message}; every node is listed as not running", err=True)
    with ThreadPoolExecutor(max_workers=8) as pool:
        rows = list(pool.map(lambda r: describe(r, client), refs))
    if fmt == "json":
        click.echo(json.dumps(rows, indent=1))
    elif rows:
        click.echo(_table(rows))
        for row in rows:  # under the table, on stderr: what the operator should fix
            for warning in row["warnings"]:
                click.echo(f"warning: node {row['name']} ({row['scope']}): {warning}", err=True)
    else:
        click.echo("no node configured; create one with `vnode new`")


@click.command("files", context_settings=CONTEXT)
@click.argument("name", required=False)
@scope_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def files_command(name: str | None, user_scope: bool, fmt: str) -> None:
    """Show where node NAME's config file, key file, journal database and logs are.

    \b
    Examples:
      vnode files hospital-a
      vnode files lab --system --format json
    """
    ref = resolve(name, to_scope(user_scope))
    settings = load(ref)
    where: dict[str, str] = {
        "config": str(ref.config_path),
        "key": str(settings.key_path),
        "trust_store": str(settings.trust_store_path),
        "data": str(ref.data_dir),
        "agent_config": str(ref.data_dir / "agent.yaml"),
        "volume": ref.volume_name,
        "journal": f"{agent.DATA_IN_CONTAINER}/journal.sqlite3 in volume {ref.volume_name}",
        "logs": f"`vnode attach {ref.name}` (container {ref.container_name})",
    }
    try:
        client = engine()
        point = client.volumes.get(ref.volume_name).attrs.get("Mountpoint")
        if point:
            where["journal"] = f"{point}/journal.sqlite3"
        found = agent.find_agent(client, ref)
        if found is not None and found.attrs.get("LogPath"):
            where["logs"] = str(found.attrs["LogPath"])
    except (OperatorError, docker.errors.DockerException):
        pass  # the engine is only needed for the volume's host path; the rest is still worth showing
    if fmt == "json":
        click.echo(json.dumps(where))
        return
    width = max(len(k) for k in where)
    for key, value in where.items():
        click.echo(f"{key.ljust(width)}  {value}")
