"""What the node checks before a run may start, against keys pinned outside the server (docs/trust.md).

The task's signed descriptor must verify against the pinned key chains, name exactly the run the server
handed over (organization, collaboration, image, datasets, initiator, input hash), be new to this node, and
its input must be sealed to a key of ours that is still in use. Every refusal is a `TrustError` whose
`reason` code starts the run's reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vfed.common.api.resources import Run, Task
from vfed.common.crypto import PublicKey
from vfed.common.trust import (
    ChainResolver,
    DescriptorDocument,
    DescriptorExpired,
    DescriptorMismatch,
    DescriptorReplayed,
    Limits,
    Pin,
    Target,
    TrustError,
    TrustMode,
    TrustStore,
    UntrustedKey,
    VerifiedDescriptor,
    check_assignment,
    fingerprint,
    show_fingerprint,
    verify_document,
)
from vfed.node.config import NodeSettings
from vfed.node.journal import Journal
from vfed.node.keys import KeyHolder
from vfed.node.metrics import NodeMetrics
from vfed.node.server_api import NodeClient

log = logging.getLogger(__name__)

CHAIN_TTL_S = 300.0
"""How long a verified key chain is used before it is fetched again (rotations and forks show up then)."""


class UnsignedTask(TrustError):
    """The task carries no signed descriptor."""

    reason = "unsigned-task"


class StaleKey(TrustError):
    """The input is sealed to one of our keys that was replaced longer ago than key_grace_s."""

    reason = "stale-key"


class ResearcherKeyRequired(TrustError):
    """The node requires certified researcher keys; the task was signed with an organization's key."""

    reason = "researcher-key-required"


def refusal_reason(exc: TrustError, run_id: int, metrics: NodeMetrics | None = None) -> str:
    """Log and count a refused run; its reason `<code>: <message>` (an untrusted key names both
    fingerprints)."""
    text = f"{exc.reason}: {exc.message}"
    if metrics is not None:
        metrics.trust_refusals.labels(exc.reason).inc()
    if isinstance(exc, UntrustedKey):
        pinned = show_fingerprint(exc.pinned) if exc.pinned else "none"
        seen = show_fingerprint(exc.seen) if exc.seen else "none"
        text += f" [organization {exc.organization_id}: pinned {pinned}, seen {seen}]"
        log.error(
            "run %s: refused: organization %s is not trusted (pinned %s, seen %s): %s",
            run_id,
            exc.organization_id,
            pinned,
            seen,
            exc.message,
        )
    else:
        log.warning("run %s: refused (%s): %s", run_id, exc.reason, exc.message)
    return text


class NodeTrustStore(TrustStore):
    """The trust store file's pins, plus this node's own organization, pinned by its key file's first key
    (whatever the file says about it)."""

    def __init__(self, settings: NodeSettings, organization_id: int, root: PublicKey) -> None:
        super().__init__(settings.trust_store_path, TrustMode(settings.trust))
        self.own = Pin(organization_id, root.key_id, None, "this node's organization (its key file)")
        listed = super().get(organization_id)
        if listed is not None and listed.root != root.key_id:
            log.warning(
                "%s pins this node's own organization %s to %s; the key file's first key %s is used instead",
                self.path,
                organization_id,
                show_fingerprint(listed.root),
                fingerprint(root),
            )

    def get(self, organization_id: int) -> Pin | None:
        if organization_id == self.own.organization_id:
            return self.own
        return super().get(organization_id)


def node_resolver(client: NodeClient, store: TrustStore) -> ChainResolver:
    """Key chains fetched with the node's login, checked against its trust store."""
    return ChainResolver(store, client.key_records, client.revocations)


@dataclass(frozen=True)
class Accepted:
    """A run's descriptor that passed every check, and what the node needs from it later."""

    verified: VerifiedDescriptor
    target: Target

    def sender(self) -> Callable[[str], PublicKey | None]:
        """The input's signer lookup: only the key that signed the descriptor."""
        signer = self.verified.signer

        def lookup(key_id: str) -> PublicKey | None:
            return signer if key_id == signer.key_id else None

        return lookup


