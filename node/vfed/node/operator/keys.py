"""`vnode keys generate|show|upload|rotate`: the organization key, for org admins.

The key file holds every private key of the organization (the last one is current, older ones still decrypt);
it is written with mode 0600 and optionally protected by a passphrase. Other organizations pin the fingerprint
of its first key; the server stores the chain of signed key records (first key, then each rotation).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click
import yaml

from vfed.common.crypto import CryptoError, Keyring, WrongPassphrase
from vfed.common.secret_file import SecretFileError, read_secret_file
from vfed.common.trust import fingerprint
from vfed.node.config import NodeSettings
from vfed.node.operator import server
from vfed.node.operator.common import CONTEXT, OperatorError, load, scope_option, to_scope
from vfed.node.operator.paths import NodeRef, interactive, resolve

_HELP = """Manage the organization key of node NAME (generate, show, upload, rotate).

\b
Examples:
  vnode keys generate hospital-a                  # new key file, mode 0600, no passphrase
  VFED_KEY_PASS=... vnode keys generate hospital-a --passphrase-env VFED_KEY_PASS --force
  vnode keys show hospital-a --format json         # the fingerprint to hand to other organizations
  vnode keys upload hospital-a                    # publish the key records on the server
  vnode keys rotate hospital-a                    # new current key, old ones kept to decrypt old results
"""


def generate_file(path: Path, passphrase: str | None) -> str:
    """Create a new keyring file (0600) at path; returns the key id."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    keyring = Keyring.generate()
    try:
        keyring.save(path, passphrase)
    except (CryptoError, OSError) as exc:
        raise OperatorError(f"cannot write key file {path}: {exc}") from None
    return keyring.current.key_id


def _passphrase(settings: NodeSettings) -> str | None:
    if settings.private_key_passphrase_file is not None:
        try:
            return read_secret_file(settings.private_key_passphrase_file, "private_key_passphrase_file")
        except SecretFileError as exc:
            raise OperatorError(str(exc)) from None
    name = settings.private_key_passphrase_env
    if name is None:
        return None
    value = os.environ.get(name)
    if value:
        return value
    if interactive():
        return str(click.prompt(f"Passphrase for {settings.key_path} (${name} is unset)", hide_input=True))
    raise OperatorError(f"the key file needs a passphrase: set the environment variable {name}")


def open_keyring(settings: NodeSettings) -> tuple[Keyring, str | None]:
    """The node's keyring and the passphrase that opened it; every failure is one clear line."""
    secret = _passphrase(settings)
    try:
        return Keyring.load(settings.key_path, secret), secret
    except WrongPassphrase as exc:
        if secret is None and interactive():
            secret = str(click.prompt(f"Passphrase for {settings.key_path}", hide_input=True))
            try:
                return Keyring.load(settings.key_path, secret), secret
            except CryptoError as again:
                raise OperatorError(f"cannot open key file {settings.key_path}: {again}") from None
        raise OperatorError(f"cannot open key file {settings.key_path}: {exc}") from None
    except CryptoError as exc:
        hint = "; create one with `vnode keys generate`" if not settings.key_path.exists() else ""
        raise OperatorError(f"cannot open key file {settings.key_path}: {exc}{hint}") from None


def _set_passphrase_env(ref: NodeRef, variable: str) -> None:
    from vfed.node.operator.new import write_config

    data: Any = yaml.safe_load(ref.config_path.read_text(encoding="utf-8"))
    data["private_key_passphrase_env"] = variable
    data.pop("private_key_passphrase_file", None)  # the new key's passphrase is the variable's
    write_config(ref.config_path, data)


@click.group("keys", help=_HELP, context_settings=CONTEXT)
def keys_group() -> None:
    pass


