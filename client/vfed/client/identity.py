"""Who signs the client's task descriptors and who results are sealed to.

Either the researcher's own key, certified by their organization (signer role `user`: the organization's
private key stays on its node), or, where researchers still use the organization's key file, the
organization itself (role `organization`; its keyring's first key is the root of its chain, so the client
pins its own organization from it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import jwt

from vfed.client.errors import ApiError, ClientError, NotCertified, NotLoggedIn
from vfed.client.trust import refused
from vfed.common.crypto import CryptoError, OrgKey, PublicKey
from vfed.common.trust import (
    DEFAULT_KEY_GRACE_S,
    KIND_GENESIS,
    Certificate,
    KeyChain,
    SignedEntry,
    TrustError,
    parse_certificate,
    revoked_digests,
    verify_certificate,
)

if TYPE_CHECKING:
    from vfed.client.client import AsyncClient

Role = Literal["user", "organization"]


@dataclass(frozen=True)
class Identity:
    organization_id: int
    user_id: int | None
    key: OrgKey  # signs descriptors; results come back sealed to it
    role: Role
    certificate: SignedEntry | None = None
    also_to: PublicKey | None = None
    """The organization's current key, when its policy (the certificate) wants results sealed to it too."""


async def whoami(client: AsyncClient) -> tuple[int, int]:
    """The logged-in user's organization and id: from the login answer, else from the token's subject."""
    if client.organization_id is not None and client.user_id is not None:
        return client.organization_id, client.user_id
    token = client.api.token
    if not token:
        raise NotLoggedIn("not logged in: call login() or set VFED_TOKEN")
    try:  # our own token: read, not verified (the server checks it on every request)
        claims = jwt.decode(token, options={"verify_signature": False})
        user_id = int(claims["sub"])
    except (jwt.PyJWTError, KeyError, TypeError, ValueError):
        raise ClientError("cannot tell from the token who is logged in; log in again") from None
    if claims.get("kind") != "user":
        raise ClientError("tasks are created by a user: log in as a researcher")
    if client.organization_id is None:
        user = await client.api.request("GET", f"/users/{user_id}")
        client.organization_id = int(user["organization_id"])
    client.user_id = user_id
    return client.organization_id, user_id


async def resolve(client: AsyncClient) -> Identity:
    """The signing identity of the client's key file, checked against the organization's verified chain."""
    org_id, user_id = await whoami(client)
    keyring = client.keyring
    key = keyring.current
    certificates, records = await asyncio.gather(
        _certificates(client, org_id, user_id, key.key_id), client.chains.records(org_id)
    )
    root = keyring.keys[0].key_id
    if any(r.kind == KIND_GENESIS and _key_id(r) == root for r in records):
        return await _as_organization(client, org_id, user_id, key, root)
    if certificates:
        return await _as_user(client, org_id, user_id, key, certificates)
    raise NotCertified(
        f"key {key.key_id} is neither a key of organization {org_id} nor certified for user {user_id}; "
        f"ask your admin: vnode users certify {user_id} --key {key.public.to_text()}"
    )


async def _as_organization(
    client: AsyncClient, org_id: int, user_id: int, key: OrgKey, root: str
) -> Identity:
    client.chains.pin_own(org_id, root)  # our own organization: pinned by its keyring, not at sight
    chain = await client.chains.chain(org_id)
    if not chain.usable(key.key_id, time.time(), DEFAULT_KEY_GRACE_S):
        raise NotCertified(
            f"the key file's current key {key.key_id} is not a current key of organization {org_id} "
            "(an old copy of the organization's key file? copy the node's current one)"
        )
    return Identity(org_id, user_id, key, "organization")


async def _as_user(
    client: AsyncClient, org_id: int, user_id: int, key: OrgKey, items: list[dict[str, Any]]
) -> Identity:
    chain = await client.chains.chain(org_id)
    revocations = await client.chains.revocations(org_id)
    revoked = revoked_digests(revocations + _attached_revocations(items), chain)
    best: tuple[Certificate, SignedEntry] | None = None
    error: TrustError | None = None
    for item in items:
        try:
            found = _verified(item, chain, revoked)
        except TrustError as exc:
            error = exc
            continue
        if found[0].key.key_id == key.key_id and found[0].user_id == user_id:
            best = found if best is None or found[0].expires_at > best[0].expires_at else best
    if best is None:
        if error is not None:
            raise refused(error, org_id)
        raise NotCertified(
            f"no certificate of organization {org_id} names key {key.key_id} for user {user_id}; "
            f"ask your admin: vnode users certify {user_id} --key {key.public.to_text()}"
        )
    also_to = chain.head if best[0].seal_to_organization else None
    return Identity(org_id, user_id, key, "user", best[1], also_to)


def _attached_revocations(items: list[dict[str, Any]]) -> list[SignedEntry]:
    """Revocations the server lists beside certificates (signatures are checked by revoked_digests)."""
    out = []
    for item in items:
        with contextlib.suppress(TrustError):
            if item.get("revocation") is not None:
                out.append(SignedEntry.parse(item["revocation"]))
    return out


def _verified(item: dict[str, Any], chain: KeyChain, revoked: set[str]) -> tuple[Certificate, SignedEntry]:
    entry = parse_certificate(item.get("certificate"))
    return verify_certificate(entry, chain, revoked, now=time.time()), entry


async def _certificates(client: AsyncClient, org_id: int, user_id: int, key_id: str) -> list[dict[str, Any]]:
    """The server's certificates for this key (none when the server keeps none)."""
    try:
        body = await client.api.request(
            "GET", f"/organizations/{org_id}/certificates", params={"user_id": user_id, "key_id": key_id}
        )
    except ApiError as exc:
        if exc.status == 404:
            return []
        raise
    data = body.get("data", []) if isinstance(body, dict) else []
    return [i for i in data if isinstance(i, dict)]


def _key_id(entry: SignedEntry) -> str | None:
    try:
        return PublicKey.from_text(str(entry.body.get("key"))).key_id
    except CryptoError:
        return None
