"""`vnode`: the node's command line. `vnode run --config FILE` runs the agent in the foreground."""

from __future__ import annotations

from pathlib import Path

import click

from vfed.node.foreground import log_levels, parse_log_levels, run_agent
from vfed.node.operator import COMMANDS as OPERATOR_COMMANDS
from vfed.node.operator.image_build import image_group

__all__ = ["main", "parse_log_levels"]


@click.group()
@click.version_option(package_name="vfed", prog_name="vnode")
def main() -> None:
    """vfed node: runs algorithms on this organization's data, on request of the federation."""


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="Node YAML file; VFED_NODE__<KEY> variables override its keys (without it, they are the whole "
    "configuration). Every key: docs/vnode.md, 'Node configuration reference'.",
)
@click.option("--rotate-key", is_flag=True, help="Make a new organization key and publish it.")
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    help="DEBUG, INFO, WARNING or ERROR, optionally followed by LOGGER=LEVEL items, comma-separated "
    "(e.g. INFO,vfed.node.timeline=DEBUG).",
)
def run(config_path: Path | None, rotate_key: bool, log_level: str) -> None:
    """Run the node agent in the foreground until SIGTERM or Ctrl-C."""
    run_agent(config_path, log_levels(log_level), rotate_key=rotate_key, environment=True)


# The operator's commands (new, keys, trust, users, start, stop, ...) live in vfed.node.operator.
for _command in OPERATOR_COMMANDS:
    main.add_command(_command)
main.add_command(image_group)  # `vnode image build`
