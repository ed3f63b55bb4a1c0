"""The organization key: load or create it, hold it for every user in the agent, and publish its chain.

The key file is the source of truth: the server stores the chain of signed key records (first key, then each
rotation signed by the old and the new key) and this node checks what the server holds against its own first
key. A rotation written to the key file by `vnode keys rotate` reaches a running agent through `KeyHolder`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vfed.common.api.errors import ApiError
from vfed.common.crypto import Keyring, OrgKey, PublicKey
from vfed.common.secret_file import SecretFileError, read_secret_file
from vfed.common.trust import (
    ChainForked,
    ChainInvalid,
    SignedEntry,
    TrustError,
    UntrustedKey,
    fingerprint,
    parse_records,
    records_for_keys,
    show_fingerprint,
    verify_chain,
)
from vfed.node.config import NodeSettings
from vfed.node.server_api import NodeClient

log = logging.getLogger(__name__)

NO_KEY_RECORDS = (404, 405, 501)
"""Answers of a server that has no key records (it predates them): the node publishes its key the old way."""


class KeyMismatch(Exception):
    """The server publishes another key (or key chain) for our organization than the one we hold."""


def passphrase(settings: NodeSettings) -> str | None:
    """The key file passphrase from the file or the environment variable the config names, if it names one."""
    if settings.private_key_passphrase_file is not None:
        try:
            return read_secret_file(settings.private_key_passphrase_file, "private_key_passphrase_file")
        except SecretFileError as exc:
            raise KeyMismatch(str(exc)) from None
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


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


class KeyHolder:
    """The keyring as the key file last said. Everything in the agent reads the keyring through one holder,
    so a reload reaches the runs, results and proxies that come after it; older keys stay and still open
    what was sealed to them."""

    def __init__(self, path: Path, secret: str | None, keyring: Keyring) -> None:
        self.path = path
        self._secret = secret  # as at start: a rotated file keeps its passphrase
        self._keyring = keyring
        self._stamp = _stamp(path)

    @property
    def keyring(self) -> Keyring:
        return self._keyring

    @property
    def current(self) -> OrgKey:
        return self._keyring.current

    @property
    def root(self) -> PublicKey:
        """The organization's first key: what other organizations pin."""
        return self._keyring.keys[0].public

    def changed(self) -> bool:
        return _stamp(self.path) != self._stamp

    def reload(self) -> Keyring | None:
        """Read the key file again (blocking: call in a thread). The new keyring when the file added keys
        after ours, None when it holds the same keys; KeyMismatch (the old keyring stays) when it lost one
        of our keys or holds another organization's."""
        self._stamp = _stamp(self.path)
        loaded = Keyring.load(self.path, self._secret)
        held = [k.key_id for k in self._keyring.keys]
        found = [k.key_id for k in loaded.keys]
        if found == held:
            return None
        if found[: len(held)] != held:
            raise KeyMismatch(
                f"the key file {self.path} no longer holds this node's keys (first key "
                f"{fingerprint(loaded.keys[0].public)}, this node's {fingerprint(self.root)}); "
                "keeping the keys loaded at start"
            )
        self._keyring = loaded
        return loaded


async def reconcile(
    settings: NodeSettings, client: NodeClient, keyring: Keyring, organization_id: int, *, rotate: bool
) -> None:
    """Make the server's key chain for our organization match the key file, or refuse to start.

    The server's records must verify from our first key and end at a key we hold; the records it lacks are
    published. A server without key records gets the public key the old way.
    """
    try:
        served = await client.key_records(organization_id)
    except ApiError as exc:
        if exc.status not in NO_KEY_RECORDS:
            raise
        await _reconcile_public_key(settings, client, keyring, organization_id, rotate=rotate)
        return
    # Checked before a rotation, so a refused start leaves the key file as it was.
    check_served_chain(organization_id, keyring, served, settings.key_path)
    if rotate:
        keyring.rotate()
        keyring.save(settings.key_path, passphrase(settings))
        log.info("rotated the organization key; new key_id %s", keyring.current.key_id)
    await publish_chain(client, keyring, organization_id, served, key_path=settings.key_path)


