"""Run receipts and checkpoints the node signs onto its collaboration's ledger.

Every run that started gets a receipt when it ends, whatever its status. A receipt is signed with the
organization's current key, over the head this node verified, and goes into a queue on disk (`LeaseStore`) in
the same transaction that ends the run's use of its leases; it is sent until the server accepts it (a 409 says
it is there already), so it survives restarts of the node and of the server. A checkpoint is appended at most
once a day, when the organization signed nothing else on the ledger for a day, so a quiet organization's view
of the ledger is compared too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from vfed.common.api.errors import ApiError
from vfed.common.ledger import Head, LedgerEntryExists, LedgerError, checkpoint_entry, receipt_entry
from vfed.node.keys import KeyHolder
from vfed.node.lease_store import LeaseStore
from vfed.node.ledger import NodeLedger
from vfed.node.metrics import NodeMetrics
from vfed.proxy.rest import ServerUnavailable

log = logging.getLogger(__name__)

RETRY_S = 5.0
MAX_RETRY_S = 120.0
DAY_S = 86400.0
CHECKPOINT_CHECK_S = 3600.0
_FIRST_SEEN = "checkpoint_quiet_since"
_LAST_CHECKPOINT = "last_checkpoint_at"


class Receipts:
    """The receipt queue and its sender, and the daily checkpoint."""

    def __init__(self, ledger: NodeLedger, store: LeaseStore, keys: KeyHolder, metrics: NodeMetrics) -> None:
        self.ledger = ledger
        self.store = store
        self.keys = keys
        self.metrics = metrics
        self._wake = asyncio.Event()

    def record(self, run_key: str, status: str, finished_at: float | None = None) -> bool:
        """Sign the receipt of a run that started and queue it; False when the run never started here."""
        facts = self.store.facts(run_key)
        if facts is None or facts.started_at is None or facts.done:
            return False
        entry = receipt_entry(
            self.keys.keyring.current,
            collaboration=self.ledger.collaboration_id,
            organization=self.ledger.organization_id,
            task=facts.task_id,
            run=facts.run_id,
            image=facts.image,
            finished_at=int(time.time() if finished_at is None else finished_at),
            status=status,
            seen=self.ledger.head,
            datasets=facts.uses,
            descriptor=facts.descriptor,
            input_hash=facts.input,
            result_hash=facts.result,
            started_at=facts.started_at,
        )
        self.store.finish(run_key, entry)
        self.metrics.receipts_queued.set(len(self.store.queued()))
        log.info("run %s: receipt %s queued for the ledger", facts.run_id, entry.digest[:12])
        self._wake.set()
        return True

    async def deliver(self) -> bool:
        """Send every queued receipt, oldest first; True when the queue is empty afterwards."""
        for item in self.store.queued():
            try:
                place = await self.ledger.view.backend.append(item.entry)
            except ApiError as exc:
                if exc.status == 409:  # there already (sent before a restart or a lost answer)
                    self.store.delivered(item.id)
                    continue
                self.store.attempt_failed(item.id, str(exc))
                log.error("the ledger refused the receipt of %s (will retry): %s", item.run_key, exc)
                return False
            except LedgerEntryExists:  # there already (a Fabric ledger's words for the 409 above)
                self.store.delivered(item.id)
                continue
            except (ServerUnavailable, LedgerError) as exc:
                self.store.attempt_failed(item.id, str(exc))
                log.warning("receipt of %s not delivered yet (%s)", item.run_key, exc)
                return False
            self.store.delivered(item.id)
            log.info("receipt of %s on the ledger at %s", item.run_key, place.short())
        self.metrics.receipts_queued.set(0)
        with contextlib.suppress(ApiError, ServerUnavailable, LedgerError):
            await self.ledger.sync()
        return True

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Send the queue now and whenever a receipt is queued; retry with backoff while it is not empty."""
        delay = RETRY_S
        while True:
            self._wake.clear()
            try:
                empty = await self.deliver()
            except Exception:  # the sender never stops the agent
                log.exception("sending receipts failed")
                empty = False
            delay = RETRY_S if empty else min(delay * 2, MAX_RETRY_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), None if empty else delay)

    async def checkpoint_if_due(self, now: float | None = None) -> Head | None:
        """Append a checkpoint when the organization signed nothing on the ledger for a day (and made none
        within a day); its place, or None when none was due."""
        now = time.time() if now is None else now
        org = self.ledger.organization_id
        quiet_since = self.store.meta(_FIRST_SEEN)
        if quiet_since is None:
            self.store.set_meta(_FIRST_SEEN, repr(now))
            quiet_since = repr(now)
        last = float(self.ledger.state.last_signed.get(org, float(quiet_since)))
        made = self.store.meta(_LAST_CHECKPOINT)
        if now - last < DAY_S or (made is not None and now - float(made) < DAY_S) or self.store.queued():
            return None
        entry = checkpoint_entry(
            self.keys.keyring.current,
            collaboration=self.ledger.collaboration_id,
            organization=org,
            seen=self.ledger.head,
            now=now,
        )
        place = await self.ledger.append(entry)
        self.store.set_meta(_LAST_CHECKPOINT, repr(now))
        log.info("ledger checkpoint appended at %s", place.short())
        return place

    async def checkpoints(self) -> None:
        """Look once an hour whether a checkpoint is due (after a sync, so the last day is seen)."""
        while True:
            await asyncio.sleep(CHECKPOINT_CHECK_S)
            try:
                await self.ledger.sync()
                await self.checkpoint_if_due()
            except (ApiError, ServerUnavailable, LedgerError) as exc:
                log.warning("no ledger checkpoint now (%s)", exc)
            except Exception:
                log.exception("the ledger checkpoint failed")
