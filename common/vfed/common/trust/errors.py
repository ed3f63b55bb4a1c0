"""Typed trust errors. Each carries a `reason` code that may leave a node (it names no data) and a message
that says what failed and what to do."""

from __future__ import annotations


class TrustError(Exception):
    """Base of every refusal by `vfed.common.trust`; `reason` is the classified code a run is refused with."""

    reason = "untrusted"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedEntry(TrustError):
    """A signed entry or descriptor is not of the canonical form."""

    reason = "malformed-entry"


class UntrustedKey(TrustError):
    """An organization's first key does not match its pin, or it is not pinned where pins are required."""

    reason = "untrusted-key"

    def __init__(self, message: str, organization_id: int, pinned: str | None, seen: str | None) -> None:
        super().__init__(message)
        self.organization_id = organization_id
        self.pinned = pinned
        self.seen = seen


class ChainInvalid(TrustError):
    """A key record does not verify (a rotation not signed by the previous and the new key, a wrong org)."""

    reason = "untrusted-key"


class ChainForked(ChainInvalid):
    """Two rotation records from the same key: that key is treated as compromised until an admin re-pins."""


class CertificateInvalid(TrustError):
    """A researcher certificate is forged, for another organization or user, expired or revoked."""

    reason = "bad-certificate"


class CertificateRevoked(CertificateInvalid):
    reason = "certificate-revoked"


class DescriptorInvalid(TrustError):
    """A task descriptor does not verify: signature, signer, expiry, nesting or root chain."""

    reason = "bad-descriptor"


class DescriptorExpired(DescriptorInvalid):
    reason = "descriptor-expired"


class DescriptorMismatch(TrustError):
    """What the node is asked to run differs from what the initiator signed (image, datasets, targets,
    input, collaboration)."""

    reason = "descriptor-mismatch"


class DescriptorReplayed(TrustError):
    """A descriptor this node already executed, offered again."""

    reason = "descriptor-replayed"


class ContextMismatch(TrustError):
    """A result or input belongs to another run or task."""

    reason = "wrong-context"
