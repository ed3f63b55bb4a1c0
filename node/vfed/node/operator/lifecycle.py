"""`vnode start|stop|attach|clean`: the node agent as a long-lived container `vfed-<name>-<scope>` (or, with
`vnode start --no-container`, as the command's own process)."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Literal, cast

import click
import docker.errors
from click.core import ParameterSource
from docker import DockerClient
from docker.models.containers import Container
from docker.types import LogConfig, Mount

from vfed.common.api import Reason, classified
from vfed.node.config import NodeSettings
from vfed.node.foreground import log_levels
from vfed.node.foreground import run_agent as run_here
from vfed.node.operator import container as agent
from vfed.node.operator import server
from vfed.node.operator.common import (
    CONTEXT,
    LABEL_AGENT_NODE,
    LABEL_AGENT_SCOPE,
    LABEL_ROLE,
    ROLE_AGENT,
    BadInput,
    OperatorError,
    engine,
    load,
    scope_option,
    to_scope,
)
from vfed.node.operator.paths import NodeRef, nodes_in, resolve
from vfed.node.operator.run_logs import quiet_keyring
from vfed.node.runtime.base import LABEL_NODE, LABEL_RUN_ID

_START_HELP = """Run node NAME's agent in a container and wait until it reports online (--no-container: here).

\b
The container `vfed-<name>-<scope>` gets the Docker socket, the config, the key file's folder and the
datasets (read-only), the trust store's folder and the volume `vfed-<name>-vol` (journal, run folders). A
server on 127.0.0.1 is reached through the host's network (a bridged container's loopback is its own). The
key passphrase ($VAR of private_key_passphrase_env, or private_key_passphrase_file) is mounted as a read-only
file, never passed in the container's environment.

\b
Examples:
  vnode start hospital-a
  vnode start hospital-a --attach                 # then follow its log (Ctrl-C leaves it running)
  vnode start lab --system --image vfed/node:dev --develop ~/src/vfed
  vnode start site-k --no-container               # a kubernetes-runtime node's agent, outside the cluster

\b
--no-container runs the agent as this process, until Ctrl-C or SIGTERM (a service manager such as systemd
keeps it running): for nodes whose runs go to a Kubernetes cluster (runtime.kind kubernetes), whose agent
runs either so or in the cluster from docker/kubernetes/node (docs/deployment.md), and for development.
"""
_CONTAINER_ONLY = ("attach", "image", "develop", "timeout_s")


def _build_image(client: DockerClient, image: str) -> None:
    """Pull the image, or build it with the source tree's scripts/build-images.sh when that exists."""
    try:
        client.images.get(image)
        return
    except docker.errors.ImageNotFound:
        pass
    try:
        client.images.pull(image)
        return
    except docker.errors.DockerException:
        pass
    script = Path(__file__).resolve().parents[4] / "scripts" / "build-images.sh"
    if image != agent.DEFAULT_IMAGE or not script.is_file():
        raise OperatorError(
            f"image {image} is not present and cannot be pulled; build it: `vnode image build` "
            "(or scripts/build-images.sh in a checkout)"
        )
    click.echo(f"image {image} missing: building it with {script} (a few minutes)")
    if subprocess.run([str(script)], check=False).returncode != 0:
        raise OperatorError(f"building {image} with {script} failed (its output is above)")


def _mounts(
    client: DockerClient, ref: NodeRef, settings: NodeSettings, image: str, develop: Path | None
) -> list[Mount]:
    if not settings.key_path.is_file():
        raise OperatorError(
            f"no organization key at {settings.key_path}: create one with `vnode keys generate {ref.name}`"
        )
    volume = agent.node_volume(client, ref)
    secrets = agent.secret_files(ref, settings)  # the passphrase as a read-only file, never an env variable
    config_file = agent.write_agent_config(ref, settings, agent.mountpoint(volume), secrets)
    socket = agent.docker_socket_path()
    mounts = [
        Mount(socket, socket, type="bind"),
        Mount(agent.CONFIG_IN_CONTAINER, str(config_file), type="bind", read_only=True),
        *agent.key_and_trust_mounts(settings),
        Mount(agent.DATA_IN_CONTAINER, ref.volume_name, type="volume"),
        *agent.dataset_mounts(settings),
        *agent.secret_mounts(secrets),
        *agent.server_ca_mounts(settings),
    ]
    if develop is not None:
        mounts += agent.develop_mounts(client, image, develop)
    return mounts


