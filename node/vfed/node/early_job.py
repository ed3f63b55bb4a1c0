"""The job's folder and volume set up from a doorbell's job id while the claim is on its way.

Why: the claim round trip (about 5 ms) and the job folder (a few syscalls and one engine request) were in a
row on every start of a new job. The agent reads a rung run from the server before it claims it (a ring is
only a hint, agent.Agent._on_ring), and that answer names the run's job, so both can go at once. Still only a
hint: the claim's answer decides, and what a hint set up for nothing is taken down again.

While a hint is held, the job counts as busy (`Services.jobs_in_setup`): a run of the same job ending
meanwhile must not remove the folder this run is about to mount; the journal covers the run once claimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vfed.node.finish import Finisher
    from vfed.node.runner import Services

log = logging.getLogger(__name__)


class BusyJobs:
    """Jobs a run being set up needs (a hint held, a claim not yet journaled), counted per job."""

    def __init__(self) -> None:
        self._count: Counter[int] = Counter()

    def hold(self, job_id: int) -> None:
        self._count[job_id] += 1

    def release(self, job_id: int) -> None:
        self._count[job_id] -= 1
        if self._count[job_id] <= 0:
            del self._count[job_id]

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._count

    def __len__(self) -> int:
        return len(self._count)


class EarlyJobFolder:
    """One run's early job folder: `start()` before the claim, then `take()` or `drop()` exactly once."""

    def __init__(self, services: Services, finisher: Finisher, job_id: int) -> None:
        self.s = services
        self.finisher = finisher
        self.job_id = job_id
        self.volume: asyncio.Future[str] | None = None

    def start(self) -> None:
        self.s.jobs_in_setup.hold(self.job_id)
        self.volume = asyncio.ensure_future(
            self.s.runtime.ensure_job_volume(self.s.settings.name, str(self.job_id))
        )

    async def take(self, claimed_job_id: int) -> asyncio.Future[str] | None:
        """The volume's future when the claim names the hinted job (call after journaling the claim);
        None when it names another one, whose folder the caller sets up (this one is then dropped)."""
        self.s.jobs_in_setup.release(self.job_id)
        if claimed_job_id == self.job_id:
            return self.volume
        log.warning("doorbell named job %s, the claim job %s", self.job_id, claimed_job_id)
        await self._release()
        return None

    async def drop(self) -> None:
        """The claim failed: remove what the hint set up unless another run of the job needs it."""
        self.s.jobs_in_setup.release(self.job_id)
        await self._release()

    async def _release(self) -> None:
        if self.volume is not None:
            with contextlib.suppress(Exception):  # a folder that failed is nothing to remove
                await self.volume
        await self.finisher.release_job_volume(self.job_id)
