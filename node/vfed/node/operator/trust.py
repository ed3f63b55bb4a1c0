"""`vnode trust|untrust`: the organizations this node runs tasks for, pinned by the fingerprint of their first
key (like SSH's known_hosts). A running agent picks the file's changes up at its next check."""

from __future__ import annotations

import json

import click

from vfed.common.trust import Pin, TrustStore, TrustStoreError, parse_fingerprint, show_fingerprint
from vfed.node.config import NodeSettings
from vfed.node.operator.common import CONTEXT, OperatorError, load, scope_option, to_scope
from vfed.node.operator.paths import resolve

_TRUST_HELP = """Pin organization ORG by the fingerprint of its first key, or list the pins (`trust list`).

\b
Get the fingerprint from the other organization's admin (`vnode keys show` prints it there), over a channel
you trust, not from the server. A node in `trust: pinned` mode (the default) runs tasks only for pinned
organizations; `trust: tofu` pins at first sight. After a key fork, --head names the key to follow.

\b
Examples:
  vnode trust 3 --fingerprint 1a2b-3c4d-5e6f-7a8b-9c0d-1e2f-3a4b-5c6d hospital-a
  vnode trust 3 --fingerprint 1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d --head 9f8e... --note "after the incident"
  vnode trust list hospital-a --format json
  vnode untrust 3 hospital-a
"""


def open_store(settings: NodeSettings) -> TrustStore:
    try:
        return TrustStore(settings.trust_store_path)
    except TrustStoreError as exc:
        raise OperatorError(str(exc)) from None


def _organization(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an organization id", param_hint="ORG") from None
    if value <= 0:
        raise click.BadParameter("organization ids are positive", param_hint="ORG")
    return value


def _pin_row(pin: Pin) -> dict[str, object]:
    return {
        "organization_id": pin.organization_id,
        "fingerprint": show_fingerprint(pin.root),
        "head": pin.head,
        "note": pin.note,
    }


@click.command("trust", help=_TRUST_HELP, context_settings=CONTEXT)
@click.argument("org")
@click.argument("name", required=False)
@scope_option
@click.option("--fingerprint", "fingerprint_text", metavar="F", help="The fingerprint of ORG's first key.")
@click.option("--head", metavar="KEY_ID", help="After a fork of ORG's key chain: the key to follow.")
@click.option("--note", default="", help="A comment kept beside the pin.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def trust_command(
    org: str,
    name: str | None,
    user_scope: bool,
    fingerprint_text: str | None,
    head: str | None,
    note: str,
    fmt: str,
) -> None:
    settings = load(resolve(name, to_scope(user_scope)))
    store = open_store(settings)
    if org == "list":
        _list(store, settings, fmt)
        return
    organization = _organization(org)
    if not fingerprint_text:
        raise click.UsageError("--fingerprint is required: the fingerprint of the organization's first key")
    try:
        root = parse_fingerprint(fingerprint_text)
        key_head = parse_fingerprint(head) if head else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fingerprint/--head") from None
    previous = store.get(organization)
    try:
        pin = store.pin(organization, root, key_head, note)
    except TrustStoreError as exc:
        raise OperatorError(str(exc)) from None
    if fmt == "json":
        click.echo(json.dumps(_pin_row(pin)))
        return
    verb = "re-pinned" if previous is not None and previous.root != pin.root else "pinned"
    click.echo(f"{verb} organization {organization} to {show_fingerprint(pin.root)} in {store.path}")
    if previous is not None and previous.root != pin.root:
        click.echo(f"(it was pinned to {show_fingerprint(previous.root)})")


def _list(store: TrustStore, settings: NodeSettings, fmt: str) -> None:
    pins = store.pins()
    if fmt == "json":
        click.echo(json.dumps([_pin_row(p) for p in pins]))
        return
    click.echo(f"trust mode {settings.trust}; pins in {store.path}")
    if not pins:
        click.echo("no organization pinned (this node's own organization is always trusted)")
    for pin in pins:
        head = f"  head={pin.head}" if pin.head else ""
        note = f"  # {pin.note}" if pin.note else ""
        click.echo(f"{pin.organization_id:>6}  {show_fingerprint(pin.root)}{head}{note}")


@click.command("untrust", context_settings=CONTEXT)
@click.argument("org")
@click.argument("name", required=False)
@scope_option
def untrust_command(org: str, name: str | None, user_scope: bool) -> None:
    """Remove organization ORG's pin: in `pinned` mode this node then refuses its tasks."""
    settings = load(resolve(name, to_scope(user_scope)))
    store = open_store(settings)
    organization = _organization(org)
    try:
        found = store.unpin(organization)
    except TrustStoreError as exc:
        raise OperatorError(str(exc)) from None
    if not found:
        raise OperatorError(f"organization {organization} is not pinned in {store.path}")
    click.echo(f"removed the pin of organization {organization} from {store.path}")
