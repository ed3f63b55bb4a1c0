"""`vnode users certify|revoke`: the organization vouches for a researcher's own key, or takes that back.

Certificates and revocations are signed here with the organization's current key and stored by the server;
nodes check them against the organization's pinned key chain, so the server cannot forge one.
"""

from __future__ import annotations

import json
import re
import time

import click

from vfed.common.crypto import CryptoError, PublicKey
from vfed.common.trust import SignedEntry, TrustError, certify, revoke
from vfed.node.operator import server
from vfed.node.operator.common import CONTEXT, OperatorError, load, scope_option, to_scope
from vfed.node.operator.keys import open_keyring
from vfed.node.operator.paths import resolve

_DIGEST = re.compile(r"^[0-9a-f]{64}$")

_HELP = """Certify researchers' own keys for this organization, or revoke certificates.

\b
A researcher makes a key pair (`vfed keys generate`) and hands over its public key; the org admin certifies
it here with the organization's key. The researcher then signs tasks with that key, and results are sealed to
it: the organization's private key stays on its node.

\b
Examples:
  vnode users certify 12 --key "vfed-pk1:..." --username alice --roles researcher --days 180 hospital-a
  vnode users revoke --user 12 --reason "left the project" hospital-a
  vnode users revoke 5f2a...e9 hospital-a
"""


@click.group("users", help=_HELP, context_settings=CONTEXT)
def users_group() -> None:
    pass


@users_group.command("certify", context_settings=CONTEXT)
@click.argument("user_id", type=click.IntRange(min=1))
@click.argument("name", required=False)
@scope_option
@click.option("--key", "key_text", required=True, metavar="PUBLIC_KEY", help="The researcher's public key.")
@click.option("--username", default=None, help="Shown in the certificate [default: the server's name].")
@click.option("--roles", default="researcher", show_default=True, help="Comma-separated role names.")
@click.option("--days", type=click.IntRange(min=1, max=3650), default=365, show_default=True)
@click.option(
    "--seal-to-organization",
    is_flag=True,
    help="Policy: this researcher's results are sealed to the organization's key too.",
)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def certify_command(
    user_id: int,
    name: str | None,
    user_scope: bool,
    key_text: str,
    username: str | None,
    roles: str,
    days: int,
    seal_to_organization: bool,
    fmt: str,
) -> None:
    """Sign a certificate for USER_ID's key with the organization's current key and store it on the server."""
    settings = load(resolve(name, to_scope(user_scope)))
    try:
        researcher_key = PublicKey.from_text(key_text.strip())
    except CryptoError as exc:
        raise click.BadParameter(f"not a public key: {exc}", param_hint="--key") from None
    keyring, _ = open_keyring(settings)
    organization = server.organization_id(settings)
    if username is None:
        username = server.user_name(settings, user_id)
    role_names = [r.strip() for r in roles.split(",") if r.strip()]
    entry = certify(
        keyring.current,
        organization,
        user_id,
        username,
        researcher_key,
        roles=role_names,
        validity_s=days * 86400,
        seal_to_organization=seal_to_organization,
    )
    server.post_certificate(settings, entry)
    expires = time.strftime("%Y-%m-%d", time.gmtime(int(entry.body["expires_at"])))
    if fmt == "json":
        click.echo(json.dumps({"digest": entry.digest, "expires_at": entry.body["expires_at"], **entry.body}))
        return
    click.echo(
        f"certified key {researcher_key.key_id} of user {user_id}{f' ({username})' if username else ''} "
        f"for organization {organization} until {expires}"
    )
    click.echo(f"certificate {entry.digest}")


@users_group.command("revoke", context_settings=CONTEXT)
@click.argument("digest", required=False, metavar="[CERT_DIGEST]")
@click.argument("name", required=False)
@click.option("--system", "system_scope", is_flag=True, help="A node of the system scope (/etc/vfed).")
@click.option("--user", "user_id", type=click.IntRange(min=1), help="Revoke every certificate of this user.")
@click.option("--reason", default="", help="Kept in the revocation (at most 500 characters).")
def revoke_command(
    digest: str | None, name: str | None, system_scope: bool, user_id: int | None, reason: str
) -> None:
    """Revoke one certificate (by its digest) or every certificate of a user (--user).

    Here `--user` names the user; the node's scope is the user scope unless --system is given.
    """
    if digest is not None and name is None and not _DIGEST.match(digest.strip().lower()):
        name, digest = digest, None  # `revoke --user 12 NAME`: the one argument is the node's name
    if (digest is None) == (user_id is None):
        raise click.UsageError("name either a certificate digest or --user USER_ID")
    settings = load(resolve(name, to_scope(not system_scope)))
    keyring, _ = open_keyring(settings)
    organization, rows = server.certificates(settings, user_id)
    chosen = _chosen(rows, digest, user_id)
    if not chosen:
        what = f"certificate {digest}" if digest else f"unrevoked certificate of user {user_id}"
        raise OperatorError(f"the server lists no {what} for organization {organization}")
    for entry in chosen:
        server.post_revocation(settings, revoke(keyring.current, organization, entry, reason))
        click.echo(f"revoked certificate {entry.digest} of user {entry.body.get('user')}")


def _chosen(rows: list[dict[str, object]], digest: str | None, user_id: int | None) -> list[SignedEntry]:
    """The listed certificates to revoke: the one with this digest, or the user's not yet revoked."""
    out = []
    for row in rows:
        try:
            entry = SignedEntry.parse(row.get("certificate"))  # type: ignore[arg-type]
        except TrustError:
            continue
        if digest is not None and entry.digest == digest.strip().lower():
            return [entry]
        if user_id is not None and entry.body.get("user") == user_id and row.get("revocation") is None:
            out.append(entry)
    return out if digest is None else []
