"""Where node configurations live (user scope: platformdirs; system scope: /etc/vfed), and NAME lookup.

Both scopes can be moved with environment variables so an operator (or a test) can keep them elsewhere:
``VFED_SYSTEM_CONFIG_DIR`` / ``VFED_SYSTEM_DATA_DIR``; the user scope follows the XDG variables.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import click
import platformdirs

APP = "vfed"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
NAME_RULE = "a lowercase letter or digit, then up to 39 lowercase letters, digits, '_' or '-'"


class Scope(StrEnum):
    USER = "user"
    SYSTEM = "system"


def config_dir(scope: Scope) -> Path:
    """The folder holding `<name>.yaml` node configurations of this scope."""
    if scope is Scope.SYSTEM:
        return Path(os.environ.get("VFED_SYSTEM_CONFIG_DIR", "/etc/vfed")) / "nodes"
    return Path(platformdirs.user_config_dir(APP)) / "nodes"


def data_root(scope: Scope) -> Path:
    """The folder under which each node of this scope gets its own data folder (key, container config)."""
    if scope is Scope.SYSTEM:
        return Path(os.environ.get("VFED_SYSTEM_DATA_DIR", "/var/lib/vfed")) / "nodes"
    return Path(platformdirs.user_data_dir(APP)) / "nodes"


@dataclass(frozen=True)
class NodeRef:
    """One node configuration: its name, scope and file."""

    name: str
    scope: Scope

    @property
    def config_path(self) -> Path:
        return config_dir(self.scope) / f"{self.name}.yaml"

    @property
    def data_dir(self) -> Path:
        return data_root(self.scope) / self.name

    @property
    def container_name(self) -> str:
        return f"vfed-{self.name}-{self.scope.value}"

    @property
    def volume_name(self) -> str:
        return f"vfed-{self.name}-vol"

    def __str__(self) -> str:
        return f"{self.name} ({self.scope.value})"


def check_name(name: str) -> str:
    """NAME ends up in container and volume names: refuse what Docker would refuse, with the rule."""
    if not NAME_RE.match(name):
        raise click.UsageError(f"invalid node name {name!r}: use {NAME_RULE}")
    return name


def nodes_in(scope: Scope) -> list[NodeRef]:
    """Every configuration of one scope, sorted by name."""
    folder = config_dir(scope)
    try:
        files = sorted(folder.glob("*.yaml"))
    except OSError:
        return []
    return [NodeRef(f.stem, scope) for f in files if NAME_RE.match(f.stem)]


def all_nodes() -> list[NodeRef]:
    return nodes_in(Scope.USER) + nodes_in(Scope.SYSTEM)


def interactive() -> bool:
    """True when a person can answer a question (both ends are terminals)."""
    return sys.stdin.isatty() and sys.stdout.isatty()


def resolve(name: str | None, scope: Scope) -> NodeRef:
    """The node NAME in this scope; without NAME, the only one, a choice from a list, or a usage error."""
    if name is not None:
        ref = NodeRef(check_name(name), scope)
        if ref.config_path.is_file():
            return ref
        other = NodeRef(name, Scope.USER if scope is Scope.SYSTEM else Scope.SYSTEM)
        hint = (
            f" (there is one in the {other.scope} scope: add --{other.scope})"
            if other.config_path.is_file()
            else ""
        )
        raise click.ClickException(f"no such node: {name!r} in the {scope} scope{hint}; see `vnode list`")
    found = nodes_in(scope)
    if not found:
        raise click.ClickException(
            f"no node configured in the {scope} scope ({config_dir(scope)}); create one with `vnode new`"
        )
    if len(found) == 1:
        return found[0]
    names = ", ".join(r.name for r in found)
    if not interactive():
        raise click.UsageError(f"several nodes in the {scope} scope, name one: {names}")
    for i, ref in enumerate(found, 1):
        click.echo(f"  {i}) {ref.name}")
    choice = click.prompt("Which node?", type=click.IntRange(1, len(found)))
    return found[choice - 1]
