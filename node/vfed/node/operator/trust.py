"""`vnode trust|untrust`: the organizations this node runs tasks for, pinned by the fingerprint of their first
key (like SSH's known_hosts). A running agent picks the file's changes up at its next check.

`vnode trust import FILE` pins from the federation file (`vserver import`'s, with fingerprints): that trusts
whoever wrote the file, the server's operator in a single-operator setup."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from vfed.common.trust import Pin, TrustStore, TrustStoreError, parse_fingerprint, show_fingerprint
from vfed.common.trust.truststore import FederationFileError, NamedPin, pin_named, read_federation_file
from vfed.node.config import NodeSettings
from vfed.node.operator import server
from vfed.node.operator.common import CONTEXT, OperatorError, load, scope_option, to_scope
from vfed.node.operator.paths import resolve

_TRUST_HELP = """Pin organization ORG by the fingerprint of its first key, list the pins (`trust list`), or
pin the organizations a federation file names with their fingerprints (`trust import FILE`).

\b
Get the fingerprint from the other organization's admin (`vnode keys show` prints it there), over a channel
you trust, not from the server. A node in `trust: pinned` mode (the default) runs tasks only for pinned
organizations; `trust: tofu` pins at first sight. After a key fork, --head names the key to follow.
`trust import FILE` reads `organizations: [{name, fingerprint}]` (the `vserver import` file), finds each
organization's id on the server by its name and pins it: that trusts whoever wrote FILE (in a single-operator
setup, the server's operator, who could then also swap keys).

\b
Examples:
  vnode trust 3 --fingerprint 1a2b-3c4d-5e6f-7a8b-9c0d-1e2f-3a4b-5c6d hospital-a
  vnode trust 3 --fingerprint 1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d --head 9f8e... --note "after the incident"
  vnode trust list hospital-a --format json
  vnode trust import federation.yaml hospital-a
  vnode untrust 3 hospital-a
"""
_IMPORT_WARNING = (
    "warning: these pins trust whoever wrote {file} (in a single-operator setup, the server's operator, who "
    "could then also swap keys); where members do not trust the operator, compare fingerprints with each "
    "organization's admin"
)


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


def _words(words: tuple[str, ...]) -> tuple[str, str | None, str | None]:
    """(ORG | list | import, FILE for import, NAME) from the positional arguments."""
    if not words:
        raise click.UsageError("missing ORG (an organization id), `list` or `import FILE`")
    if words[0] == "import":
        if len(words) < 2:
            raise click.UsageError("`vnode trust import` needs FILE: the federation file with fingerprints")
        if len(words) > 3:
            raise click.UsageError("`vnode trust import FILE [NAME]` takes at most two arguments")
        return words[0], words[1], words[2] if len(words) == 3 else None
    if len(words) > 2:
        raise click.UsageError(f"unexpected argument {words[2]!r}: `vnode trust {words[0]} [NAME]`")
    return words[0], None, words[1] if len(words) == 2 else None


@click.command("trust", help=_TRUST_HELP, context_settings=CONTEXT)
@click.argument("words", nargs=-1, metavar="ORG [NAME] | list [NAME] | import FILE [NAME]")
@scope_option
@click.option("--fingerprint", "fingerprint_text", metavar="F", help="The fingerprint of ORG's first key.")
@click.option("--head", metavar="KEY_ID", help="After a fork of ORG's key chain: the key to follow.")
@click.option("--note", default="", help="A comment kept beside the pin.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def trust_command(
    words: tuple[str, ...],
    user_scope: bool,
    fingerprint_text: str | None,
    head: str | None,
    note: str,
    fmt: str,
) -> None:
    org, file, name = _words(words)
    if org == "import" and (fingerprint_text or head):
        raise click.UsageError("`trust import` takes the fingerprints from FILE: drop --fingerprint/--head")
    settings = load(resolve(name, to_scope(user_scope)))
    store = open_store(settings)
    if org == "list":
        _list(store, settings, fmt)
        return
    if org == "import" and file is not None:
        _import(store, settings, Path(file), note, fmt)
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


def _organization_id(session: server.Session, name: str) -> int:
    """The id the server gives organization `name` (as this node may see it)."""
    found = server.organizations_named(session, name)
    if len(found) != 1 or not isinstance(found[0].get("id"), int):
        raise OperatorError(
            f"unknown organization {name!r}: the server shows this node no organization by that name"
        )
    return int(found[0]["id"])


def _import(store: TrustStore, settings: NodeSettings, file: Path, note: str, fmt: str) -> None:
    """Pin the organizations FILE names with a fingerprint, except this node's own (its key file pins it)."""
    try:
        entries = read_federation_file(file)
    except FederationFileError as exc:
        raise OperatorError(str(exc)) from None
    skipped = [e.name for e in entries if e.root is None]
    session = server.login(settings)
    # Asking the server which id a name has is safe: every key record carries the organization id it was
    # signed for (`org` in its body), so a server that maps a name to another organization's id cannot serve
    # a chain for that id that verifies under this fingerprint; that organization is then refused, not
    # impersonated.
    wanted: list[tuple[str, int, str]] = []
    own: str | None = None
    for entry in entries:
        if entry.root is None:
            continue
        organization = _organization_id(session, entry.name)
        if organization == session.organization_id:
            own = entry.name
            continue
        wanted.append((entry.name, organization, entry.root))
    try:
        done = pin_named(store, wanted, note or f"from the federation file {file.name}")
    except (FederationFileError, TrustStoreError) as exc:
        raise OperatorError(str(exc)) from None
    _report_import(done, skipped, own, store, file, fmt)


def _report_import(
    done: list[NamedPin], skipped: list[str], own: str | None, store: TrustStore, file: Path, fmt: str
) -> None:
    warning = _IMPORT_WARNING.format(file=file)
    if fmt == "json":
        doc: dict[str, Any] = {
            "pinned": [{**_pin_row(p.pin), "name": p.name, "new": p.new} for p in done],
            "skipped": skipped,
            "own": own,
            "warning": warning.removeprefix("warning: "),
        }
        click.echo(json.dumps(doc))
        return
    for item in done:
        verb = "pinned" if item.new else "already pinned"
        shown = show_fingerprint(item.pin.root)
        click.echo(f"{verb} organization {item.pin.organization_id} ({item.name}) to {shown} in {store.path}")
    if own is not None:
        click.echo(f"skipped {own}: this node's own organization, pinned by its key file")
    for name in skipped:
        click.echo(f"skipped {name}: the file gives no fingerprint")
    click.echo(warning, err=True)


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
