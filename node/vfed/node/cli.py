"""`vnode`: the node's command line. `vnode run --config FILE` runs the agent in the foreground."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

import click

from vfed.common.crypto import CryptoError
from vfed.node.agent import Agent, AgentStartError
from vfed.node.config import ConfigError, NodeSettings, load_settings
from vfed.node.keys import KeyMismatch
from vfed.node.operator import COMMANDS as OPERATOR_COMMANDS
from vfed.node.operator.image_build import image_group
from vfed.node.runtime.base import RuntimeUnavailable
from vfed.proxy.rest import ServerUnavailable


@click.group()
@click.version_option(package_name="vfed", prog_name="vnode")
def main() -> None:
    """vfed node: runs algorithms on this organization's data, on request of the federation."""


async def _serve(settings: NodeSettings, rotate_key: bool) -> None:
    async with Agent(settings, rotate_key=rotate_key) as agent:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, agent.stop)
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, agent.reload_keys)  # a rotated key file, now
        await agent.run()


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
    try:
        root, per_logger = parse_log_levels(log_level)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--log-level") from None
    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=root, format=log_format, stream=sys.stderr)
    for name, level in per_logger.items():
        logging.getLogger(name).setLevel(level)
    try:
        settings = load_settings(config_path, environment=True)
        asyncio.run(_serve(settings, rotate_key))
    except ConfigError as exc:
        _fail(f"bad configuration {config_path or '(environment)'}: {exc}")
    except (AgentStartError, KeyMismatch, ServerUnavailable, RuntimeUnavailable) as exc:
        _fail(str(exc))
    except CryptoError as exc:
        _fail(f"organization key: {exc}")
    except OSError as exc:  # an unwritable data_dir, a full disk, a port in use
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}")


def parse_log_levels(spec: str) -> tuple[str, dict[str, str]]:
    """`LEVEL[,logger=LEVEL...]` -> (root level, {logger: level}); ValueError names what is wrong."""
    known = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
    root, *items = [part.strip() for part in spec.split(",")]
    per_logger = {}
    for item in items:
        name, sep, level = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{item!r} is not LOGGER=LEVEL")
        per_logger[name.strip()] = level.strip().upper()
    for level in [root.upper(), *per_logger.values()]:
        if level not in known:
            raise ValueError(f"unknown level {level!r} (one of {', '.join(sorted(known))})")
    return root.upper(), per_logger


def _fail(message: str) -> None:
    click.echo(f"vnode: error: {message}", err=True)
    sys.exit(1)


# The operator's commands (new, keys, trust, users, start, stop, ...) live in vfed.node.operator.
for _command in OPERATOR_COMMANDS:
    main.add_command(_command)
main.add_command(image_group)  # `vnode image build`
