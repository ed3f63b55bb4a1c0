"""What a node does with a signed task in the client's and the proxy's tests: verify the descriptor against
chains fetched from the real server, check the input's hash, open it, seal a result bound to the run."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from vfed.common.crypto import Keyring, decrypt_bytes, encrypt_bytes
from vfed.common.payload import TaskInput, encode_result
from vfed.common.trust import (
    ChainResolver,
    DescriptorDocument,
    Limits,
    TrustMode,
    TrustStore,
    VerifiedDescriptor,
    input_context,
    result_context,
    verify_document,
)

Fetch = Callable[[int], Awaitable[list[Any]]]


def node_chains(records: Fetch, revocations: Fetch | None = None) -> ChainResolver:
    """A node's view of the key chains (pinned at first sight, in memory)."""
    return ChainResolver(TrustStore(None, TrustMode.TOFU), records, revocations)


@dataclass
class Opened:
    verified: VerifiedDescriptor
    task_input: TaskInput


async def open_input(
    descriptor_text: str, sealed: bytes, ring: Keyring, organization_id: int, chains: ChainResolver
) -> Opened:
    """Verify the descriptor, check the input is the one it names for us, decrypt it bound to its nonce."""
    verified = await verify_document(
        DescriptorDocument.parse(descriptor_text), chains, Limits(now=time.time())
    )
    target = verified.target(organization_id)
    assert target is not None, f"organization {organization_id} is not a target"
    assert hashlib.sha256(sealed).hexdigest() == target.input, "the input hash differs from the signed one"
    assert target.key_id == ring.current.key_id, "the input is not sealed to our chain head"
    signer = verified.signer
    plain = decrypt_bytes(
        sealed,
        ring,
        lambda key_id: signer if key_id == signer.key_id else None,
        context=input_context(verified.body.nonce),
    )
    return Opened(verified, TaskInput.from_json(plain))


def seal_result(
    value: Any, ring: Keyring, verified: VerifiedDescriptor, organization_id: int, run_id: int
) -> bytes:
    """A result sealed to the descriptor's reply keys, bound to the descriptor, our organization, the run."""
    return encrypt_bytes(
        encode_result(value),
        ring.current,
        list(verified.reply_keys),
        context=result_context(verified.digest, organization_id, run_id),
    )