def run_agent(
    client: DockerClient, ref: NodeRef, settings: NodeSettings, image: str, develop: Path | None
) -> Container:
    """Create and start the agent container (replacing a stopped leftover of the same name)."""
    old = agent.find_agent(client, ref)
    if agent.is_running(old):
        raise OperatorError(f"node {ref} is already running (container {ref.container_name})")
    if settings.runtime.kind != "docker":
        raise OperatorError(
            f"vnode start runs Docker-runtime nodes; runtime.kind is {settings.runtime.kind!r}"
        )
    _build_image(client, image)
    mounts = _mounts(client, ref, settings, image, develop)
    if old is not None:
        old.remove(force=True)
    # A bridged container's 127.0.0.1 is its own: a server or broker on host loopback needs host networking.
    host_net = agent.is_loopback(settings.server_url) or agent.is_loopback(settings.mqtt_url)
    try:
        started: Container = client.containers.run(
            image,
            name=ref.container_name,
            detach=True,
            init=True,
            mounts=mounts,
            labels={
                LABEL_ROLE: ROLE_AGENT,
                LABEL_AGENT_NODE: ref.name,
                LABEL_AGENT_SCOPE: ref.scope.value,
                "vfed.agent.config": str(ref.config_path),
            },
            network_mode="host" if host_net else None,
            # Never remapped (docs/security.md, "Container users"): the agent holds the engine's socket (root
            # anyway), which a remapped root could not open; its algorithm containers are remapped.
            userns_mode="host",
            log_config=LogConfig(type="json-file", config={"max-size": "10m", "max-file": "3"}),
        )
    except docker.errors.DockerException as exc:
        raise OperatorError(f"cannot start container {ref.container_name}: {exc}") from None
    return started


def wait_online(container: Container, timeout_s: float) -> None:
    """Until the agent logs that it is online; a container that exits, or the timeout, fails with its log."""
    deadline = time.monotonic() + timeout_s
    while True:
        container.reload()
        if container.status in ("exited", "dead"):
            state = container.attrs["State"]
            raise OperatorError(
                f"the agent stopped (exit code {state.get('ExitCode')}); its last log lines:\n"
                f"{agent.log_tail(container)}"
            )
        if agent.ONLINE_RE.search(container.logs().decode("utf-8", "replace")):
            return
        if time.monotonic() > deadline:
            raise OperatorError(
                f"the agent did not report online within {timeout_s:.0f} s; its last log lines:\n"
                f"{agent.log_tail(container)}"
            )
        time.sleep(0.3)


def follow_logs(container: Container, tail: int | Literal["all"] = 50) -> None:
    """Print the agent's log as it grows, until Ctrl-C or the container ends."""
    try:
        for chunk in container.logs(stream=True, follow=True, tail=tail):
            click.echo(chunk.decode("utf-8", "replace"), nl=False)
    except KeyboardInterrupt:
        click.echo("", err=True)