async def publish_chain(
    client: NodeClient,
    keyring: Keyring,
    organization_id: int,
    served: list[object] | None = None,
    *,
    key_path: Path | None = None,
) -> list[SignedEntry]:
    """Publish the records of our chain the server does not hold yet (after our checks of what it holds);
    answers what was published."""
    if served is None:
        try:
            served = await client.key_records(organization_id)
        except ApiError as exc:
            if exc.status not in NO_KEY_RECORDS:
                raise
            await client.put_public_key(organization_id, keyring.current.public.to_text())
            return []
    held = check_served_chain(organization_id, keyring, served, key_path)
    records = records_for_keys(organization_id, keyring.keys)
    missing = records[held:]
    if missing:
        await client.post_key_records(organization_id, missing)
        shown = ", ".join(r.kind for r in missing)
        log.info(
            "published %d key record(s) of organization %s (%s); current key %s, fingerprint %s",
            len(missing),
            organization_id,
            shown,
            keyring.current.key_id,
            fingerprint(keyring.keys[0].public),
        )
    await _sync_public_key(client, keyring, organization_id)
    return missing


def check_served_chain(
    organization_id: int, keyring: Keyring, served: list[object], key_path: Path | None
) -> int:
    """How many keys of our keyring (oldest first) the server's chain already holds; KeyMismatch when the
    server's chain does not start at our first key or ends at a key we do not hold."""
    if not served:
        return 0
    ours = keyring.keys[0].public
    where = f" {key_path}" if key_path is not None else ""
    try:
        chain = verify_chain(organization_id, parse_records(served), ours.key_id)
    except UntrustedKey as exc:
        seen = show_fingerprint(exc.seen) if exc.seen else "none"
        message = (
            f"the server holds a key chain for organization {organization_id} whose first key is {seen}, "
            f"but this node's key file{where} starts with {fingerprint(ours)}; use the organization's key "
            "file, or have the server's admin remove the stale key records"
        )
        log.error("%s", message)
        raise KeyMismatch(message) from None
    except ChainForked as exc:
        log.error("%s", exc.message)
        raise KeyMismatch(f"the server's key chain for this organization forked: {exc.message}") from None
    except (ChainInvalid, TrustError) as exc:
        log.error("the server's key records for organization %s: %s", organization_id, exc.message)
        raise KeyMismatch(
            f"the server's key records for organization {organization_id} do not verify: {exc.message}"
        ) from None
    served_ids = [k.key.key_id for k in chain.keys]
    held = [k.key_id for k in keyring.keys]
    if served_ids != held[: len(served_ids)]:
        message = (
            f"the server's key chain for organization {organization_id} ends at key "
            f"{fingerprint(chain.head)}, which this node's key file{where} does not hold (its current key "
            f"is {fingerprint(keyring.current.public)}); another node of this organization rotated the key? "
            "give this node the organization's current key file"
        )
        log.error("%s", message)
        raise KeyMismatch(message)
    return len(served_ids)


async def _sync_public_key(client: NodeClient, keyring: Keyring, organization_id: int) -> None:
    """Keep the organization's plain public key field on the current key, for clients that still read it."""
    current = keyring.current.public
    try:
        org = await client.get_organization(organization_id)
        if org.key_id != current.key_id:
            await client.put_public_key(organization_id, current.to_text())
    except ApiError as exc:
        log.warning("could not update the organization's public key field: %s", exc)


async def _reconcile_public_key(
    settings: NodeSettings, client: NodeClient, keyring: Keyring, organization_id: int, *, rotate: bool
) -> None:
    """A server without key records: upload our public key when it has none (or when rotating); refuse a
    silent mismatch."""
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
