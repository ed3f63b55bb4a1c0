"""Typed ledger errors. Each names the entry it is about; `reason` is the code that may leave a node."""

from __future__ import annotations

from vfed.common.trust.errors import TrustError


class LedgerError(TrustError):
    """The ledger does not verify."""

    reason = "ledger-invalid"


class LedgerTampered(LedgerError):
    """An entry was changed, dropped, reordered or inserted after it was chained (hash or sequence broken)."""

    reason = "ledger-tampered"


class LedgerEntryInvalid(LedgerError):
    """An entry is malformed, signed by a key that may not sign it, or breaks a rule of its kind."""

    reason = "ledger-entry-invalid"


class LedgerEntryExists(LedgerEntryInvalid):
    """The entry is on the ledger already (an append repeated after a lost answer, or sent twice): whoever
    sent it may count it as appended."""

    reason = "ledger-entry-exists"


class LedgerForked(LedgerError):
    """Someone verified a head that is not on this verifier's chain: the server shows different histories."""

    reason = "ledger-fork"

    def __init__(self, message: str, seq: int, ours: str | None, theirs: str, source: str = "") -> None:
        super().__init__(message)
        self.seq = seq
        self.ours = ours
        self.theirs = theirs
        self.source = source


class NoValidLease(TrustError):
    """No lease on the ledger lets this run use this dataset now (expired, revoked, other image, user or
    organization, run count or epsilon cap reached)."""

    reason = "no-valid-lease"
