"""The node agent in the foreground of this process, until SIGTERM or Ctrl-C: `vnode run` and
`vnode start --no-container` both run it so, with one clear `vnode: error:` line and exit 1 on failure."""

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
from vfed.node.runtime.base import RuntimeUnavailable
from vfed.proxy.rest import ServerUnavailable

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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


def log_levels(log_level: str) -> tuple[str, dict[str, str]]:
    """The `--log-level` option's value, or a usage error (exit 2) saying what is wrong with it."""
    try:
        return parse_log_levels(log_level)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--log-level") from None


async def _serve(settings: NodeSettings, rotate_key: bool) -> None:
    async with Agent(settings, rotate_key=rotate_key) as agent:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, agent.stop)
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, agent.reload_keys)  # a rotated key file, now
        await agent.run()


def run_agent(
    config_path: Path | None, levels: tuple[str, dict[str, str]], *, rotate_key: bool, environment: bool
) -> None:
    """Load the configuration (its file, and VFED_NODE__* over it when `environment`) and run the agent here
    until it is stopped; a failure is one line on stderr and exit 1."""
    root, per_logger = levels
    logging.basicConfig(level=root, format=LOG_FORMAT, stream=sys.stderr)
    for name, level in per_logger.items():
        logging.getLogger(name).setLevel(level)
    try:
        settings = load_settings(config_path, environment=environment)
        asyncio.run(_serve(settings, rotate_key))
    except ConfigError as exc:
        fail(f"bad configuration {config_path or '(environment)'}: {exc}")
    except (AgentStartError, KeyMismatch, ServerUnavailable, RuntimeUnavailable) as exc:
        fail(str(exc))
    except CryptoError as exc:
        fail(f"organization key: {exc}")
    except OSError as exc:  # an unwritable data_dir, a full disk, a port in use
        where = f"{exc.filename}: " if exc.filename else ""
        fail(f"{where}{exc.strerror or exc}")


def fail(message: str) -> None:
    click.echo(f"vnode: error: {message}", err=True)
    sys.exit(1)
