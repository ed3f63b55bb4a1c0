"""Researcher certificates: an organization's key vouches for one user's own key pair, until it expires or is
revoked. The researcher signs task descriptors with that key and results are sealed to it, so the
organization's private key stays on its node."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from vfed.common.crypto import CryptoError, OrgKey, PublicKey
from vfed.common.trust.entries import SignedEntry, sign_entry
from vfed.common.trust.errors import CertificateInvalid, CertificateRevoked, MalformedEntry
from vfed.common.trust.keychain import KeyChain

KIND_CERTIFICATE = "user.certificate"
KIND_REVOCATION = "user.revocation"
DEFAULT_VALIDITY_S = 365 * 86400


@dataclass(frozen=True)
class Certificate:
    """A verified certificate."""

    organization_id: int
    user_id: int
    username: str
    key: PublicKey
    roles: tuple[str, ...]
    not_before: int
    expires_at: int
    digest: str
    seal_to_organization: bool = False
    """The organization's policy for this researcher: results are sealed to the organization's key too."""


def certify(
    org_key: OrgKey,
    organization_id: int,
    user_id: int,
    username: str,
    researcher_key: PublicKey,
    *,
    roles: Iterable[str] = ("researcher",),
    validity_s: int = DEFAULT_VALIDITY_S,
    now: float | None = None,
    seal_to_organization: bool = False,
) -> SignedEntry:
    """A certificate record for a researcher's key, signed by the organization's current key.

    `seal_to_organization`: the organization's policy that this researcher's results are also sealed to the
    organization's key; nodes refuse descriptors of such a researcher that do not ask for it."""
    start = int(time.time() if now is None else now)
    body = {
        "org": organization_id,
        "user": user_id,
        "username": username,
        "key": researcher_key.to_text(),
        "roles": sorted(set(roles)),
        "not_before": start,
        "expires_at": start + int(validity_s),
        "serial": secrets.token_hex(16),
    }
    if seal_to_organization:
        body["seal_to_organization"] = True
    return sign_entry(KIND_CERTIFICATE, body, [org_key])


def revoke(org_key: OrgKey, organization_id: int, certificate: SignedEntry, reason: str = "") -> SignedEntry:
    body = {
        "org": organization_id,
        "certificate": certificate.digest,
        "reason": reason[:500],
        "revoked_at": int(time.time()),
    }
    return sign_entry(KIND_REVOCATION, body, [org_key])


def _int(body: dict[str, object], name: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CertificateInvalid(f"certificate field {name!r} is not an integer")
    return value


def _signed_by_chain(entry: SignedEntry, chain: KeyChain) -> None:
    for key_id in entry.signers():
        key = chain.public(key_id)
        if key is not None and entry.signed_by(key):
            return
    raise CertificateInvalid(
        f"{entry.kind} is not signed by a key of organization {chain.organization_id} (forged?)"
    )


def revoked_digests(revocations: Iterable[SignedEntry], chain: KeyChain) -> set[str]:
    """The certificate digests an organization revoked; revocations it did not sign are ignored."""
    out: set[str] = set()
    for entry in revocations:
        if entry.kind != KIND_REVOCATION or entry.body.get("org") != chain.organization_id:
            continue
        try:
            _signed_by_chain(entry, chain)
        except CertificateInvalid:
            continue
        digest = entry.body.get("certificate")
        if isinstance(digest, str):
            out.add(digest)
    return out


def verify_certificate(
    entry: SignedEntry, chain: KeyChain, revoked: set[str], *, now: float, skew_s: float = 300.0
) -> Certificate:
    """Check a certificate against the organization's verified key chain and its revocations."""
    if entry.kind != KIND_CERTIFICATE:
        raise CertificateInvalid(f"expected a user certificate, got {entry.kind!r}")
    body = entry.body
    if body.get("org") != chain.organization_id:
        raise CertificateInvalid(
            f"certificate is for organization {body.get('org')!r}, not {chain.organization_id}"
        )
    _signed_by_chain(entry, chain)
    if entry.digest in revoked:
        raise CertificateRevoked(f"the certificate of user {body.get('user')!r} was revoked")
    not_before, expires_at = _int(body, "not_before"), _int(body, "expires_at")
    if now + skew_s < not_before:
        raise CertificateInvalid("the certificate is not valid yet")
    if now - skew_s > expires_at:
        raise CertificateInvalid(f"the certificate of user {body.get('user')!r} expired")
    try:
        key = PublicKey.from_text(str(body.get("key")))
    except CryptoError as exc:
        raise CertificateInvalid(f"the certificate holds an unreadable key: {exc}") from None
    roles = body.get("roles")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise CertificateInvalid("certificate roles must be a list of names")
    username = body.get("username")
    seal_to_org = body.get("seal_to_organization", False)
    if not isinstance(seal_to_org, bool):
        raise CertificateInvalid("certificate field 'seal_to_organization' is not a boolean")
    return Certificate(
        chain.organization_id,
        _int(body, "user"),
        username if isinstance(username, str) else "",
        key,
        tuple(roles),
        not_before,
        expires_at,
        entry.digest,
        seal_to_org,
    )


def parse_certificate(value: object) -> SignedEntry:
    try:
        return SignedEntry.parse(value)  # type: ignore[arg-type]
    except MalformedEntry as exc:
        raise CertificateInvalid(exc.message) from None
