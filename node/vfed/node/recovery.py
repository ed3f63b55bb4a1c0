"""After a restart: match the journal with the containers found by label, and finish what was left.

A run whose container still runs is followed again, one that exited while we were down has its result
collected, one whose container is gone is marked crashed. Stages already done (sealed, uploaded) are not
repeated, so no result is lost and none is uploaded twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from pydantic import SecretStr

from vfed.common.api import Reason, classified
from vfed.common.api.statuses import RunStatus
from vfed.common.trust import DescriptorDocument, TrustError
from vfed.node.journal import Entry, Stage
from vfed.node.runner import Runner, Services
from vfed.node.runtime.base import ExitStatus, NotFound, RunHandleInfo, RunState, RuntimeUnavailable

log = logging.getLogger(__name__)

Resume = Callable[[asyncio.Event], Awaitable[None]]
Spawn = Callable[[int, Resume], None]


async def recover(s: Services, runner: Runner, spawn: Spawn) -> None:
    """Settle every journaled run; containers of runs the journal does not know are removed.

    Only this agent's containers count (its journal's label, or none on containers older than the label):
    another agent given the same node name on this engine keeps its runs, instead of losing them here.
    """
    entries = s.journal.unfinished()
    containers = {}
    for c in await s.runtime.list_runs(s.settings.name):
        if c.agent_id in (None, s.journal.agent_id):
            containers[c.run_id] = c
        else:
            log.warning(
                "leaving container %s alone: another agent named %s started it", c.handle, s.settings.name
            )
    if entries:
        log.info("recovering %d run(s) from the journal", len(entries))
    for entry in entries:
        info = containers.pop(str(entry.run_id), None)
        try:
            await _settle(s, runner, spawn, entry, info)
        except Exception:
            log.exception("run %s: recovery failed; it stays in the journal", entry.run_id)
    for leftover in containers.values():
        log.info(
            "removing container %s of run %s, which the journal does not know",
            leftover.handle,
            leftover.run_id,
        )
        with contextlib.suppress(NotFound, RuntimeUnavailable):
            await s.runtime.cleanup(leftover.handle)


async def _settle(
    s: Services, runner: Runner, spawn: Spawn, entry: Entry, info: RunHandleInfo | None
) -> None:
    fin = runner.finisher
    handle = info.handle if info is not None else entry.handle
    if entry.stage == Stage.CLAIMED:
        if info is not None:
            with contextlib.suppress(NotFound, RuntimeUnavailable):
                await s.runtime.cleanup(info.handle)
        await fin.end_without_container(
            entry.run_id, RunStatus.CRASHED, "the agent stopped before the container started"
        )
        return
    if entry.stage != Stage.STARTED:
        log.info("run %s: resuming at stage %s", entry.run_id, entry.stage)
        await fin.complete(entry.run_id, entry.job_id, handle)
        return
    if info is None:
        reason = classified(Reason.LOST, "the container was lost while the agent was down")
        await fin.exited(entry.run_id, None, "crashed", reason)
        await fin.complete(entry.run_id, entry.job_id, None)
        return
    if info.state == RunState.EXITED:
        log.info("run %s: exited while the agent was down; collecting its result", entry.run_id)
        exit_status = ExitStatus(exit_code=info.exit_code, oom_killed=info.oom_killed)
        await fin.exited(entry.run_id, exit_status, None, None)
        await fin.complete(entry.run_id, entry.job_id, info.handle)
        return
    spawn(entry.run_id, _follow_again(s, runner, entry, info.handle))


def _follow_again(s: Services, runner: Runner, entry: Entry, handle: str) -> Resume:
    async def resume(kill: asyncio.Event) -> None:
        log.info("run %s: still running after the restart; following it again", entry.run_id)
        run = await s.client.get_run(entry.run_id)
        task = await s.client.get_task(entry.task_id)
        try:
            document: DescriptorDocument | None = (await runner.finisher.verified(run.id, task.id)).document
        except TrustError as exc:  # the proxy then makes no subtasks; sealing withholds the result
            log.error("run %s: its descriptor does not verify any more: %s", entry.run_id, exc.message)
            document = None
        proxy = await runner.start_proxy(
            run, task, descriptor=document, proxy_token=await _proxy_token(s, entry, handle)
        )
        try:
            deadline = (
                entry.deadline if entry.deadline is not None else time.time() + s.settings.max_run_time_s
            )
            await runner.finisher.follow(entry.run_id, entry.job_id, handle, deadline, kill)
        finally:
            if proxy is not None:
                await proxy.stop()

    return resume


async def _proxy_token(s: Services, entry: Entry, handle: str) -> SecretStr | None:
    """The proxy token the still-running run holds (its runtime kept it where the run reads it); None for a
    socket runtime. A networked run whose token is gone gets a new proxy it cannot reach: said here."""
    if not s.runtime.proxy_over_network:
        return None
    try:
        token = await s.runtime.proxy_token(handle)
    except RuntimeUnavailable as exc:
        log.warning(
            "run %s: its proxy token cannot be read (%s); its proxy requests will fail", entry.run_id, exc
        )
        return None
    if token is None:
        log.warning("run %s: its proxy token is gone; its proxy requests will fail", entry.run_id)
    return token