@click.command("start", help=_START_HELP, context_settings=CONTEXT)
@click.argument("name", required=False)
@scope_option
@click.option("--attach", is_flag=True, help="Follow the agent's log once it is online.")
@click.option("--image", default=agent.DEFAULT_IMAGE, show_default=True, help="The node image.")
@click.option(
    "--develop", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Source tree to mount."
)
@click.option(
    "--timeout", "timeout_s", type=float, default=60.0, show_default=True, help="Seconds to wait for online."
)
@click.option(
    "--no-container", is_flag=True, help="Run the agent here, in the foreground, not in a container."
)
@click.option(
    "--log-level",
    help="With --no-container: DEBUG, INFO, WARNING or ERROR, then LOGGER=LEVEL items. [default: INFO]",
)
@click.pass_context
def start_command(
    ctx: click.Context,
    name: str | None,
    user_scope: bool,
    attach: bool,
    image: str,
    develop: Path | None,
    timeout_s: float,
    no_container: bool,
    log_level: str | None,
) -> None:
    ref = resolve(name, to_scope(user_scope))
    if no_container:
        given = [p for p in _CONTAINER_ONLY if ctx.get_parameter_source(p) is ParameterSource.COMMANDLINE]
        if given:
            option = "--timeout" if given[0] == "timeout_s" else f"--{given[0]}"
            raise BadInput(option, "starts an agent container; --no-container runs the agent here")
        levels = log_levels(log_level or "INFO")
        load(ref)  # a bad file: one line, before anything starts
        click.echo(f"node {ref}: running its agent here (Ctrl-C or SIGTERM stops it)", err=True)
        run_here(ref.config_path, levels, rotate_key=False, environment=False)
        return
    if log_level is not None:
        raise BadInput("--log-level", "goes with --no-container (a container's agent logs at INFO)")
    settings = load(ref)
    if settings.runtime.kind != "docker":
        raise BadInput(
            "--no-container",
            f"node {ref} runs its runs with the {settings.runtime.kind} runtime: start its agent here with "
            f"`vnode start {ref.name} --no-container`, or in the cluster (docs/deployment.md)",
        )
    client = engine()
    container = run_agent(client, ref, settings, image, develop)
    try:
        wait_online(container, timeout_s)
    except OperatorError:
        container.stop(timeout=5)
        agent.forget_secrets(ref)
        raise
    # Only a node that came up is restarted after a crash or reboot; `vnode stop` stays final.
    container.update(restart_policy=cast(Any, {"Name": "unless-stopped"}))
    click.echo(f"node {ref} is online (container {ref.container_name})")
    if attach:
        follow_logs(container, tail="all")


def stop_node(client: DockerClient, ref: NodeRef, settings: NodeSettings, grace_s: float) -> bool:
    """Stop the node's runs (marked killed), then SIGTERM its agent, then remove finished jobs' volumes.

    The runs go first: marked killed on the server before their containers stop, the agent cannot report
    them as failed, and an agent with no run left stops at once. False when the node was not running.
    """
    container = agent.find_agent(client, ref)
    if container is None or not agent.is_running(container):
        return False
    stopped = kill_runs(client, ref, settings)
    container.stop(timeout=int(grace_s))
    stopped += kill_runs(client, ref, settings)  # any run started while we were stopping the first ones
    for run in stopped:
        with contextlib.suppress(docker.errors.NotFound):
            run.remove(force=True)
    if stopped:
        ids = ", ".join(run.labels.get(LABEL_RUN_ID, "?") for run in stopped)
        click.echo(f"stopped runs {ids} of node {ref} and marked them killed")
    remove_job_volumes(client, ref.name)
    agent.forget_secrets(ref)
    return True


def kill_runs(client: DockerClient, ref: NodeRef, settings: NodeSettings) -> list[Container]:
    """Mark the node's running runs killed on the server, then stop their containers."""
    running = client.containers.list(
        filters={"label": f"{LABEL_NODE}={ref.name}", "status": "running"}, ignore_removed=True
    )
    if not running:
        return []
    run_ids = [int(c.labels[LABEL_RUN_ID]) for c in running if c.labels.get(LABEL_RUN_ID, "").isdigit()]
    logs = {
        int(c.labels[LABEL_RUN_ID]): agent.log_tail(c, 200)
        for c in running
        if c.labels.get(LABEL_RUN_ID, "").isdigit()
    }
    try:
        reason = classified(Reason.KILLED, "the node was stopped by its operator")
        server.mark_killed(settings, run_ids, reason, logs, quiet_keyring(settings))
    except OperatorError as exc:
        click.echo(f"warning: runs {run_ids} are stopped but not marked killed: {exc.message}", err=True)
    for run in running:
        run.stop(timeout=int(settings.kill_grace_s))
    return running


