"""Subtasks a run creates through its proxy, and how their results are opened.

A subtask gets a descriptor signed with our organization's key that embeds the run's own (hence the chain
back to the root researcher); its inputs are sealed to each target's verified chain head and bound to that
descriptor; its results must be bound to the descriptor, the executing organization and the run.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vfed.common.api.errors import ApiError
from vfed.common.api.resources import Organization, Run, Task
from vfed.common.crypto import OrgKey, PublicKey, encrypt_bytes
from vfed.common.payload import TaskInput
from vfed.common.trust import (
    DescriptorDocument,
    KeyChain,
    Target,
    TrustError,
    input_context,
    new_body,
    result_context,
    sign_document,
)
from vfed.proxy import limits
from vfed.proxy.context import ProxyContext, ProxyError


def reserve(ctx: ProxyContext) -> None:
    """Count a subtask against the run's limits before any work; `release` gives the slot back."""
    if ctx.descriptor is not None:
        depth = ctx.descriptor.body().depth + 1
        if depth > ctx.max_subtask_depth:
            raise ProxyError(
                403,
                "subtask-limit",
                f"a subtask of this run would nest {depth} deep; this node allows {ctx.max_subtask_depth}",
            )
    if ctx.created >= ctx.max_subtasks_per_run:
        raise ProxyError(
            429,
            "subtask-limit",
            f"this run created {ctx.created} subtasks already; this node allows {ctx.max_subtasks_per_run}",
        )
    ctx.created += 1


def release(ctx: ProxyContext) -> None:
    ctx.created -= 1


def check_image(ctx: ProxyContext, image: str) -> None:
    """A subtask names only an image the node's policy allows for the root initiator of the run's chain
    (the nodes that would run it check again, each with its own policy). The run's own image passed the
    node's checks for this very chain already."""
    if ctx.image_refusal is None or ctx.descriptor is None or image == ctx.run.image:
        return
    root = ctx.descriptor
    while root.parent is not None:
        root = root.parent
    refusal = ctx.image_refusal(image, root.body().initiator.org)
    if refusal is not None:
        raise ProxyError(403, "image-not-allowed", refusal)


async def check_members(ctx: ProxyContext, organizations: Sequence[int]) -> None:
    """Subtasks stay inside the run's collaboration."""
    if ctx.members is None:
        listed = await ctx.rest.get_all("/organizations", {"collaboration_id": ctx.run.collaboration_id})
        ctx.members = frozenset(Organization.model_validate(o).id for o in listed)
    outside = sorted(set(organizations) - ctx.members)
    if outside:
        raise ProxyError(
            403,
            "not-a-member",
            f"organizations {outside} are not members of collaboration {ctx.run.collaboration_id}",
        )


async def _chains(ctx: ProxyContext, organizations: Sequence[int], refresh: bool) -> list[KeyChain]:
    chains = ctx.chains
    try:
        return list(await asyncio.gather(*(chains.chain(o, refresh=refresh) for o in organizations)))
    except TrustError as exc:
        raise ProxyError(403, exc.reason, exc.message) from None


async def heads(ctx: ProxyContext, organizations: Sequence[int], refresh: bool = False) -> list[PublicKey]:
    """The head of each organization's verified key chain: the key its inputs are sealed to."""
    return [chain.head for chain in await _chains(ctx, organizations, refresh)]


def _seal(data: bytes, sender: OrgKey, recipients: list[PublicKey], context: bytes) -> tuple[bytes, str]:
    envelope = encrypt_bytes(data, sender, recipients, context=context)
    return envelope, hashlib.sha256(envelope).hexdigest()


async def _sealed_inputs(
    ctx: ProxyContext,
    organizations: list[int],
    keys: list[PublicKey],
    shared: TaskInput | None,
    per_org: dict[int, TaskInput] | None,
    nonce: str,
) -> dict[int, tuple[str, str]]:
    """Organization -> (blob id, SHA-256 of the envelope): one envelope for all, or one per organization."""
    context = input_context(nonce)
    if shared is not None:
        envelope, digest = await asyncio.to_thread(_seal, shared.to_json(), ctx.org_key, keys, context)
        blob = (await limits.upload_blob(ctx, envelope)).id
        return dict.fromkeys(organizations, (blob, digest))
    assert per_org is not None
    out: dict[int, tuple[str, str]] = {}
    for org_id, head in zip(organizations, keys, strict=True):
        envelope, digest = await asyncio.to_thread(
            _seal, per_org[org_id].to_json(), ctx.org_key, [head], context
        )
        out[org_id] = ((await limits.upload_blob(ctx, envelope)).id, digest)
    return out


