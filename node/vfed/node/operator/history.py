"""One line per ledger entry for `vnode ledger history`, and which entries concern one dataset."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vfed.common.crypto import CryptoError, PublicKey
from vfed.common.ledger import (
    KIND_CHECKPOINT,
    KIND_DATASET,
    KIND_EXTEND,
    KIND_LEASE,
    KIND_RECEIPT,
    KIND_REVOKE,
    LedgerEntryInvalid,
    parse_body,
)
from vfed.common.ledger.kinds import (
    Checkpoint,
    DatasetRegistered,
    LeaseExtended,
    LeaseGranted,
    LeaseRevoked,
    RunReceipt,
)
from vfed.common.trust import KIND_CERTIFICATE, KIND_GENESIS, KIND_REVOCATION, KIND_ROTATION, SignedEntry
from vfed.node.ledger import NodeLedger
from vfed.node.operator import when

_LEDGER_KINDS = {KIND_DATASET, KIND_LEASE, KIND_EXTEND, KIND_REVOKE, KIND_RECEIPT, KIND_CHECKPOINT}


def entry_time(entry: SignedEntry) -> int | None:
    """When its signer made it, as far as the entry says."""
    for name in ("at", "revoked_at", "not_before", "created_s"):
        value = entry.body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _key_id(text: object) -> str:
    try:
        return PublicKey.from_text(str(text)).key_id
    except CryptoError:
        return "?"


def _key_record(entry: SignedEntry) -> str:
    body = entry.body
    org = body.get("org")
    if entry.kind in (KIND_GENESIS, KIND_ROTATION):
        what = "first key" if entry.kind == KIND_GENESIS else "new key"
        return f"organization {org}: {what} {_key_id(body.get('key'))}"
    if entry.kind == KIND_CERTIFICATE:
        roles = body.get("roles")
        shown = ", ".join(map(str, roles)) if isinstance(roles, list) else "?"
        name = f" ({body.get('username')})" if body.get("username") else ""
        key = _key_id(body.get("key"))
        return f"organization {org} certifies key {key} of user {body.get('user')}{name}, roles {shown}"
    return f"organization {org} revokes certificate {str(body.get('certificate'))[:12]}"


def _dataset(body: DatasetRegistered, _digest: str) -> str:
    content = (body.content_hash or "none")[:12]
    return f"organization {body.org} registers dataset {body.label} (content {content})"


def _lease(body: LeaseGranted, digest: str) -> str:
    users = f" users {','.join(map(str, body.users))}" if body.users else ""
    return (
        f"lease {digest[:12]} on dataset {body.dataset[:12]} of organization {body.owner} to "
        f"organization {body.grantee}{users} until {when.show(body.expires_at)}, by user {body.by.user}"
    )


def _extend(body: LeaseExtended, _digest: str) -> str:
    return f"lease {body.lease[:12]} extended until {when.show(body.expires_at)}, by user {body.by.user}"


def _revoke(body: LeaseRevoked, _digest: str) -> str:
    return f"lease {body.lease[:12]} revoked ({body.reason or 'no reason given'}), by user {body.by.user}"


def _receipt(body: RunReceipt, _digest: str) -> str:
    labels = ", ".join(u.label for u in body.datasets) or "no dataset"
    return f"organization {body.org}: task {body.task} run {body.run} {body.status} on {labels}"


def _checkpoint(body: Checkpoint, _digest: str) -> str:
    return f"organization {body.org} checkpoint, verified head {body.seen.short()}"


_DESCRIBE: dict[type[Any], Callable[[Any, str], str]] = {
    DatasetRegistered: _dataset,
    LeaseGranted: _lease,
    LeaseExtended: _extend,
    LeaseRevoked: _revoke,
    RunReceipt: _receipt,
    Checkpoint: _checkpoint,
}


def describe(entry: SignedEntry) -> str:
    """One line saying what the entry says."""
    if entry.kind in (KIND_GENESIS, KIND_ROTATION, KIND_CERTIFICATE, KIND_REVOCATION):
        return _key_record(entry)
    try:
        body = parse_body(entry)
    except LedgerEntryInvalid as exc:
        return exc.message
    return _DESCRIBE[type(body)](body, entry.digest)


def touches(ledger: NodeLedger, entry: SignedEntry, label: str) -> bool:
    """The entry is about this organization's dataset `label`: its registration, its leases, runs on it."""
    if entry.kind not in _LEDGER_KINDS:
        return False
    try:
        body = parse_body(entry)
    except LedgerEntryInvalid:
        return False
    org = ledger.organization_id
    leases = {x.id for x in ledger.state.leases_on(org, label)}
    if isinstance(body, DatasetRegistered):
        found = body.org == org and body.label == label
    elif isinstance(body, LeaseGranted):
        found = entry.digest in leases
    elif isinstance(body, LeaseExtended | LeaseRevoked):
        found = body.lease in leases
    elif isinstance(body, RunReceipt):
        found = any(u.lease in leases or (body.org == org and u.label == label) for u in body.datasets)
    else:
        found = False
    return found
