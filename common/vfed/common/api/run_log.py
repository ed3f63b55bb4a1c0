"""A run's log tail, sealed on the node to its own organization (and, by the node's opt-in, the initiator).

The log is what the algorithm printed: tracebacks, its own debug output, and so sometimes the very values it
worked on. The server stores it (`sealed_log` of a run, base64 of a signed envelope, docs/crypto.md) and
cannot read it; the node's organization reads it with its key (`vnode logs`, `Client.run_log`), the
initiator only when the node's `share_logs_with_initiator` put the run's reply keys among the recipients.

The envelope is bound to the run (organization, task and run id), so a server cannot pass one run's log off
as another's, and signed by the node's organization key, so it cannot forge one either.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

from vfed.common.crypto import (
    ContextMismatch,
    CryptoError,
    Keyring,
    NotARecipient,
    OrgKey,
    PublicKey,
    SenderLookup,
    UnknownSender,
    decrypt_bytes,
    encrypt_bytes,
)

_CONTEXT_PREFIX = b"vfed/run-log/v1"


class RunLogError(Exception):
    """A sealed log that cannot be opened here; the message says why in one line, `kind` in one word
    (`not-base64`, `not-a-recipient`, `other-run`, `unknown-sender`, `unverified`)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def log_context(organization_id: int, task_id: int, run_id: int) -> bytes:
    """The context a run's sealed log is bound to."""
    return b"%s\x00%d\x00%d\x00%d" % (_CONTEXT_PREFIX, organization_id, task_id, run_id)


def seal_log(
    text: str,
    sender: OrgKey,
    recipients: Iterable[PublicKey],
    *,
    organization_id: int,
    task_id: int,
    run_id: int,
) -> str:
    """The log sealed to `recipients` (duplicates dropped), signed by `sender`, as base64 text."""
    unique = {key.key_id: key for key in recipients}
    context = log_context(organization_id, task_id, run_id)
    envelope = encrypt_bytes(text.encode("utf-8", "replace"), sender, list(unique.values()), context=context)
    return base64.b64encode(envelope).decode("ascii")


def open_log(
    sealed: str,
    keyring: Keyring,
    sender: SenderLookup,
    *,
    organization_id: int,
    task_id: int,
    run_id: int,
) -> str:
    """The plaintext log, once signature and binding verified; RunLogError says why not."""
    try:
        envelope = base64.b64decode(sealed, validate=True)
    except (binascii.Error, ValueError):
        raise RunLogError("not-base64", f"run {run_id}: the sealed log is not base64") from None
    context = log_context(organization_id, task_id, run_id)
    try:
        plain = decrypt_bytes(envelope, keyring, sender, context=context)
    except NotARecipient:
        raise RunLogError(
            "not-a-recipient",
            f"run {run_id}: the log is sealed to organization {organization_id} only (its node did not "
            "share it with the initiator), and this key is not one of its recipients",
        ) from None
    except ContextMismatch:
        raise RunLogError("other-run", f"run {run_id}: the sealed log belongs to another run") from None
    except UnknownSender:
        raise RunLogError(
            "unknown-sender",
            f"run {run_id}: the sealed log is not signed by a key of organization {organization_id}",
        ) from None
    except CryptoError as exc:
        message = f"run {run_id}: the sealed log does not verify: {type(exc).__name__}"
        raise RunLogError("unverified", message) from None
    return plain.decode("utf-8", "replace")
