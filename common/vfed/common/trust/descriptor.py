"""The signed task descriptor: what the initiator asked to run, where, on what, with which input.

The client (or, for a subtask, the executing organization's proxy) signs it; the server stores it verbatim and
hands it to nodes with the run. A node runs exactly what it says or nothing. A subtask's descriptor embeds its
parent's document, and so the chain back to the root researcher.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vfed.common.crypto import OrgKey, PublicKey
from vfed.common.trust.certificates import (
    Certificate,
    parse_certificate,
    revoked_digests,
    verify_certificate,
)
from vfed.common.trust.entries import SignedEntry, canonical, sign_entry
from vfed.common.trust.errors import (
    DescriptorExpired,
    DescriptorInvalid,
    DescriptorMismatch,
    MalformedEntry,
    TrustError,
)
from vfed.common.trust.keychain import KeyChain

KIND_DESCRIPTOR = "task.descriptor"
DEFAULT_LIFETIME_S = 7 * 86400
MAX_LIFETIME_S = 31 * 86400
DEFAULT_SKEW_S = 300.0
DEFAULT_KEY_GRACE_S = 7 * 86400.0
DEFAULT_MAX_DEPTH = 2
_SHA256 = r"^[0-9a-f]{64}$"
_KEY_ID = r"^[0-9a-f]{32}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Initiator(_Strict):
    org: int
    user: int | None = None


class Signer(_Strict):
    key_id: str = Field(pattern=_KEY_ID)
    role: Literal["user", "organization"] = Field(alias="as")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Target(_Strict):
    org: int
    datasets: list[str] = Field(default_factory=list, max_length=100)
    input: str = Field(pattern=_SHA256, description="SHA-256 of the sealed input this organization gets")
    key_id: str = Field(pattern=_KEY_ID, description="the organization key the input is sealed to")


class LedgerHead(_Strict):
    """The collaboration ledger's head the signer had verified (`vfed.common.ledger.Head`): a node that finds
    another entry at that place reports a fork."""

    seq: int = Field(ge=0)
    hash: str = Field(pattern=_SHA256)


class DescriptorBody(_Strict):
    collaboration: int
    initiator: Initiator
    signer: Signer
    image: str = Field(min_length=1, max_length=1000)
    method: str = Field(max_length=200)
    targets: list[Target] = Field(min_length=1, max_length=10_000)
    reply_to: list[str] = Field(min_length=1, max_length=4)
    parent: str | None = Field(default=None, pattern=_SHA256)
    depth: int = Field(ge=0, le=16)
    created_at: int
    expires_at: int
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$")
    ledger: LedgerHead | None = None


class DescriptorDocument(BaseModel):
    """What the server stores and serves verbatim: the signed descriptor, the signer's certificate (researcher
    keys) and, for a subtask, the parent's document."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    descriptor: SignedEntry
    certificate: SignedEntry | None = None
    parent: DescriptorDocument | None = None

    @classmethod
    def parse(cls, value: str | bytes | dict[str, Any]) -> DescriptorDocument:
        try:
            if isinstance(value, (str, bytes)):
                return cls.model_validate_json(value)
            return cls.model_validate(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "document"
            raise DescriptorInvalid(f"the task descriptor is malformed ({where}: {first['msg']})") from None

    def to_json(self) -> str:
        return canonical(self.model_dump(mode="json", by_alias=True)).decode("utf-8")

    @property
    def digest(self) -> str:
        return self.descriptor.digest

    def body(self) -> DescriptorBody:
        try:
            return DescriptorBody.model_validate(self.descriptor.body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise DescriptorInvalid(f"the task descriptor is malformed ({where}: {first['msg']})") from None


def input_context(nonce: str) -> bytes:
    """What an input envelope is bound to: the descriptor that names its hash (by the descriptor's nonce)."""
    return b"vfed/input/v1\x00" + nonce.encode("ascii")


def result_context(descriptor_digest: str, organization_id: int, run_id: int) -> bytes:
    """What a result envelope is bound to: the task's descriptor, the organization that ran it and the run."""
    return f"vfed/result/v1\x00{descriptor_digest}\x00{organization_id}\x00{run_id}".encode("ascii")


def new_body(
    *,
    collaboration: int,
    initiator_org: int,
    initiator_user: int | None,
    signer: PublicKey,
    signer_role: Literal["user", "organization"],
    image: str,
    method: str,
    targets: Sequence[Target],
    reply_to: Sequence[str] | None = None,
    parent: DescriptorDocument | None = None,
    lifetime_s: int = DEFAULT_LIFETIME_S,
    nonce: str | None = None,
    now: float | None = None,
    ledger: tuple[int, str] | None = None,
) -> dict[str, Any]:
    """`ledger`: (seq, hash) of the collaboration ledger's head the signer verified, if it keeps a view."""
    created = int(time.time() if now is None else now)
    depth = 0 if parent is None else parent.body().depth + 1
    body: dict[str, Any] = {
        "collaboration": collaboration,
        "initiator": {"org": initiator_org, "user": initiator_user},
        "signer": {"key_id": signer.key_id, "as": signer_role},
        "image": image,
        "method": method,
        "targets": [t.model_dump() for t in targets],
        "reply_to": list(reply_to) if reply_to else [signer.key_id],
        "parent": parent.digest if parent is not None else None,
        "depth": depth,
        "created_at": created,
        "expires_at": created + min(int(lifetime_s), MAX_LIFETIME_S),
        "nonce": nonce or secrets.token_hex(16),
    }
    if ledger is not None:
        body["ledger"] = {"seq": int(ledger[0]), "hash": str(ledger[1])}
    return body


def sign_document(
    body: dict[str, Any],
    key: OrgKey,
    certificate: SignedEntry | None = None,
    parent: DescriptorDocument | None = None,
) -> DescriptorDocument:
    entry = sign_entry(KIND_DESCRIPTOR, body, [key])
    return DescriptorDocument(descriptor=entry, certificate=certificate, parent=parent)


class ChainSource(Protocol):
    """Verified key chains (pinned) and revocations, however the caller fetches them."""

    async def chain(self, organization_id: int) -> KeyChain: ...

    async def revocations(self, organization_id: int) -> list[SignedEntry]: ...


@dataclass(frozen=True)
class VerifiedDescriptor:
    document: DescriptorDocument
    body: DescriptorBody
    signer: PublicKey
    certificate: Certificate | None
    reply_keys: tuple[PublicKey, ...]
    parent: VerifiedDescriptor | None

    @property
    def digest(self) -> str:
        return self.document.digest

    @property
    def root(self) -> VerifiedDescriptor:
        return self if self.parent is None else self.parent.root

    def target(self, organization_id: int) -> Target | None:
        return next((t for t in self.body.targets if t.org == organization_id), None)

    def initiators(self) -> list[Initiator]:
        """This descriptor's initiator and every one above it, root last."""
        out = [self.body.initiator]
        return out + (self.parent.initiators() if self.parent is not None else [])


@dataclass(frozen=True)
class Limits:
    now: float
    skew_s: float = DEFAULT_SKEW_S
    key_grace_s: float = DEFAULT_KEY_GRACE_S
    max_depth: int = DEFAULT_MAX_DEPTH


async def verify_document(
    document: DescriptorDocument, source: ChainSource, limits: Limits
) -> VerifiedDescriptor:
    """Verify signature, signer (pinned chain or certificate), expiry, nesting and the root chain."""
    body = document.body()
    if document.descriptor.kind != KIND_DESCRIPTOR:
        raise DescriptorInvalid(f"expected a task descriptor, got {document.descriptor.kind!r}")
    _check_times(body, limits)
    parent = await _verify_parent(document, body, source, limits)
    chain = await source.chain(body.initiator.org)
    signer, certificate = await _signer(document, body, chain, source, limits)
    try:
        document.descriptor.verify_by(signer)
    except MalformedEntry as exc:
        raise DescriptorInvalid(f"the task descriptor's signature does not verify: {exc.message}") from None
    replies = []
    for key_id in body.reply_to:
        key = signer if key_id == signer.key_id else chain.public(key_id)
        if key is None or (key is not signer and not chain.usable(key_id, limits.now, limits.key_grace_s)):
            raise DescriptorInvalid(f"results would be sealed to key {key_id}, which is not the initiator's")
        replies.append(key)
    wants_org = certificate is not None and certificate.seal_to_organization
    if wants_org and not any(k.key_id != signer.key_id and chain.get(k.key_id) for k in replies):
        raise DescriptorInvalid(
            f"organization {body.initiator.org} requires this researcher's results to be sealed to the "
            "organization's key too, and the descriptor does not ask for it"
        )
    return VerifiedDescriptor(document, body, signer, certificate, tuple(replies), parent)


def _check_times(body: DescriptorBody, limits: Limits) -> None:
    if body.created_at > limits.now + limits.skew_s:
        raise DescriptorInvalid("the task descriptor was made in the future (check the clocks)")
    if body.expires_at - body.created_at > MAX_LIFETIME_S or body.expires_at < body.created_at:
        raise DescriptorInvalid("the task descriptor's lifetime is out of range")
    if body.expires_at + limits.skew_s < limits.now:
        raise DescriptorExpired(f"the task descriptor expired at {body.expires_at}")


async def _verify_parent(
    document: DescriptorDocument, body: DescriptorBody, source: ChainSource, limits: Limits
) -> VerifiedDescriptor | None:
    if body.parent is None:
        if document.parent is not None or body.depth != 0:
            raise DescriptorInvalid("a top-level task descriptor names no parent and has depth 0")
        return None
    if document.parent is None or document.parent.digest != body.parent:
        raise DescriptorInvalid("the subtask's descriptor does not carry the parent it names")
    if body.depth > limits.max_depth:
        raise DescriptorInvalid(f"subtasks nest {body.depth} deep; at most {limits.max_depth} allowed")
    parent = await verify_document(document.parent, source, limits)
    if body.depth != parent.body.depth + 1:
        raise DescriptorInvalid("the subtask's depth does not follow its parent's")
    if body.collaboration != parent.body.collaboration:
        raise DescriptorInvalid("a subtask stays inside its root task's collaboration")
    if parent.target(body.initiator.org) is None:
        raise DescriptorInvalid(
            f"organization {body.initiator.org} was not a target of the parent task, so it cannot create "
            "its subtasks (forged root?)"
        )
    if body.signer.role != "organization":
        raise DescriptorInvalid("a subtask is signed by the executing organization's key")
    return parent


async def _signer(
    document: DescriptorDocument, body: DescriptorBody, chain: KeyChain, source: ChainSource, limits: Limits
) -> tuple[PublicKey, Certificate | None]:
    if body.signer.role == "organization":
        if not chain.usable(body.signer.key_id, limits.now, limits.key_grace_s):
            raise DescriptorInvalid(
                f"the descriptor is signed by key {body.signer.key_id}, which is not a current key of "
                f"organization {body.initiator.org}"
            )
        key = chain.public(body.signer.key_id)
        assert key is not None
        return key, None
    if document.certificate is None:
        raise DescriptorInvalid("a researcher-signed descriptor carries the researcher's certificate")
    entry = parse_certificate(document.certificate.model_dump(mode="json"))
    revoked = revoked_digests(await source.revocations(body.initiator.org), chain)
    cert = verify_certificate(entry, chain, revoked, now=limits.now, skew_s=limits.skew_s)
    if cert.key.key_id != body.signer.key_id or cert.user_id != body.initiator.user:
        raise DescriptorInvalid("the researcher certificate is for another key or user than the descriptor's")
    return cert.key, cert


def check_assignment(
    verified: VerifiedDescriptor,
    *,
    organization_id: int,
    collaboration_id: int | None,
    image: str,
    datasets: Sequence[str],
    input_sha256: str | None,
    initiator_org: int | None = None,
) -> Target:
    """Raise DescriptorMismatch unless the run the server handed us is exactly what the descriptor says."""
    body = verified.body
    target = verified.target(organization_id)
    if target is None:
        raise DescriptorMismatch(f"organization {organization_id} is not a target of the signed task")
    if collaboration_id is not None and body.collaboration != collaboration_id:
        raise DescriptorMismatch("the signed task belongs to another collaboration")
    if image != body.image:
        raise DescriptorMismatch(
            f"the server asks to run image {image!r}; the initiator signed {body.image!r}"
        )
    if sorted(datasets) != sorted(target.datasets):
        raise DescriptorMismatch("the server names other datasets than the initiator signed")
    if initiator_org is not None and initiator_org != body.initiator.org:
        raise DescriptorMismatch("the server names another initiating organization than the signed task")
    if input_sha256 is not None and input_sha256 != target.input:
        raise DescriptorMismatch("the input is not the one the initiator signed (hash differs)")
    return target


__all__ = [
    "DEFAULT_KEY_GRACE_S",
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_SKEW_S",
    "KIND_DESCRIPTOR",
    "ChainSource",
    "DescriptorBody",
    "DescriptorDocument",
    "Limits",
    "Target",
    "TrustError",
    "VerifiedDescriptor",
    "check_assignment",
    "input_context",
    "new_body",
    "result_context",
    "sign_document",
    "verify_document",
]
