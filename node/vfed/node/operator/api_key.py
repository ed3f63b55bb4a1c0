"""`vnode api-key NAME`: install the API key the server answered when an admin rotated the node's key
(`POST /api/v1/nodes/{id}/api-key`). The old key stops working at the server at once; the node needs the new
one in its configuration and a restart.

The key is read from a file, stdin or a hidden prompt, never from the command line (shell history, `ps`), and
checked against the server before it is written, so a typo does not replace a working configuration."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from vfed.node.config import ConfigError, parse_settings
from vfed.node.operator import server
from vfed.node.operator.common import CONTEXT, BadInput, OperatorError, scope_option, to_scope
from vfed.node.operator.paths import interactive, resolve

_HELP = """Replace node NAME's API key with the one the server printed after a key rotation.

\b
The key is read from --api-key-file (a file, or - for stdin) or asked for without echo. It is tried against
the server first (a login with it); --no-check skips that, e.g. when the server is not reachable from here.
Restart the node afterwards (`vnode stop NAME && vnode start NAME`): the running agent still holds the old
key, which the server refuses since the rotation.

\b
Examples:
  vnode api-key hospital-a --api-key-file /root/new-key.txt
  printf '%s' "$KEY" | vnode api-key hospital-a --api-key-file -
  vnode api-key hospital-a            (asks for the key)
"""


def _read_key(source: str | None) -> str:
    if source == "-":
        text = sys.stdin.read()
    elif source is not None:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise BadInput("--api-key-file", f"cannot read {source}: {exc.strerror or exc}") from None
    elif interactive():
        text = click.prompt("New node API key (<key_id>.<secret>)", hide_input=True)
    else:
        raise click.UsageError("give the new key with --api-key-file FILE, or --api-key-file - for stdin")
    key = text.strip()
    key_id, dot, secret = key.partition(".")
    if not dot or not key_id or not secret or any(ch.isspace() for ch in key):
        raise BadInput("--api-key-file", "an API key has the form <key_id>.<secret>, on one line")
    return key


def _key_file(config_path: Path, data: dict[str, Any]) -> Path | None:
    """The file the config names with `api_key_file` (relative: from the config's folder), if any."""
    given = data.get("api_key_file")
    if not isinstance(given, str) or not given:
        return None
    path = Path(given)
    return path if path.is_absolute() else config_path.resolve().parent / path


def _write_key_file(path: Path, key: str) -> None:
    """The key alone in the secret file the config points to (0600, atomic rename)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(key + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        reason = exc.strerror or exc
        raise OperatorError(f"cannot write the new key to {path} (api_key_file): {reason}") from None


def _write(path: Path, text: str, data: dict[str, Any], key: str) -> None:
    """Replace the `api_key:` line when that is unambiguous (comments stay), else write the mapping anew;
    mode 0600 and an atomic rename either way (the file holds the key)."""
    wanted = {**data, "api_key": key}
    edited, count = re.subn(r"(?m)^api_key:.*$", lambda _: "api_key: " + json.dumps(key), text)
    if count != 1 or yaml.safe_load(edited) != wanted:
        edited = yaml.safe_dump(wanted, sort_keys=False)
    tmp = path.with_suffix(".yaml.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(edited)
    os.replace(tmp, path)


@click.command("api-key", help=_HELP, context_settings=CONTEXT)
@click.argument("name", required=False)
@scope_option
@click.option("--api-key-file", "source", metavar="FILE|-", help="Read the new key from FILE (- for stdin).")
@click.option("--check/--no-check", default=True, help="Log in with the new key before writing it.")
def api_key_command(name: str | None, user_scope: bool, source: str | None, check: bool) -> None:
    ref = resolve(name, to_scope(user_scope))
    text = ref.config_path.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise OperatorError(f"invalid config {ref.config_path}: the top level is not a mapping")
    key = _read_key(source)
    key_file = _key_file(ref.config_path, data)
    candidate = {k: v for k, v in data.items() if k != "api_key_file"}
    try:
        settings = parse_settings({**candidate, "api_key": key}, base_dir=ref.config_path.resolve().parent)
    except ConfigError as exc:
        raise OperatorError(f"invalid config {ref.config_path}: {exc}") from None
    if check:
        try:
            session = server.login(settings)
        except server.ServerRefused as exc:
            raise OperatorError(f"the server refused the new key, nothing written ({exc})") from None
        except OperatorError as exc:
            raise OperatorError(f"{exc}; nothing written (--no-check writes the key unchecked)") from None
        click.echo(
            f"the server accepts the key: node {session.node_id} of organization {session.organization_id}"
        )
    if key_file is not None:
        _write_key_file(key_file, key)  # the config keeps pointing there (a Docker/Kubernetes secret's file)
    else:
        _write(ref.config_path, text, data, key)
    click.echo(
        f"wrote the new API key (key id {key.partition('.')[0]}) to {key_file or ref.config_path}; restart "
        f"the node: vnode stop {ref.name} && vnode start {ref.name}"
    )
