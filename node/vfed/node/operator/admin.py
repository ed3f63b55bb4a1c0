"""The org admin who signs lease entries: their own key file (`vfed keys generate`), certified on the ledger
by the organization with the `org-admin` role (`vnode users certify USER --key K --roles org-admin`).

The key file is read as `vfed` reads it (passphrase: $VFED_KEY_PASSPHRASE, asked on a terminal otherwise).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import click

from vfed.common.crypto import CryptoError, Keyring, OrgKey, PublicKey, WrongPassphrase
from vfed.common.ledger import ADMIN_ROLE
from vfed.common.trust import Certificate, TrustError, verify_certificate
from vfed.node.ledger import NodeLedger
from vfed.node.operator.common import OperatorError
from vfed.node.operator.ledger_access import revoked
from vfed.node.operator.paths import interactive

IDENTITY_ENV = "VFED_KEY_FILE"
PASSPHRASE_ENV = "VFED_KEY_PASSPHRASE"

identity_option = click.option(
    "--identity",
    "identity",
    envvar=IDENTITY_ENV,
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    metavar="PATH",
    help=f"The org admin's own key file (`vfed keys generate`) [env: {IDENTITY_ENV}; passphrase: "
    f"${PASSPHRASE_ENV}].",
)


@dataclass(frozen=True)
class Admin:
    key: OrgKey
    certificate: Certificate

    @property
    def user_id(self) -> int:
        return self.certificate.user_id


def load_identity(path: Path) -> Keyring:
    """The admin's keyring; a missing file or a wrong passphrase is one clear line."""
    if not path.exists():
        raise OperatorError(f"no key file at {path} (--identity): make one with `vfed keys generate`")
    secret = os.environ.get(PASSPHRASE_ENV) or None
    try:
        return Keyring.load(path, secret)
    except WrongPassphrase as exc:
        if secret is None and interactive():
            again = str(click.prompt(f"Passphrase for {path}", hide_input=True))
            with contextlib.suppress(CryptoError):
                return Keyring.load(path, again)
        raise OperatorError(f"cannot open key file {path}: {exc} (set ${PASSPHRASE_ENV})") from None
    except CryptoError as exc:
        raise OperatorError(f"cannot open key file {path}: {exc}") from None


def _key(entry_key: object) -> str | None:
    try:
        return PublicKey.from_text(str(entry_key)).key_id
    except CryptoError:
        return None


def admin_of(ledger: NodeLedger, keyring: Keyring, now: float | None = None) -> Admin:
    """The certified org admin holding `keyring`'s current key, as the verified ledger says; OperatorError
    when the key has no certificate there, it was revoked or expired, or it lacks the org-admin role."""
    org = ledger.organization_id
    key = keyring.current
    chain = ledger.state.chain(org)
    mine = [e for e in ledger.state.certificates(org) if _key(e.body.get("key")) == key.key_id]
    if chain is None or not mine:
        raise OperatorError(
            f"key {key.key_id} has no certificate of organization {org} on the ledger: an admin certifies it "
            f"with `vnode users certify USER --key {key.public.to_text()} --roles {ADMIN_ROLE}`"
        )
    gone = revoked(ledger, org)
    moment = time.time() if now is None else now
    valid: list[Certificate] = []
    problem = ""
    for entry in mine:
        try:
            valid.append(verify_certificate(entry, chain, gone, now=moment, skew_s=0))
        except TrustError as exc:
            problem = exc.message
    if not valid:
        raise OperatorError(f"key {key.key_id} may not sign for organization {org}: {problem}")
    admins = [c for c in valid if ADMIN_ROLE in c.roles]
    if not admins:
        cert = max(valid, key=lambda c: c.expires_at)
        raise OperatorError(
            f"key {key.key_id} is certified for user {cert.user_id} with roles "
            f"{', '.join(cert.roles) or 'none'}, not {ADMIN_ROLE}: only an org admin may sign lease entries"
        )
    return Admin(key, max(admins, key=lambda c: c.expires_at))
