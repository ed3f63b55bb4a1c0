"""Bulk signature checks for a full verification: the Ed25519 work, spread over the CPUs, ahead of the
sequential pass that decides which key may sign what (`LedgerState.apply` then skips those checks)."""

from __future__ import annotations

from collections.abc import Sequence

from vfed.common.crypto import PublicKey
from vfed.common.ledger.chain import Record
from vfed.common.ledger.state import LedgerState
from vfed.common.trust.certificates import KIND_CERTIFICATE
from vfed.common.trust.errors import TrustError
from vfed.common.trust.keychain import KIND_GENESIS, KIND_ROTATION, record_key

KEY_BEARING = frozenset({KIND_GENESIS, KIND_ROTATION, KIND_CERTIFICATE})


def known_keys(records: Sequence[Record]) -> dict[str, PublicKey]:
    keys: dict[str, PublicKey] = {}
    for record in records:
        if record.entry.kind in KEY_BEARING:
            try:
                key = record_key(record.entry)
            except TrustError:
                continue
            keys[key.key_id] = key
    return keys


def preverify(state: LedgerState, records: Sequence[Record]) -> None:
    """Check every signature whose key some record names; tell `state` which ones hold."""
    keys = known_keys(records)
    for chain_org in list(state._chains):  # keys verified earlier
        chain = state.chain(chain_org)
        if chain is not None:
            keys.update({k.key.key_id: k.key for k in chain.keys})
    for record in records:
        entry = record.entry
        message = entry.message()
        good = []
        for sig in entry.sigs:
            key = keys.get(sig.key_id)
            if key is None:
                continue
            try:
                key.verify(message, sig.raw())
            except Exception:
                continue
            good.append(sig.key_id)
        if good:
            state.preverified(record.seq, frozenset(good))