def method_of(shared: TaskInput | None, per_org: dict[int, TaskInput] | None) -> str:
    """The one method the descriptor names."""
    if shared is not None:
        return shared.method
    assert per_org is not None
    methods = {i.method for i in per_org.values()}
    if len(methods) != 1:
        raise ProxyError(400, "bad-request", "per-organization inputs must name the same method")
    return methods.pop()


class NewTask(BaseModel):
    """The body of `POST /tasks` from an algorithm."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=10_000)
    image: str | None = None
    datasets: list[str] = Field(default_factory=list)
    input: TaskInput | None = None
    inputs: dict[int, TaskInput] | None = None
    organizations: list[int] = Field(min_length=1)


async def create_signed(
    ctx: ProxyContext, new: NewTask, organizations: list[int], fields: dict[str, Any]
) -> Task:
    """Create the subtask (`fields`: the task request but its organizations) with its signed descriptor; a
    chain head that rotated meanwhile (409 stale-key, nothing stored) is read again once."""
    assert ctx.descriptor is not None
    shared, per_org = new.input, new.inputs
    method = method_of(shared, per_org)
    image, datasets = str(fields["image"]), new.datasets
    check_image(ctx, image)
    for fresh in (False, True):
        keys = await heads(ctx, organizations, fresh)
        nonce = secrets.token_hex(16)
        sealed = await _sealed_inputs(ctx, organizations, keys, shared, per_org, nonce)
        targets = [
            Target(org=o, datasets=datasets, input=sealed[o][1], key_id=head.key_id)
            for o, head in zip(organizations, keys, strict=True)
        ]
        body = new_body(
            collaboration=ctx.run.collaboration_id,
            initiator_org=ctx.run.organization_id,
            initiator_user=None,
            signer=ctx.org_key.public,
            signer_role="organization",
            image=image,
            method=method,
            targets=targets,
            parent=ctx.descriptor,
            nonce=nonce,
        )
        document = sign_document(body, ctx.org_key, parent=ctx.descriptor)
        orgs = [
            {"id": o, "input_blob_id": sealed[o][0], "key_id": head.key_id}
            for o, head in zip(organizations, keys, strict=True)
        ]
        try:
            task = await ctx.rest.create_task(
                {**fields, "organizations": orgs, "descriptor": document.to_json()}
            )
        except ApiError as exc:
            if exc.status != 409 or exc.error != "stale-key" or fresh:
                raise
            continue
        ctx.subtask_digests[task.id] = document.digest
        return task
    raise AssertionError("unreachable: the second attempt returns or raises")


async def result_context_of(ctx: ProxyContext, run: Run) -> bytes | None:
    """What the run's result must be bound to; None for a subtask without a descriptor."""
    digest = ctx.subtask_digests.get(run.task_id)
    if digest is None:
        digest = await _digest_from_server(ctx, run.task_id)
    return None if digest is None else result_context(digest, run.organization_id, run.id)


async def _digest_from_server(ctx: ProxyContext, task_id: int) -> str | None:
    """A subtask this proxy did not create (or forgot): its descriptor, once it shows it is ours."""
    task = await ctx.rest.get_task(task_id)
    if not task.descriptor:
        return None
    try:
        document = DescriptorDocument.parse(task.descriptor)
    except TrustError as exc:
        raise ProxyError(502, "undecryptable", f"task {task_id}: {exc.message}") from None
    entry = document.descriptor
    keys = [ctx.keyring.get(key_id) for key_id in entry.signers()]
    if not any(key is not None and entry.signed_by(key.public) for key in keys):
        raise ProxyError(
            502,
            "undecryptable",
            f"task {task_id}'s descriptor is not signed by this organization: its results are not ours",
        )
    ctx.subtask_digests[task_id] = document.digest
    return document.digest