class RunChecks:
    """The checks of one node, shared by its runs (the chains it fetched are cached for CHAIN_TTL_S)."""

    def __init__(
        self,
        settings: NodeSettings,
        resolver: ChainResolver,
        journal: Journal,
        keys: KeyHolder,
        organization_id: int,
        collaboration_id: int | None,
        server_identity: str = "",
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.journal = journal
        self.keys = keys
        self.organization_id = organization_id
        self.collaboration_id = collaboration_id
        self.server_identity = server_identity
        self._verified_at: dict[int, float] = {}

    def limits(self, now: float | None = None) -> Limits:
        s = self.settings
        return Limits(
            time.time() if now is None else now, s.descriptor_skew_s, s.key_grace_s, s.max_subtask_depth
        )

    def run_key(self, run_id: int) -> str:
        """Run ids restart with a reset server: the journal keys descriptors by server and run."""
        return f"{self.server_identity}:{run_id}" if self.server_identity else str(run_id)

    async def verify(self, task: Task, *, now: float | None = None) -> VerifiedDescriptor:
        """The task's descriptor, verified against the pinned chains (not yet against the run)."""
        if not task.descriptor:
            raise UnsignedTask(
                f"task {task.id} carries no signed descriptor; this node runs signed tasks only"
            )
        document = DescriptorDocument.parse(task.descriptor)
        orgs = set(_initiator_orgs(document))
        self._reload_pins()
        self._expire_chains(orgs)
        cached = any(self.resolver.cached(org) is not None for org in orgs)
        try:
            verified = await verify_document(document, self.resolver, self.limits(now))
        except (DescriptorExpired, DescriptorMismatch):
            raise
        except TrustError:
            if not cached:
                raise
            # A chain kept from before may miss a rotation since: fetch the chains once more.
            for org in orgs:
                self.resolver.forget(org)
                self._verified_at.pop(org, None)
            verified = await verify_document(document, self.resolver, self.limits(now))
        for org in orgs:
            self._verified_at.setdefault(org, time.monotonic())
        if self.settings.require_researcher_keys and verified.root.body.signer.role != "user":
            raise ResearcherKeyRequired(
                f"the task is signed with a key of organization {verified.root.body.initiator.org}; this "
                "node runs only tasks signed by a researcher's certified key (require_researcher_keys)"
            )
        return verified

    def _reload_pins(self) -> None:
        """Pins the admin changed (`vnode trust|untrust`) count from the next run on: the chains verified
        under the old pins are dropped."""
        store = self.resolver.store
        before = set(store.pins())
        store.reload_if_changed()
        for pin in before ^ set(store.pins()):
            self.resolver.forget(pin.organization_id)
            self._verified_at.pop(pin.organization_id, None)

    def _expire_chains(self, orgs: set[int]) -> None:
        now = time.monotonic()
        for org in orgs:
            fetched = self._verified_at.get(org)
            if fetched is not None and now - fetched > CHAIN_TTL_S:
                self.resolver.forget(org)
                del self._verified_at[org]

    def assign(self, verified: VerifiedDescriptor, run: Run, task: Task, input_sha256: str) -> Accepted:
        """The run the server handed over is the one signed, and its input is sealed to a key in use."""
        target = check_assignment(
            verified,
            organization_id=self.organization_id,
            collaboration_id=self.collaboration_id,
            image=task.image,
            datasets=task.datasets,
            input_sha256=input_sha256,
            initiator_org=task.initiator_organization_id,
        )
        if run.organization_id != self.organization_id:
            raise DescriptorMismatch(f"the run is for organization {run.organization_id}, not this node's")
        self._check_key(target)
        return Accepted(verified, target)

    def _check_key(self, target: Target) -> None:
        keys = self.keys.keyring.keys
        ids = [k.key_id for k in keys]
        if target.key_id not in ids:
            return  # decryption says which key is missing
        index = ids.index(target.key_id)
        if index == len(keys) - 1:
            return
        replaced_at = keys[index + 1].created_s
        age = time.time() - replaced_at
        if replaced_at and age > self.settings.key_grace_s:
            raise StaleKey(
                f"the input is sealed to key {target.key_id}, which key {ids[index + 1]} replaced "
                f"{age / 86400:.1f} days ago (key_grace_s is {self.settings.key_grace_s:.0f} s); the "
                "initiator has to seal to the organization's current key"
            )

    def accept(self, verified: VerifiedDescriptor, run_id: int) -> None:
        """Remember the descriptor for this run until it expires; refuse one another run executed."""
        now = time.time()
        expires = verified.body.expires_at + self.settings.descriptor_skew_s
        other = self.journal.accept_descriptor(verified.digest, self.run_key(run_id), expires, now)
        if other is not None:
            raise DescriptorReplayed(
                f"descriptor {verified.digest[:16]}... was already executed by this node (run "
                f"{other.rpartition(':')[2]}); the server handed it over again"
            )

    async def reverify(self, run_id: int, task: Task) -> VerifiedDescriptor:
        """After a restart: the descriptor the run was accepted with, verified as it was then (no replay
        check); the server cannot swap in another one."""
        accepted = self.journal.accepted_descriptor(self.run_key(run_id))
        if accepted is None:
            raise UnsignedTask(f"run {run_id} was not accepted with a signed descriptor by this node")
        digest, accepted_at = accepted
        verified = await self.verify(task, now=accepted_at)
        if verified.digest != digest:
            raise DescriptorMismatch(
                f"the server now shows another descriptor for run {run_id} than the one it ran with"
            )
        return verified


def _initiator_orgs(document: DescriptorDocument) -> Iterator[int]:
    current: DescriptorDocument | None = document
    while current is not None:
        try:
            yield current.body().initiator.org
        except TrustError:
            return
        current = current.parent
