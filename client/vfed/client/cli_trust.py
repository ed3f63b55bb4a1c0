"""`vfed keys`, `vfed trust`, `vfed untrust`, `vfed organizations`: the researcher's own key and the pins of
organizations (fingerprints of their first keys, compared with their admins out of band)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from vfed.client import credentials
from vfed.client.cli_common import FORMAT, fail, handled, print_table, run
from vfed.client.errors import ClientError
from vfed.client.trust import open_store, trust_mode
from vfed.common.crypto import Keyring
from vfed.common.trust import TrustStore, fingerprint, show_fingerprint

KEY_FILE = click.option(
    "--file",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="key file (default: the one `vfed login` names, else VFED_KEY_FILE, else your config folder's)",
)


def _store() -> TrustStore:
    return open_store(credentials.default_trust_file(), trust_mode())


def _key_file(path: Path | None) -> Path:
    if path is not None:
        return path
    saved = credentials.load().get("key_file") or os.environ.get("VFED_KEY_FILE")
    return Path(saved) if saved else credentials.default_key_file()


@click.group()
def keys() -> None:
    """Your own key pair: results are sealed to it and your tasks are signed with it, once your
    organization's admin certified it."""


@keys.command("generate")
@KEY_FILE
@click.option("--force", is_flag=True, help="replace an existing key file (its key is lost)")
@handled
def keys_generate(path: Path | None, force: bool) -> None:
    """Generate your key pair (a 0600 keyring file; passphrase: VFED_KEY_PASSPHRASE if set).

    Example: vfed keys generate && vfed keys show
    """
    target = path if path is not None else credentials.default_key_file()
    if target.exists() and not force:
        fail(f"{target} already exists (--force replaces it; the key in it is then lost)")
    target.parent.mkdir(parents=True, exist_ok=True)
    ring = Keyring.generate()
    ring.save(target, os.environ.get("VFED_KEY_PASSPHRASE") or None)
    key = ring.current.public
    click.echo(f"wrote {target} (key {key.key_id}, fingerprint {fingerprint(key)})")
    saved = credentials.load().get("key_file")
    if saved and Path(saved) != target:
        click.echo(f"your login uses {saved}; to use this key: vfed login --key-file {target}")
    click.echo(f"ask your organization's admin to certify it: vnode users certify USER --key {key.to_text()}")


@keys.command("show")
@KEY_FILE
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@handled
def keys_show(path: Path | None, fmt: str) -> None:
    """Show your public key, its id and fingerprint, and what your admin runs to certify it."""
    target = _key_file(path)
    if not target.exists():
        raise ClientError(f"no key file at {target}: run `vfed keys generate`")
    key = Keyring.load(target, os.environ.get("VFED_KEY_PASSPHRASE") or None).current.public
    user = credentials.load().get("user_id") or "USER"
    info = {
        "file": str(target),
        "public_key": key.to_text(),
        "key_id": key.key_id,
        "fingerprint": fingerprint(key),
        "certify": f"vnode users certify {user} --key {key.to_text()}",
    }
    if fmt == "json":
        click.echo(json.dumps(info))
        return
    click.echo(f"public key:  {info['public_key']}")
    click.echo(f"key id:      {key.key_id}\nfingerprint: {fingerprint(key)}")
    click.echo(f"ask your organization's admin to certify it:\n  {info['certify']}")


class _PinByDefault(click.Group):
    """`vfed trust ORG --fingerprint F` is `vfed trust pin ORG --fingerprint F`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["pin", *args]
        return super().parse_args(ctx, args)


@click.group(
    cls=_PinByDefault,
    epilog="Example: vfed trust 3 --fingerprint 1a2b-3c4d-...   vfed trust list   vfed trust import fed.yaml",
)
def trust() -> None:
    """Pin organizations by the fingerprint of their first key; compare it with their admin
    (`vnode keys show`) first. Pins live in VFED_TRUST_FILE, else `trusted_orgs` in your config folder."""


@trust.command("pin")
@click.argument("organization_id", type=int, metavar="ORG")
@click.option("--fingerprint", "fingerprint_text", required=True, help="of the organization's first key")
@click.option("--head", default=None, help="after a fork of its key chain: the key id its admin names")
@handled
def trust_pin(organization_id: int, fingerprint_text: str, head: str | None) -> None:
    """Pin ORG (replacing an earlier pin)."""
    try:
        pin = _store().pin(organization_id, fingerprint_text, head, note="pinned by the researcher")
    except ValueError as exc:
        raise ClientError(str(exc)) from None
    head_text = f" (head {pin.head})" if pin.head else ""
    click.echo(f"pinned organization {organization_id}: {show_fingerprint(pin.root)}{head_text}")


@trust.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@handled
def trust_import(file: Path) -> None:
    """Pin the organizations FILE (the federation file, `organizations: [{name, fingerprint}]`) names with a
    fingerprint, their ids looked up on the server by name (you must be logged in).

    This trusts whoever wrote FILE: in a single-operator setup, the server's operator, who could then also
    swap keys. Where you do not trust the operator, compare fingerprints with each organization's admin.
    """
    done, skipped = run(lambda c: c.trust_from_file(file))
    for item in done:
        verb = "pinned" if item.new else "already pinned"
        shown = show_fingerprint(item.pin.root)
        click.echo(f"{verb} organization {item.pin.organization_id} ({item.name}): {shown}")
    for name in skipped:
        click.echo(f"skipped {name}: the file gives no fingerprint")
    click.echo(
        f"warning: these pins trust whoever wrote {file} (in a single-operator setup, the server's operator, "
        "who could then also swap keys); where you do not trust the operator, compare fingerprints with each "
        "organization's admin",
        err=True,
    )


@trust.command("list")
@FORMAT
@handled
def trust_list(fmt: str) -> None:
    """List pinned organizations."""
    pins = _store().pins()
    if fmt == "json":
        rows = [
            {
                "organization_id": p.organization_id,
                "fingerprint": show_fingerprint(p.root),
                "head": p.head,
                "note": p.note,
            }
            for p in pins
        ]
        click.echo(json.dumps(rows))
        return
    for pin in pins:
        click.echo(pin.line())
    if not pins:
        click.echo(f"no organization is pinned yet ({credentials.default_trust_file()})", err=True)


@click.command()
@click.argument("organization_id", type=int, metavar="ORG")
@handled
def untrust(organization_id: int) -> None:
    """Remove the pin of ORG (in `tofu` mode it is pinned again at next sight)."""
    if not _store().unpin(organization_id):
        fail(f"organization {organization_id} is not pinned ({credentials.default_trust_file()})")
    click.echo(f"removed the pin of organization {organization_id}")


@click.group()
def organizations() -> None:
    """Organizations you can see, with the fingerprints of their first keys."""


@organizations.command("list")
@FORMAT
@handled
def organizations_list(fmt: str) -> None:
    """List organizations: id, name, fingerprint of the first key they published, pinned yes/no/MISMATCH."""
    rows = [o.model_dump(mode="json") for o in run(lambda c: c.organizations_with_trust())]
    if fmt == "json":
        click.echo(json.dumps(rows))
        return
    print_table(
        ["ID", "NAME", "FINGERPRINT", "PINNED"],
        [
            (
                row["id"],
                row["name"],
                row["fingerprint"],
                row["pinned"] + (f" ({row['problem']})" if row["problem"] else ""),
            )
            for row in rows
        ],
    )
