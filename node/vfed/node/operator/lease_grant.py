"""A lease grant's checks and entry: the dataset as registered, the grantee's keys on the ledger, the metadata
sealed to the lease holders, signed by the org admin."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from vfed.common.crypto import PublicKey
from vfed.common.ledger import Lease, lease_entry
from vfed.common.ledger.metadata import DatasetMetadata, MetadataError, compute_metadata, seal_metadata
from vfed.node.config import DatasetConfig
from vfed.node.ledger import NodeLedger
from vfed.node.operator.admin import Admin
from vfed.node.operator.common import OperatorError
from vfed.node.operator.ledger_access import certified


@dataclass(frozen=True)
class Grant:
    label: str
    content_hash: str | None
    grantee: int
    expires_at: int
    users: list[int] = field(default_factory=list)
    not_before: int | None = None
    images: list[str] = field(default_factory=list)
    epsilon: float | None = None
    max_runs: int | None = None
    purpose: str = ""
    source: DatasetConfig | None = None
    """The node's copy of the dataset, to seal its metadata into the lease (None: no metadata)."""


def lease_metadata(label: str, dataset: DatasetConfig, content: str | None) -> DatasetMetadata:
    """The dataset's schema and summaries, read from the node's copy; one line when it cannot be."""
    try:
        return compute_metadata(label, dataset.uri, dataset.type, content=content)
    except MetadataError as exc:
        raise OperatorError(f"dataset {label!r}: {exc.message} (or grant with --no-metadata)") from None


def recipients(ledger: NodeLedger, grantee: int, users: list[int]) -> tuple[list[PublicKey], list[str]]:
    """Who the metadata is sealed to: the grantee's current key, the users named (else every user of the
    grantee with a valid certificate on the ledger) and this organization's current key; and warnings."""
    state = ledger.state
    chain = state.chain(grantee)
    if chain is None:
        raise OperatorError(
            f"organization {grantee}'s keys are not verified on the ledger (not pinned here, or not "
            f"published): pin it with `vnode trust {grantee} --fingerprint F`, or grant with --no-metadata"
        )
    own = state.chain(ledger.organization_id)
    keys = [chain.head, *([own.head] if own is not None else [])]
    certificates = certified(ledger, grantee)
    notes = []
    if users:
        for user in users:
            found = [c.key for c in certificates if c.user_id == user]
            if not found:
                notes.append(
                    f"user {user} of organization {grantee} has no valid certificate on the ledger: only "
                    "their organization's key opens the dataset's metadata"
                )
            keys.extend(found)
    else:
        keys.extend(c.key for c in certificates)
    return keys, notes


async def grant_lease(ledger: NodeLedger, admin: Admin, terms: Grant) -> tuple[Lease, list[str]]:
    """Sign and append the lease; the lease as the verified ledger holds it, and warnings."""
    org = ledger.organization_id
    dataset = ledger.state.dataset(org, terms.label)
    if dataset is None:
        raise OperatorError(
            f"dataset {terms.label!r} is not registered on the ledger: "
            f"`vnode datasets register {terms.label}`"
        )
    if dataset.content_hash != terms.content_hash:
        raise OperatorError(
            f"dataset {terms.label!r} changed since it was registered (content "
            f"{str(terms.content_hash)[:12]}, registered {str(dataset.content_hash)[:12]}): register it again"
        )
    sealed: dict[str, str] | None = None
    notes: list[str] = []
    if terms.source is not None:
        keys, notes = recipients(ledger, terms.grantee, terms.users)
        metadata = await asyncio.to_thread(lease_metadata, terms.label, terms.source, terms.content_hash)
        sealed = seal_metadata(
            metadata,
            admin.key,
            keys,
            collaboration_id=ledger.collaboration_id,
            dataset_digest=dataset.digest,
        )
    entry = lease_entry(
        admin.key,
        collaboration=ledger.collaboration_id,
        dataset=dataset.digest,
        owner=org,
        grantee=terms.grantee,
        expires_at=terms.expires_at,
        by_user=admin.user_id,
        certificate=admin.certificate.digest,
        seen=ledger.head,
        users=terms.users or None,
        purpose=terms.purpose,
        images=terms.images or None,
        not_before=terms.not_before,
        epsilon=terms.epsilon,
        max_runs=terms.max_runs,
        metadata=sealed,
    )
    await ledger.append(entry)
    return ledger.state.leases[entry.digest], notes
