"""Leases enforced at the node (`leases: required`): a run reads a dataset only under a lease on the verified
ledger that covers it at its start, and is killed when that lease is revoked or expires while it runs.

The check before the start uses the ledger as verified in memory: it reads the server only when the task's
descriptor names a ledger head beyond it (which also catches a fork) or when no lease is found (one sync, then
the check again). Counts and epsilon are reserved in `LeaseStore` (one IMMEDIATE transaction). While runs use
leases, `watch` kills them: a timer at the earliest expiry among the leases in use, a sync on each `ledger`
doorbell ring, and without a broker a sync every few seconds only while such runs are active.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from vfed.common.api.errors import ApiError
from vfed.common.api.resources import Task
from vfed.common.ledger import DatasetUse, Head, Lease, LedgerError, NoValidLease
from vfed.common.trust import TrustError, VerifiedDescriptor
from vfed.node import budget
from vfed.node.config import NodeSettings
from vfed.node.lease_store import Candidate, LeaseStore
from vfed.node.ledger import NodeLedger
from vfed.node.metrics import NodeMetrics
from vfed.node.privacy import BudgetRefused
from vfed.node.receipts import Receipts
from vfed.node.run_input import RunInput
from vfed.node.runtime.base import Runtime
from vfed.proxy.rest import ServerUnavailable

log = logging.getLogger(__name__)

POLL_WITHOUT_BROKER_S = 2.0
"""Sync period while lease-using runs are active and no doorbell broker is connected."""
POLL_WITH_BROKER_S = 60.0
"""Sync period while lease-using runs are active and the doorbell is up (a ring missed is caught here)."""

Kill = Callable[[int, str], None]


class LedgerUnavailable(TrustError):
    """The ledger could not be read when the run needed it read (the server did not answer)."""

    reason = "ledger-unavailable"


class LeaseGuard:
    """The lease checks and watch of one node; `receipts` appends each finished run's receipt."""

    def __init__(
        self,
        settings: NodeSettings,
        ledger: NodeLedger,
        store: LeaseStore,
        receipts: Receipts,
        runtime: Runtime,
        metrics: NodeMetrics,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.store = store
        if ledger.leases is None:  # the ledger feeds the runs of its receipts to the store reservations use
            ledger.leases = store
        assert ledger.leases is store, "the ledger must count its receipts in the guard's store"
        self.receipts = receipts
        self.runtime = runtime
        self.metrics = metrics
        self._active: dict[int, list[str]] = {}
        self._killed: set[int] = set()
        self._changed = asyncio.Event()
        self._poked = False

    @property
    def organization_id(self) -> int:
        return self.ledger.organization_id

    # -- before the start ----------------------------------------------------------------------------------
    async def check_descriptor(self, verified: VerifiedDescriptor) -> None:
        """Every ledger head the descriptor chain's signers verified is on this node's chain (LedgerForked if
        not; LedgerUnavailable when it lies beyond and the ledger cannot be read)."""
        current: VerifiedDescriptor | None = verified
        while current is not None:
            claimed = current.body.ledger
            if claimed is not None:
                head = Head(seq=claimed.seq, hash=claimed.hash)
                try:
                    await self.ledger.ensure_head(head, f"task descriptor {current.digest[:12]}")
                except (ApiError, ServerUnavailable) as exc:
                    raise LedgerUnavailable(
                        f"the descriptor names ledger head {head.short()}, beyond the {self.ledger.length} "
                        f"entries verified here, and the ledger cannot be read now ({exc})"
                    ) from None
            current = current.parent

    async def reserve(
        self,
        *,
        run_key: str,
        run_id: int,
        task: Task,
        digest: str,
        verified: VerifiedDescriptor,
        input_hash: str | None,
        run_input: RunInput,
    ) -> list[DatasetUse]:
        """Reserve this run on a lease for each dataset it reads; NoValidLease (or another TrustError) if not.
        The reservation is recorded even without datasets: it carries what the run's receipt says."""
        root = verified.root.body.initiator
        images = {digest}
        if "@sha256:" in task.image:
            images.add(task.image.rpartition("@")[2])
        now = time.time()
        choices: list[tuple[str, list[Candidate]]] = []
        for label in task.datasets:
            leases = await self._leases(label, root.org, root.user, images, now)
            choices.append(
                (
                    label,
                    [Candidate(x.id, x.dataset.digest, x.body.max_runs, x.body.epsilon) for x in leases],
                )
            )
        epsilon = await self._epsilon(task, digest, run_input, choices)
        self.ledger.feed_receipts()  # a no-op unless a feed failed: the store counts every verified receipt
        return self.store.reserve(
            run_key=run_key,
            run_id=run_id,
            task_id=task.id,
            image=digest,
            descriptor=verified.digest,
            input_hash=input_hash,
            choices=choices,
            epsilon=epsilon,
        )

    async def _leases(
        self, label: str, grantee: int, user: int | None, images: set[str], now: float
    ) -> list[Lease]:
        for attempt in (1, 2):
            try:
                state = self.ledger.state
                if state.dataset(self.organization_id, label) is None:
                    raise NoValidLease(
                        f"dataset {label!r} is not registered on the ledger by organization "
                        f"{self.organization_id}"
                    )
                return state.leases_for(
                    owner=self.organization_id,
                    label=label,
                    grantee=grantee,
                    user=user,
                    images=images,
                    now=now,
                )
            except NoValidLease:
                if attempt == 2 or not await self._sync_quietly():
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _epsilon(
        self, task: Task, digest: str, run_input: RunInput, choices: list[tuple[str, list[Candidate]]]
    ) -> float | None:
        """What the run spends: asked of the image's manifest only when a lease caps epsilon or a dataset has
        a privacy budget (otherwise the receipt records none)."""
        capped = any(c.epsilon_cap is not None for _, cs in choices for c in cs)
        offered = self.settings.datasets
        budgeted = any(offered[d].epsilon_budget is not None for d in task.datasets if d in offered)
        if not (capped or budgeted):
            return None
        try:
            return await budget.spent_epsilon(self.runtime, image=digest, run_input=run_input)
        except BudgetRefused as exc:
            raise NoValidLease(f"the run's epsilon is unknown: {exc}") from None

    async def _sync_quietly(self) -> bool:
        """Sync; False when the server cannot be read (LedgerError goes to the caller)."""
        try:
            await self.ledger.sync()
        except (ApiError, ServerUnavailable) as exc:
            log.warning("the ledger could not be read (%s); using what was verified before", exc)
            return False
        return True

    def release(self, run_key: str) -> None:
        """The run did not start: what it reserved is free again."""
        self.store.release(run_key)

    # -- while it runs -------------------------------------------------------------------------------------
    def started(self, run_key: str, run_id: int) -> None:
        self.store.started(run_key, int(time.time()))
        facts = self.store.facts(run_key)
        leases = [u.lease for u in facts.uses if u.lease is not None] if facts is not None else []
        if leases:
            self._active[run_id] = leases
            self._changed.set()

    def resume(self, unfinished: set[int]) -> None:
        """After a restart: the runs the journal still has that use leases are watched again."""
        for facts in self.store.running():
            leases = [u.lease for u in facts.uses if u.lease is not None]
            if leases and facts.run_id in unfinished:
                self._active[facts.run_id] = leases
        self._changed.set()

    def finished(self, run_key: str, run_id: int, status: str) -> None:
        """The run is over (any status): stop watching it; a run that started gets its receipt."""
        self._active.pop(run_id, None)
        self._killed.discard(run_id)
        if not self.store.release(run_key):
            self.receipts.record(run_key, status)

    def poke(self) -> None:
        """A `ledger` doorbell ring: sync and check the running runs again."""
        self._poked = True
        self._changed.set()

    def violations(self, now: float) -> list[tuple[int, str]]:
        """(run id, reason) of each watched run a lease of which was revoked or expired."""
        found = []
        for run_id, lease_ids in self._watched().items():
            for lease_id in lease_ids:
                reason = _broken(self.ledger.state.leases.get(lease_id), lease_id, now)
                if reason is not None:
                    found.append((run_id, reason))
                    break
        return found

    def _watched(self) -> dict[int, list[str]]:
        """The runs using leases and not yet asked to end."""
        return {r: ids for r, ids in self._active.items() if r not in self._killed}

    def _next_expiry(self) -> float | None:
        leases = self.ledger.state.leases
        times = [leases[x].expires_at for ids in self._watched().values() for x in ids if x in leases]
        return min(times) if times else None

    async def watch(self, kill: Kill, broker_up: Callable[[], bool]) -> None:
        """Runs until cancelled; asks `kill` to end each run whose lease was revoked or expired."""
        last_sync = time.monotonic()
        while True:
            timeout = self._timeout(broker_up(), last_sync)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
            self._changed.clear()
            poked, self._poked = self._poked, False
            if not self._watched():
                continue
            now = time.time()
            expiry = self._next_expiry()
            due = poked or (expiry is not None and expiry <= now)
            period = POLL_WITH_BROKER_S if broker_up() else POLL_WITHOUT_BROKER_S
            if due or time.monotonic() - last_sync >= period:
                last_sync = time.monotonic()  # also on failure: no storm against a server that is away
                try:
                    await self._sync_quietly()
                except LedgerError as exc:
                    log.error(
                        "the ledger does not verify any more (%s); leases are checked as verified before",
                        exc,
                    )
            for run_id, reason in self.violations(time.time()):
                self._killed.add(run_id)
                code = reason.partition(":")[0]
                self.metrics.lease_kills.labels(code).inc()
                log.warning("run %s: killed: %s", run_id, reason)
                kill(run_id, reason)

    def _timeout(self, broker: bool, last_sync: float) -> float | None:
        if not self._watched():
            return None
        period = POLL_WITH_BROKER_S if broker else POLL_WITHOUT_BROKER_S
        wait = max(last_sync + period - time.monotonic(), 0.0)
        expiry = self._next_expiry()
        if expiry is not None:
            wait = min(wait, max(expiry - time.time(), 0.0) + 0.05)
        return wait


def _broken(lease: Lease | None, lease_id: str, now: float) -> str | None:
    short = lease_id[:12]
    if lease is None:
        return None  # not on the verified ledger here (cannot happen for a reserved lease)
    if lease.revoked is not None:
        why = lease.revoked.reason or "no reason given"
        return f"lease-revoked: lease {short} on dataset {lease.dataset.label!r} was revoked ({why})"
    if now >= lease.expires_at:
        when = datetime.fromtimestamp(lease.expires_at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        return f"lease-expired: lease {short} on dataset {lease.dataset.label!r} expired at {when}"
    return None


def lease_refusal(exc: TrustError, run_id: int, metrics: NodeMetrics) -> str:
    """Log and count a run refused by the lease check; its reason `<code>: <message>`."""
    if isinstance(exc, NoValidLease):
        metrics.lease_refusals.inc()
    log.warning("run %s: refused (%s): %s", run_id, exc.reason, exc.message)
    return f"{exc.reason}: {exc.message}"
