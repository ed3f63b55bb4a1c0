"""The ledger's entry kinds: their bodies, who may sign them, and how to make them.

Key records and researcher certificates (`vfed.common.trust`) are carried as they are. Every other entry names
its collaboration (so it cannot be replayed into another ledger), the time its signer made it and the ledger
head its signer had verified (`seen`), which is how a server showing different histories is caught.

Who signs:
- `dataset.registered`, `run.receipt`, `ledger.checkpoint`: the acting organization's key.
- `lease.granted`, `lease.extended`, `lease.revoked`: an org admin of the dataset's owner, with the admin's
  own key, certified by the organization with the `org-admin` role.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vfed.common.crypto import OrgKey
from vfed.common.ledger.chain import Head
from vfed.common.ledger.errors import LedgerEntryInvalid
from vfed.common.trust.certificates import KIND_CERTIFICATE, KIND_REVOCATION
from vfed.common.trust.entries import SignedEntry, sign_entry
from vfed.common.trust.keychain import KIND_GENESIS, KIND_ROTATION

KIND_DATASET = "dataset.registered"
KIND_LEASE = "lease.granted"
KIND_EXTEND = "lease.extended"
KIND_REVOKE = "lease.revoked"
KIND_RECEIPT = "run.receipt"
KIND_CHECKPOINT = "ledger.checkpoint"
KEY_RECORD_KINDS = frozenset({KIND_GENESIS, KIND_ROTATION, KIND_CERTIFICATE, KIND_REVOCATION})
LEASE_KINDS = frozenset({KIND_LEASE, KIND_EXTEND, KIND_REVOKE})
ORG_SIGNED_KINDS = frozenset({KIND_DATASET, KIND_RECEIPT, KIND_CHECKPOINT})
ALL_KINDS = KEY_RECORD_KINDS | LEASE_KINDS | ORG_SIGNED_KINDS
ADMIN_ROLE = "org-admin"
_SHA256 = r"^[0-9a-f]{64}$"
_LABEL = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    collab: int = Field(ge=1)
    at: int = Field(ge=0, description="when the signer made it (its clock, Unix seconds)")
    seen: Head


class DatasetRegistered(_Body):
    org: int
    label: str = Field(pattern=_LABEL)
    description: str = Field(default="", max_length=2000)
    content_hash: str | None = Field(default=None, pattern=_SHA256)


class Actor(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    user: int
    certificate: str = Field(pattern=_SHA256)


class LeaseGranted(_Body):
    dataset: str = Field(pattern=_SHA256, description="the dataset.registered entry's digest")
    owner: int
    grantee: int
    users: list[int] | None = Field(default=None, max_length=1000)
    purpose: str = Field(default="", max_length=2000)
    images: list[str] | None = Field(default=None, max_length=100)
    not_before: int
    expires_at: int
    epsilon: float | None = Field(default=None, gt=0)
    max_runs: int | None = Field(default=None, ge=1)
    metadata: dict[str, str] | None = Field(
        default=None, description="the dataset's metadata sealed to the grantee (key id -> base64 envelope)"
    )
    by: Actor

    @field_validator("images")
    @classmethod
    def _digests(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            for image in value:
                if not image.startswith("sha256:") or len(image) != 71:
                    raise ValueError(f"{image!r} is not an image digest (sha256:<64 hex>)")
        return value


class LeaseExtended(_Body):
    lease: str = Field(pattern=_SHA256)
    expires_at: int
    by: Actor


class LeaseRevoked(_Body):
    lease: str = Field(pattern=_SHA256)
    reason: str = Field(default="", max_length=500)
    by: Actor


class DatasetUse(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str = Field(pattern=_LABEL)
    dataset: str | None = Field(default=None, pattern=_SHA256)
    lease: str | None = Field(default=None, pattern=_SHA256)
    epsilon: float | None = Field(default=None, ge=0)


class RunReceipt(_Body):
    org: int
    task: int
    run: int
    descriptor: str | None = Field(default=None, pattern=_SHA256)
    datasets: list[DatasetUse] = Field(default_factory=list, max_length=100)
    image: str = Field(max_length=200)
    input: str | None = Field(default=None, pattern=_SHA256)
    result: str | None = Field(default=None, pattern=_SHA256)
    started_at: int | None = None
    finished_at: int
    status: str = Field(max_length=40)


class Checkpoint(_Body):
    org: int


BODIES: dict[str, type[_Body]] = {
    KIND_DATASET: DatasetRegistered,
    KIND_LEASE: LeaseGranted,
    KIND_EXTEND: LeaseExtended,
    KIND_REVOKE: LeaseRevoked,
    KIND_RECEIPT: RunReceipt,
    KIND_CHECKPOINT: Checkpoint,
}
Body = DatasetRegistered | LeaseGranted | LeaseExtended | LeaseRevoked | RunReceipt | Checkpoint


def parse_body(entry: SignedEntry, where: str = "entry") -> Body:
    model = BODIES.get(entry.kind)
    if model is None:
        raise LedgerEntryInvalid(f"{where} is of unknown kind {entry.kind!r}")
    try:
        # `model.model_validate(entry.body)`, without its wrapper (this runs once per entry of a verification)
        return model.__pydantic_validator__.validate_python(entry.body)  # type: ignore[no-any-return]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise LedgerEntryInvalid(f"{where} ({entry.kind}) is malformed ({field}: {first['msg']})") from None


def _now(now: float | None) -> int:
    return int(time.time() if now is None else now)


def _sign(kind: str, body: dict[str, Any], key: OrgKey) -> SignedEntry:
    parse_body(SignedEntry(kind=kind, body=body), "the new entry")  # refuse to sign what verifiers refuse
    return sign_entry(kind, body, [key])


def dataset_entry(
    key: OrgKey,
    *,
    collaboration: int,
    organization: int,
    label: str,
    seen: Head,
    description: str = "",
    content_hash: str | None = None,
    now: float | None = None,
) -> SignedEntry:
    body = {
        "collab": collaboration,
        "at": _now(now),
        "seen": seen.model_dump(),
        "org": organization,
        "label": label,
        "description": description,
        "content_hash": content_hash,
    }
    return _sign(KIND_DATASET, body, key)


def lease_entry(
    admin_key: OrgKey,
    *,
    collaboration: int,
    dataset: str,
    owner: int,
    grantee: int,
    expires_at: int,
    by_user: int,
    certificate: str,
    seen: Head,
    users: Sequence[int] | None = None,
    purpose: str = "",
    images: Iterable[str] | None = None,
    not_before: int | None = None,
    epsilon: float | None = None,
    max_runs: int | None = None,
    metadata: dict[str, str] | None = None,
    now: float | None = None,
) -> SignedEntry:
    at = _now(now)
    body = {
        "collab": collaboration,
        "at": at,
        "seen": seen.model_dump(),
        "dataset": dataset,
        "owner": owner,
        "grantee": grantee,
        "users": sorted(set(users)) if users else None,
        "purpose": purpose,
        "images": sorted(set(images)) if images else None,
        "not_before": at if not_before is None else int(not_before),
        "expires_at": int(expires_at),
        "epsilon": epsilon,
        "max_runs": max_runs,
        "metadata": metadata,
        "by": {"user": by_user, "certificate": certificate},
    }
    return _sign(KIND_LEASE, body, admin_key)


def extend_entry(
    admin_key: OrgKey,
    *,
    collaboration: int,
    lease: str,
    expires_at: int,
    by_user: int,
    certificate: str,
    seen: Head,
    now: float | None = None,
) -> SignedEntry:
    body = {
        "collab": collaboration,
        "at": _now(now),
        "seen": seen.model_dump(),
        "lease": lease,
        "expires_at": int(expires_at),
        "by": {"user": by_user, "certificate": certificate},
    }
    return _sign(KIND_EXTEND, body, admin_key)


def revoke_entry(
    admin_key: OrgKey,
    *,
    collaboration: int,
    lease: str,
    reason: str,
    by_user: int,
    certificate: str,
    seen: Head,
    now: float | None = None,
) -> SignedEntry:
    body = {
        "collab": collaboration,
        "at": _now(now),
        "seen": seen.model_dump(),
        "lease": lease,
        "reason": reason[:500],
        "by": {"user": by_user, "certificate": certificate},
    }
    return _sign(KIND_REVOKE, body, admin_key)


def receipt_entry(
    key: OrgKey,
    *,
    collaboration: int,
    organization: int,
    task: int,
    run: int,
    image: str,
    finished_at: int,
    status: str,
    seen: Head,
    datasets: Sequence[DatasetUse] = (),
    descriptor: str | None = None,
    input_hash: str | None = None,
    result_hash: str | None = None,
    started_at: int | None = None,
    now: float | None = None,
) -> SignedEntry:
    body = {
        "collab": collaboration,
        "at": _now(now),
        "seen": seen.model_dump(),
        "org": organization,
        "task": task,
        "run": run,
        "descriptor": descriptor,
        "datasets": [d.model_dump() for d in datasets],
        "image": image,
        "input": input_hash,
        "result": result_hash,
        "started_at": started_at,
        "finished_at": int(finished_at),
        "status": status,
    }
    return _sign(KIND_RECEIPT, body, key)


def checkpoint_entry(
    key: OrgKey, *, collaboration: int, organization: int, seen: Head, now: float | None = None
) -> SignedEntry:
    body = {"collab": collaboration, "at": _now(now), "seen": seen.model_dump(), "org": organization}
    return _sign(KIND_CHECKPOINT, body, key)


SignerRole = Literal["organization", "org-admin"]


def signer_role(kind: str) -> SignerRole:
    return "org-admin" if kind in LEASE_KINDS else "organization"
