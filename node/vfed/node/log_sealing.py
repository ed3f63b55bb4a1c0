"""A run's log tail leaves the node sealed: to this organization's key, and to the initiator only by opt-in.

The log is what the algorithm printed, and it has carried other organizations' data values (a conversion
error quoting the cell). The server stores the envelope it cannot read; `vnode logs` opens it with the
organization's keyring. The format and its binding to the run are vfed.common.api.run_log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from vfed.common.api import seal_log
from vfed.common.crypto import Keyring, PublicKey

INLINE_SEAL_CHARS = 64 * 1024
"""Up to this many characters the log is sealed on the loop (a thread hop costs more than the sealing)."""


def seal_run_log_now(
    text: str,
    keyring: Keyring,
    initiator: Sequence[PublicKey],
    organization_id: int,
    task_id: int,
    run_id: int,
) -> str:
    """The log sealed to the organization's current key and `initiator`'s keys (empty without the opt-in),
    signed by the current key; base64 text for the run's `sealed_log`."""
    recipients = [keyring.current.public, *initiator]
    return seal_log(
        text, keyring.current, recipients, organization_id=organization_id, task_id=task_id, run_id=run_id
    )


def tail(text: str, max_bytes: int) -> str:
    """The end of the log within max_bytes of UTF-8 (the last lines say why a run ended). The runtime cuts by
    bytes already, but undecodable bytes it replaced can take three times the room."""
    data = text.encode("utf-8", "replace")
    if len(data) <= max_bytes:
        return text
    return data[len(data) - max_bytes :].decode("utf-8", "ignore")


async def seal_run_log(
    text: str,
    keyring: Keyring,
    initiator: Sequence[PublicKey],
    organization_id: int,
    task_id: int,
    run_id: int,
    max_bytes: int,
) -> str:
    """The tail of the log (max_bytes) sealed as seal_run_log_now does, in a thread when it is long."""
    args = (tail(text, max_bytes), keyring, initiator, organization_id, task_id, run_id)
    if len(text) <= INLINE_SEAL_CHARS:
        return seal_run_log_now(*args)
    return await asyncio.to_thread(seal_run_log_now, *args)
