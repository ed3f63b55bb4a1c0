"""The organization key at start-up: load or create it, and make the server's public copy match."""

from __future__ import annotations

import logging
import os

from vfed.common.crypto import Keyring, PublicKey
from vfed.node.config import NodeSettings
from vfed.node.server_api import NodeClient

log = logging.getLogger(__name__)


class KeyMismatch(Exception):
    """The server publishes another public key for our organization than the one we hold."""


def passphrase(settings: NodeSettings) -> str | None:
    """The key file passphrase from the environment variable the config names, if it names one."""
    name = settings.private_key_passphrase_env
    if name is None:
        return None
    value = os.environ.get(name)
    if not value:
        raise KeyMismatch(f"private_key_passphrase_env names {name}, but that variable is empty or unset")
    return value


def load_or_create(settings: NodeSettings) -> tuple[Keyring, bool]:
    """The keyring from the configured file; a new one (mode 0600) when no file exists. True when new."""
    path = settings.key_path
    secret = passphrase(settings)
    if path.exists():
        return Keyring.load(path, secret), False
    if settings.private_key is not None:
        log.warning("private key file %s does not exist: generating a new organization key there", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keyring = Keyring.generate()
    keyring.save(path, secret)
    return keyring, True


async def reconcile(
    settings: NodeSettings, client: NodeClient, keyring: Keyring, organization_id: int, *, rotate: bool
) -> None:
    """Upload our public key when the server has none (or when rotating); refuse a silent mismatch."""
    org = await client.get_organization(organization_id)
    ours = keyring.current.public
    if rotate:
        keyring.rotate()
        keyring.save(settings.key_path, passphrase(settings))
        ours = keyring.current.public
        await client.put_public_key(organization_id, ours.to_text())
        log.info("rotated the organization key; new key_id %s uploaded", ours.key_id)
        return
    if not org.public_key:
        await client.put_public_key(organization_id, ours.to_text())
        log.info("uploaded organization public key %s", ours.key_id)
        return
    theirs = org.key_id or PublicKey.from_text(org.public_key).key_id
    if theirs != ours.key_id:
        raise KeyMismatch(
            f"the server holds public key {theirs} for organization {organization_id}, but this node's "
            f"key file {settings.key_path} holds {ours.key_id}; use the right key file, or start once with "
            "--rotate-key to replace the server's key"
        )
