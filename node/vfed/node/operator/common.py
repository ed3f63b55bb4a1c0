"""What every vnode operator command shares: the scope option, NAME, config loading and the Docker engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click
import docker
import docker.errors
from docker import DockerClient

from vfed.node.config import ConfigError, NodeSettings, load_settings
from vfed.node.operator.paths import NodeRef, Scope

F = TypeVar("F", bound=Callable[..., Any])

# Labels of the agent container; distinct from the runtime's `vfed.node`, which marks algorithm containers.
LABEL_ROLE = "vfed.role"
ROLE_AGENT = "node-agent"
LABEL_AGENT_NODE = "vfed.agent.node"
LABEL_AGENT_SCOPE = "vfed.agent.scope"

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class OperatorError(click.ClickException):
    """A failure the operator can act on; click prints it as one `Error: ...` line and exits 1."""


class BadInput(OperatorError):
    """A value the command cannot use (`--expires soon`): one `Error: OPTION: ...` line, exit 2 like a usage
    error, without click's usage lines."""

    exit_code = 2

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")


def scope_option(func: F) -> F:
    """`--user` (default) or `--system`: which configuration folder the command works in."""
    return click.option(
        "--user/--system",
        "user_scope",
        default=True,
        help="Configuration folder: the user's (default) or the system's (/etc/vfed).",
    )(func)


def to_scope(user_scope: bool) -> Scope:
    return Scope.USER if user_scope else Scope.SYSTEM


def load(ref: NodeRef) -> NodeSettings:
    """The node's validated settings; a bad file is one line naming the key and the reason."""
    try:
        return load_settings(ref.config_path)
    except ConfigError as exc:
        raise OperatorError(f"invalid config {ref.config_path}: {exc}") from None


def engine() -> DockerClient:
    """A connected Docker client, or one clear line saying the engine does not answer."""
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except docker.errors.DockerException as exc:
        raise OperatorError(f"Docker engine not running or not reachable: {_short(exc)}") from None
    return client


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