@keys_group.command("generate", context_settings=CONTEXT)
@click.argument("name", required=False)
@scope_option
@click.option("--passphrase", "ask", is_flag=True, help="Protect the file with a passphrase (asked twice).")
@click.option(
    "--passphrase-env", metavar="VAR", help="Take the passphrase from $VAR; the config records VAR."
)
@click.option("--force", is_flag=True, help="Replace an existing key file (its keys are lost!).")
def generate_command(
    name: str | None, user_scope: bool, ask: bool, passphrase_env: str | None, force: bool
) -> None:
    """Write a new organization key file (mode 0600) where the node's config points."""
    ref = resolve(name, to_scope(user_scope))
    settings = load(ref)
    path = settings.key_path
    if path.exists() and not force:
        raise OperatorError(
            f"{path} exists; add --force to replace it (its keys are lost), or `vnode keys rotate`"
        )
    secret: str | None = None
    if passphrase_env:
        secret = os.environ.get(passphrase_env)
        if not secret:
            raise OperatorError(
                f"--passphrase-env names {passphrase_env}, but that variable is empty or unset"
            )
    elif ask:
        if not interactive():
            raise click.UsageError(
                "--passphrase asks on a terminal; use --passphrase-env VAR when not interactive"
            )
        secret = str(click.prompt("Passphrase", hide_input=True, confirmation_prompt=True))
    key_id = generate_file(path, secret)
    if passphrase_env and settings.private_key_passphrase_env != passphrase_env:
        _set_passphrase_env(ref, passphrase_env)
    click.echo(f"generated organization key {key_id} at {path} (mode 0600)")
    click.echo(
        f"publish it with `vnode keys upload {ref.name}` (or the agent does at start if the server has none)"
    )


@keys_group.command("show", context_settings=CONTEXT)
@click.argument("name", required=False)
@scope_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def show_command(name: str | None, user_scope: bool, fmt: str) -> None:
    """Print the organization's fingerprint, the current public key and its key id (and older key ids still
    kept for decryption)."""
    settings = load(resolve(name, to_scope(user_scope)))
    keyring, _ = open_keyring(settings)
    public = keyring.current.public
    older = [k.key_id for k in keyring.keys[:-1]]
    print_ = fingerprint(keyring.keys[0].public)
    if fmt == "json":
        doc = {"fingerprint": print_, "key_id": public.key_id, "public_key": public.to_text()}
        click.echo(json.dumps({**doc, "older_key_ids": older}))
        return
    click.echo(f"fingerprint: {print_}")
    click.echo(f"key_id:      {public.key_id}")
    click.echo(f"public_key:  {public.to_text()}")
    if older:
        click.echo(f"older keys:  {', '.join(older)}")
    click.echo(
        "Hand the fingerprint to the admins of the other organizations over a channel you trust (not the "
        "server): they pin it with `vnode trust ORG --fingerprint F` (researchers: `vfed trust`)."
    )


@keys_group.command("upload", context_settings=CONTEXT)
@click.argument("name", required=False)
@scope_option
def upload_command(name: str | None, user_scope: bool) -> None:
    """Publish the organization's key records (first key, rotations) the server does not hold yet."""
    settings = load(resolve(name, to_scope(user_scope)))
    keyring, _ = open_keyring(settings)
    published = server.publish_key_chain(settings, keyring)
    what = f"{len(published)} key record(s)" if published else "nothing new (the server holds the chain)"
    click.echo(f"published {what}; current key {keyring.current.key_id}")


@keys_group.command("rotate", context_settings=CONTEXT)
@click.argument("name", required=False)
@scope_option
@click.option(
    "--no-upload", is_flag=True, help="Only change the key file; upload later with `vnode keys upload`."
)
def rotate_command(name: str | None, user_scope: bool, no_upload: bool) -> None:
    """Add a new current key, keep the old ones for decryption, and publish the rotation record.

    A running agent using this key file picks the new key up by itself (it watches the file).
    """
    ref = resolve(name, to_scope(user_scope))
    settings = load(ref)
    keyring, secret = open_keyring(settings)
    key = keyring.rotate()
    # Saved before the upload: a key the server publishes but we lost would make new inputs unreadable.
    try:
        keyring.save(settings.key_path, secret)
    except (CryptoError, OSError) as exc:
        raise OperatorError(f"cannot write key file {settings.key_path}: {exc}") from None
    click.echo(f"new current key {key.key_id} in {settings.key_path} ({len(keyring.keys) - 1} older kept)")
    if not no_upload:
        try:
            server.publish_key_chain(settings, keyring)
        except OperatorError as exc:
            raise OperatorError(
                f"{exc.message}; the key file has the new key: retry `vnode keys upload {ref.name}` (a "
                "running agent also publishes it once it reads the file)"
            ) from None
        click.echo(f"published the rotation to key {key.key_id}")
    click.echo("a running agent using this key file switches to the new key within seconds (no restart)")
