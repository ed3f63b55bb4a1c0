"""`vnode logs RUN_ID`: read a run's log tail, which the node sealed to its organization's key.

A run's log can quote the data it worked on, so it leaves the node sealed (vfed.node.log_sealing); the server
holds an envelope it cannot read. This command fetches the run with the node's API key and opens the
envelope with the organization's keyring, checking that one of the organization's keys signed it and that
it belongs to this run.
"""

from __future__ import annotations

import os

import click

from vfed.common.api import RunLogError, open_log
from vfed.common.crypto import CryptoError, Keyring, PublicKey
from vfed.common.secret_file import SecretFileError, read_secret_file
from vfed.node.config import NodeSettings
from vfed.node.operator import server
from vfed.node.operator.common import CONTEXT, OperatorError, load, scope_option, to_scope
from vfed.node.operator.keys import open_keyring
from vfed.node.operator.paths import resolve

_HELP = """Print the log tail of run RUN_ID of this node's organization, opened with the organization's key.

\b
Examples:
  vnode logs 42
  vnode logs 42 hospital-a --system
"""


def quiet_keyring(settings: NodeSettings) -> Keyring | None:
    """The organization's keyring when it opens without asking anyone (no passphrase, or one from the
    configured file or environment variable); None otherwise."""
    secret: str | None = None
    try:
        if settings.private_key_passphrase_file is not None:
            secret = read_secret_file(settings.private_key_passphrase_file, "private_key_passphrase_file")
        elif settings.private_key_passphrase_env is not None:
            secret = os.environ.get(settings.private_key_passphrase_env) or None
        return Keyring.load(settings.key_path, secret)
    except (CryptoError, OSError, SecretFileError):
        return None


def read_run_log(settings: NodeSettings, keyring: Keyring, run_id: int) -> str:
    """The run's plaintext log tail; OperatorError (one line) when there is none or it does not open."""
    session = server.login(settings)
    run = server.get_run(session, run_id)
    sealed = run.get("sealed_log")
    if not sealed:
        raise OperatorError(f"run {run_id} has no sealed log (its node sent none, or the run has not ended)")
    try:
        organization_id, task_id = int(run["organization_id"]), int(run["task_id"])
    except (KeyError, TypeError, ValueError):
        raise OperatorError(
            f"the server's answer for run {run_id} lacks organization_id or task_id"
        ) from None
    if organization_id != session.organization_id:
        raise OperatorError(f"run {run_id} ran at organization {organization_id}, not at this node's")

    def own_key(key_id: str) -> PublicKey | None:
        key = keyring.get(key_id)
        return key.public if key is not None else None

    try:
        return open_log(
            str(sealed), keyring, own_key, organization_id=organization_id, task_id=task_id, run_id=run_id
        )
    except RunLogError as exc:
        raise OperatorError(str(exc)) from None


@click.command("logs", help=_HELP, context_settings=CONTEXT)
@click.argument("run_id", type=click.IntRange(min=1))
@click.argument("name", required=False)
@scope_option
def logs_command(run_id: int, name: str | None, user_scope: bool) -> None:
    ref = resolve(name, to_scope(user_scope))
    settings = load(ref)
    keyring, _ = open_keyring(settings)
    click.echo(read_run_log(settings, keyring, run_id), nl=False)
