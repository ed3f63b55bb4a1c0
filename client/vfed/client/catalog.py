"""What a verified ledger says to one researcher: the datasets on it, the leases granted to the researcher's
organization (and to the researcher, where a lease names users), and the receipts of runs.

Pure functions of a `LedgerState`; nothing here reads the server. Leases of other organizations are not shown.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from vfed.common.ledger import Dataset, Lease, LedgerState, Receipt
from vfed.common.ledger.metadata import DatasetMetadata


class LeaseStatus(StrEnum):
    ACTIVE = "active"
    NOT_YET_VALID = "not-yet-valid"
    EXPIRED = "expired"
    REVOKED = "revoked"
    EXHAUSTED = "exhausted"


@dataclass(frozen=True)
class Researcher:
    """Whom the ledger is read for: the organization leases are granted to, and the user among its users."""

    organization_id: int
    user_id: int | None


@dataclass(frozen=True)
class LeaseInfo:
    id: str
    collaboration_id: int
    dataset: str
    """The dataset.registered entry's digest."""
    dataset_label: str
    owner: int
    grantee: int
    users: list[int] | None
    purpose: str
    images: list[str] | None
    """Image digests the lease allows; None: any image."""
    not_before: int
    expires_at: int
    status: LeaseStatus
    runs_used: int
    max_runs: int | None
    epsilon_used: float
    epsilon_cap: float | None
    granted_by: int
    """The org admin (user id at the owner) who signed the grant."""
    seq: int
    revoked_reason: str | None = None
    extended: int = 0
    """How many times the lease was extended."""

    def expires_in_s(self, now: float | None = None) -> float:
        return self.expires_at - (time.time() if now is None else now)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status.value}


@dataclass(frozen=True)
class DatasetInfo:
    collaboration_id: int
    digest: str
    owner: int
    label: str
    description: str
    content_hash: str | None
    registered_at: int
    seq: int
    leases: list[LeaseInfo] = field(default_factory=list)
    """Leases granted to the researcher (its organization, the researcher among its users), oldest first."""
    metadata: DatasetMetadata | None = None
    """Schema, row count and column summaries, when a lease's sealed metadata opens with your key."""

    @property
    def lease(self) -> LeaseInfo | None:
        """The lease that counts now: the newest active one, else the newest of any status."""
        active = [x for x in self.leases if x.status is LeaseStatus.ACTIVE]
        found = active or self.leases
        return found[-1] if found else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["leases"] = [x.to_dict() for x in self.leases]
        out["metadata"] = self.metadata.model_dump(mode="json") if self.metadata is not None else None
        return out


@dataclass(frozen=True)
class ReceiptInfo:
    collaboration_id: int
    seq: int
    digest: str
    organization_id: int
    task_id: int
    run_id: int
    image: str
    status: str
    started_at: int | None
    finished_at: int
    datasets: list[dict[str, Any]]
    """Per dataset used: label, dataset digest, lease id and epsilon spent."""
    descriptor: str | None
    result: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lease_status(lease: Lease, now: float) -> LeaseStatus:
    status = LeaseStatus(lease.status(now))
    cap = lease.body.epsilon
    if status is LeaseStatus.ACTIVE and cap is not None and lease.epsilon_spent >= cap:
        return LeaseStatus.EXHAUSTED
    return status


def granted_to(lease: Lease, who: Researcher) -> bool:
    if lease.grantee != who.organization_id:
        return False
    return lease.body.users is None or (who.user_id is not None and who.user_id in lease.body.users)


def lease_info(state: LedgerState, lease: Lease, now: float) -> LeaseInfo:
    body = lease.body
    return LeaseInfo(
        id=lease.id,
        collaboration_id=state.collaboration_id,
        dataset=lease.dataset.digest,
        dataset_label=lease.dataset.label,
        owner=lease.owner,
        grantee=lease.grantee,
        users=list(body.users) if body.users is not None else None,
        purpose=body.purpose,
        images=list(body.images) if body.images is not None else None,
        not_before=body.not_before,
        expires_at=lease.expires_at,
        status=lease_status(lease, now),
        runs_used=lease.runs,
        max_runs=body.max_runs,
        epsilon_used=lease.epsilon_spent,
        epsilon_cap=body.epsilon,
        granted_by=body.by.user,
        seq=lease.seq,
        revoked_reason=lease.revoked.reason if lease.revoked is not None else None,
        extended=len(lease.extensions),
    )


def leases(state: LedgerState, who: Researcher, now: float | None = None) -> list[LeaseInfo]:
    """Leases granted to the researcher, oldest first."""
    at = time.time() if now is None else now
    found = sorted((x for x in state.leases.values() if granted_to(x, who)), key=lambda x: x.seq)
    return [lease_info(state, x, at) for x in found]


def current_datasets(state: LedgerState) -> list[Dataset]:
    """The latest registration of each (owner, label), in ledger order."""
    latest: dict[tuple[int, str], Dataset] = {}
    for dataset in state.datasets.values():
        kept = latest.get((dataset.org, dataset.label))
        if kept is None or dataset.seq > kept.seq:
            latest[(dataset.org, dataset.label)] = dataset
    return sorted(latest.values(), key=lambda d: d.seq)


def datasets(
    state: LedgerState,
    who: Researcher,
    metadata: dict[str, DatasetMetadata] | None = None,
    now: float | None = None,
) -> list[DatasetInfo]:
    """Every dataset on the ledger with the leases the researcher holds on it; `metadata`: lease id -> the
    lease's opened metadata (the newest lease's that opened is shown)."""
    at = time.time() if now is None else now
    opened = metadata or {}
    out = []
    for dataset in current_datasets(state):
        held = [x for x in state.leases_on(dataset.org, dataset.label) if granted_to(x, who)]
        found = next((opened[x.id] for x in reversed(held) if x.id in opened), None)
        out.append(
            DatasetInfo(
                collaboration_id=state.collaboration_id,
                digest=dataset.digest,
                owner=dataset.org,
                label=dataset.label,
                description=dataset.description,
                content_hash=dataset.content_hash,
                registered_at=dataset.at,
                seq=dataset.seq,
                leases=[lease_info(state, x, at) for x in held],
                metadata=found,
            )
        )
    return out


def receipt_info(state: LedgerState, receipt: Receipt) -> ReceiptInfo:
    body = receipt.body
    return ReceiptInfo(
        collaboration_id=state.collaboration_id,
        seq=receipt.seq,
        digest=receipt.digest,
        organization_id=body.org,
        task_id=body.task,
        run_id=body.run,
        image=body.image,
        status=body.status,
        started_at=body.started_at,
        finished_at=body.finished_at,
        datasets=[d.model_dump() for d in body.datasets],
        descriptor=body.descriptor,
        result=body.result,
    )


def receipts(state: LedgerState, task_id: int | None = None) -> list[ReceiptInfo]:
    return [receipt_info(state, r) for r in state.receipts if task_id is None or r.body.task == task_id]


def when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")