def remove_job_volumes(client: DockerClient, node: str) -> list[str]:
    """Remove this node's job volumes that no container uses any more (those of finished jobs)."""
    pattern = re.compile(rf"^vfed-{re.escape(node)}-[^-]+-tmp$")
    removed = []
    for volume in client.volumes.list():
        labels = volume.attrs.get("Labels") or {}
        if labels.get(LABEL_NODE) != node and not pattern.match(volume.name or ""):
            continue
        if labels.get(LABEL_NODE) not in (None, node):
            continue
        try:
            volume.remove()
            removed.append(str(volume.name))
        except docker.errors.APIError:
            continue  # still used by a run container: its job is not finished
    return removed


@click.command("stop", context_settings=CONTEXT)
@click.argument("name", required=False)
@scope_option
@click.option("--all", "stop_all", is_flag=True, help="Stop every running node of the scope.")
@click.option(
    "--grace", "grace_s", type=float, default=30.0, show_default=True, help="Seconds before SIGKILL."
)
def stop_command(name: str | None, user_scope: bool, stop_all: bool, grace_s: float) -> None:
    """Stop node NAME gracefully: its running algorithm containers are stopped and their runs marked killed.

    \b
    Examples:
      vnode stop hospital-a
      vnode stop --all --system
    """
    scope = to_scope(user_scope)
    if stop_all and name:
        raise click.UsageError("give NAME or --all, not both")
    client = engine()
    if stop_all:
        refs = [r for r in nodes_in(scope) if agent.is_running(agent.find_agent(client, r))]
    else:
        refs = [resolve(name, scope)]
    for ref in refs:
        if stop_node(client, ref, load(ref), grace_s):
            click.echo(f"stopped node {ref}")
        elif not stop_all:
            raise OperatorError(f"node {ref} is not running")
    if stop_all and not refs:
        click.echo(f"no node of the {scope} scope is running")


@click.command("attach", context_settings=CONTEXT)
@click.argument("name", required=False)
@scope_option
@click.option("--tail", default="50", show_default=True, help="Earlier lines to show first (or 'all').")
def attach_command(name: str | None, user_scope: bool, tail: str) -> None:
    """Follow node NAME's agent log until Ctrl-C (the node keeps running).

    \b
    Examples:
      vnode attach hospital-a
      vnode attach lab --system --tail all
    """
    ref = resolve(name, to_scope(user_scope))
    container = agent.find_agent(engine(), ref)
    if container is None:
        raise OperatorError(
            f"node {ref} has no container ({ref.container_name}); start it with `vnode start`"
        )
    if tail != "all" and not tail.isdigit():
        raise click.UsageError(f"--tail must be a number of lines or 'all', not {tail!r}")
    follow_logs(container, tail="all" if tail == "all" else int(tail))


@click.command("clean", context_settings=CONTEXT)
@click.argument("name", required=False)
@scope_option
def clean_command(name: str | None, user_scope: bool) -> None:
    """Remove what node NAME left behind: its stopped containers, its volumes (journal too) and networks.

    \b
    Examples:
      vnode clean hospital-a
    """
    ref = resolve(name, to_scope(user_scope))
    client = engine()
    own = agent.find_agent(client, ref)
    if agent.is_running(own):
        raise OperatorError(f"node {ref} is running; stop it first (`vnode stop {ref.name}`)")
    removed = []
    for c in ([own] if own else []) + client.containers.list(
        all=True, filters={"label": f"{LABEL_NODE}={ref.name}"}, ignore_removed=True
    ):
        with contextlib.suppress(docker.errors.NotFound):
            c.remove(force=True)
            removed.append(f"container {c.name}")
    removed += [f"volume {v}" for v in remove_job_volumes(client, ref.name)]
    for vol_name in (ref.volume_name,):
        try:
            client.volumes.get(vol_name).remove(force=True)
            removed.append(f"volume {vol_name}")
        except docker.errors.NotFound:
            pass
    for net in client.networks.list(names=[f"vfed-{ref.name}-net"]) + client.networks.list(
        filters={"label": f"{LABEL_NODE}={ref.name}"}
    ):
        try:
            net.remove()
            removed.append(f"network {net.name}")
        except docker.errors.NotFound:
            pass
    click.echo(
        "\n".join(f"removed {r}" for r in dict.fromkeys(removed)) or f"nothing left over for node {ref}"
    )
