"""Researcher certificates and their revocations: signed by the organization's key, stored verbatim.

Nodes verify a researcher's certificate against the organization's pinned chain and its revocations; the
server only checks that what it stores could verify (of this organization, for one of its users, signed by a
key of its stored chain). Both are also appended to the ledger of every collaboration the organization
belongs to.
"""

from __future__ import annotations

import json
import re

from aiohttp import web
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.common.trust import KIND_CERTIFICATE, KIND_REVOCATION, SignedEntry
from vfed.server.api.common import (
    caller,
    commit_unique,
    equal_filters,
    json_response,
    path_id,
    read_json,
    read_query,
    session,
)
from vfed.server.api.key_records import is_int, key_of, parse_entry, signed_by_chain
from vfed.server.api.ledger import announce
from vfed.server.api.organizations import editable_org, readable_org
from vfed.server.errors import ApiError, conflict, not_found
from vfed.server.ledger_store import Carried, carry, lock_organizations
from vfed.server.models import User, UserCertificate, utcnow
from vfed.server.schemas import (
    CertificateIn,
    CertificateOut,
    CertificateQuery,
    CertificatesOut,
    RevocationIn,
)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_ID = 2**31 - 1


def out(row: UserCertificate) -> CertificateOut:
    return CertificateOut.model_construct(
        id=row.id,
        organization_id=row.organization_id,
        user_id=row.user_id,
        key_id=row.key_id,
        digest=row.digest,
        certificate=json.loads(row.entry),
        revocation=json.loads(row.revocation) if row.revocation is not None else None,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def _certificate_fields(entry: SignedEntry, organization_id: int) -> tuple[int, str]:
    """The certificate's user id and key id, once its kind and body are those of a certificate."""

    def invalid(detail: str) -> ApiError:
        return ApiError(422, "invalid-certificate", detail)

    body = entry.body
    if entry.kind != KIND_CERTIFICATE:
        raise invalid(f"kind {entry.kind!r} is not {KIND_CERTIFICATE}")
    if not is_int(body.get("org")) or body["org"] != organization_id:
        raise invalid(f"the certificate names organization {body.get('org')!r}, not {organization_id}")
    user = body.get("user")
    if not is_int(user) or not 1 <= user <= _MAX_ID:
        raise invalid(f"the certificate names no valid user ({user!r})")
    for name in ("not_before", "expires_at"):
        if not is_int(body.get(name)):
            raise invalid(f"certificate field {name!r} is not an integer")
    try:
        return user, key_of(entry).key_id
    except ValueError as exc:
        raise invalid(str(exc)) from None


async def _user_of(s: AsyncSession, user_id: int, organization_id: int) -> None:
    found = await s.execute(
        select(User.id).where(User.id == user_id, User.organization_id == organization_id)
    )
    if found.first() is None:
        raise ApiError(
            422, "invalid-certificate", f"user {user_id} is not a user of organization {organization_id}"
        )


def _unsigned(kind: str, organization_id: int) -> str:
    return (
        f"the {kind} is not signed by a key of organization {organization_id}'s key chain (its admin or "
        f"node publishes the chain first: POST /api/v1/organizations/{organization_id}/key-records)"
    )


async def list_certificates(request: web.Request) -> web.Response:
    """The organization's certificates, oldest first, optionally of one user or one key."""
    q = read_query(request, CertificateQuery)
    async with session(request) as s:
        org = await readable_org(s, await caller(request, s), path_id(request))
        where = [
            UserCertificate.organization_id == org.id,
            *equal_filters((UserCertificate.user_id, q.user_id), (UserCertificate.key_id, q.key_id)),
        ]
        rows = (await s.execute(select(UserCertificate).where(*where).order_by(UserCertificate.id))).scalars()
        data = [out(r) for r in rows]
    return json_response(CertificatesOut.model_construct(data=data))


async def post_certificate(request: web.Request) -> web.Response:
    """Store a certificate (root, the organization's admin or its node)."""
    body = await read_json(request, CertificateIn)
    org_id = path_id(request)
    async with session(request) as s:
        org = await editable_org(s, await caller(request, s), org_id)
        entry, digest, text = parse_entry(body.certificate, "invalid-certificate", "certificate")
        user_id, key_id = _certificate_fields(entry, org.id)
        await _user_of(s, user_id, org.id)
        if not await signed_by_chain(s, org.id, entry):
            raise ApiError(422, "invalid-certificate", _unsigned("certificate", org.id))
        row = UserCertificate(
            organization_id=org.id, user_id=user_id, key_id=key_id, digest=digest, entry=text
        )
        await lock_organizations(s, [org.id])
        appended = await carry(s, org.id, [Carried(KIND_CERTIFICATE, digest, text)])
        s.add(row)  # after carrying, so a certificate stored already fails at the commit: 409 `exists`
        await commit_unique(s, f"certificate {digest} is stored already")
        await announce(request, s, appended)
    return json_response(out(row), 201)


def _revoked_digest(entry: SignedEntry, organization_id: int) -> str:
    """The digest of the certificate a revocation names, once it is a revocation of this organization."""
    if entry.kind != KIND_REVOCATION:
        raise ApiError(422, "invalid-revocation", f"kind {entry.kind!r} is not {KIND_REVOCATION}")
    if not is_int(entry.body.get("org")) or entry.body["org"] != organization_id:
        raise ApiError(
            422,
            "invalid-revocation",
            f"the revocation names organization {entry.body.get('org')!r}, not {organization_id}",
        )
    digest = entry.body.get("certificate")
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise ApiError(422, "invalid-revocation", "the revocation names no certificate digest")
    return digest


async def post_revocation(request: web.Request) -> web.Response:
    """Revoke a stored certificate: the signed revocation is kept on its row (201; 200 when it is there)."""
    body = await read_json(request, RevocationIn)
    org_id = path_id(request)
    async with session(request) as s:
        org = await editable_org(s, await caller(request, s), org_id)
        entry, digest, text = parse_entry(body.revocation, "invalid-revocation", "revocation")
        revoked = _revoked_digest(entry, org.id)
        row = (
            await s.execute(
                select(UserCertificate).where(
                    UserCertificate.digest == revoked, UserCertificate.organization_id == org.id
                )
            )
        ).scalar_one_or_none()
        if row is None:
            raise not_found("certificate", revoked)
        if not await signed_by_chain(s, org.id, entry):
            raise ApiError(422, "invalid-revocation", _unsigned("revocation", org.id))
        if row.revocation is not None:
            if SignedEntry.parse(row.revocation).digest == digest:
                return json_response(out(row))
            raise conflict("already-revoked", f"certificate {revoked} is revoked already")
        now = utcnow()
        await lock_organizations(s, [org.id])
        done = await s.execute(
            update(UserCertificate)
            .where(UserCertificate.id == row.id, UserCertificate.revocation.is_(None))
            .values(revocation=text, revoked_at=now)
            .execution_options(synchronize_session=False)
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            raise conflict("already-revoked", f"certificate {revoked} is revoked already")
        appended = await carry(s, org.id, [Carried(KIND_REVOCATION, digest, text)])
        await s.commit()
        await announce(request, s, appended)
        row.revocation, row.revoked_at = text, now
    return json_response(out(row), 201)


async def list_revocations(request: web.Request) -> web.Response:
    """The organization's revocations, oldest first, each verbatim."""
    async with session(request) as s:
        org = await readable_org(s, await caller(request, s), path_id(request))
        texts = await s.execute(
            select(UserCertificate.revocation)
            .where(UserCertificate.organization_id == org.id, UserCertificate.revocation.is_not(None))
            .order_by(UserCertificate.revoked_at, UserCertificate.id)
        )
        body = '{"data":[' + ",".join(text for (text,) in texts if text is not None) + "]}"
    return web.Response(text=body, content_type="application/json")
