"""Long poll on a task: answer as soon as every run has finished (or, with `since`, when any run changed).

A waiter holds no database connection while it waits. It is woken by the commit of a change to the task's
runs in this process (task_events) or, on PostgreSQL, in any other server process (pg_events), and re-reads
the database every `task_wait_recheck_s` regardless, so a lost wake-up only delays the answer. A client
that hangs up is noticed at the next wake-up or re-check, and its waiter is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time

from aiohttp import web
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.common.api import resources as res
from vfed.common.api.statuses import TERMINAL, RunStatus
from vfed.server.api.common import caller, json_response, path_id, read_query, session
from vfed.server.api.tasks import out as task_out
from vfed.server.api.tasks import visible_task_row
from vfed.server.metrics import METRICS
from vfed.server.models import Run
from vfed.server.schemas import TaskWaitQuery
from vfed.server.state import SETTINGS, TASK_EVENTS

_RUN_STATES = (
    select(Run.id, Run.organization_id, Run.node_id, Run.status)
    .where(Run.task_id == bindparam("task"))
    .order_by(Run.id)
)


def _done(runs: list[res.RunState]) -> bool:
    return bool(runs) and all(r.status in TERMINAL for r in runs)


def _version(runs: list[res.RunState]) -> str:
    """Changes whenever any run's status or node changes (the same in every server process)."""
    text = ";".join(f"{r.id}:{r.status}:{r.node_id}" for r in runs)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


async def _run_states(s: AsyncSession, task_id: int) -> list[res.RunState]:
    conn = await s.connection()
    rows = await conn.execute(_RUN_STATES, {"task": task_id})
    return [
        res.RunState.model_construct(id=i, organization_id=o, node_id=n, status=RunStatus(st))
        for i, o, n, st in rows
    ]


def _answerable(runs: list[res.RunState], since: str | None) -> bool:
    return _done(runs) or (since is not None and _version(runs) != since)


async def _state(
    request: web.Request, task_id: int, since: str | None, full: bool
) -> tuple[res.Task | None, list[res.RunState]]:
    """The runs' states and, when `full` or when they call for an answer, the task (with the caller's access
    checked, as GET /tasks/{id} does); a wake-up that changes nothing costs one statement."""
    async with session(request) as s:
        runs = await _run_states(s, task_id)
        if not full and not _answerable(runs, since):
            return None, runs
        p = await caller(request, s)
        task = await visible_task_row(s, p, task_id)
    return task_out(task, [r.organization_id for r in runs]), runs


def _answer(task: res.Task, runs: list[res.RunState]) -> web.Response:
    body = res.TaskWait.model_construct(done=_done(runs), version=_version(runs), task=task, runs=runs)
    return json_response(body)


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def wait_task(request: web.Request) -> web.Response:
    """Hold the request until the task is done, its runs changed since `since`, or `timeout_s` passed.
    The task and the caller's access are read at the start and again, in the same statement's session as
    the runs, for the answer; a wake-up in between reads only the runs' states."""
    q = read_query(request, TaskWaitQuery)
    task_id = path_id(request)
    settings = request.app[SETTINGS]
    timeout_s = min(q.timeout_s, settings.task_wait_max_s)
    recheck_s = settings.task_wait_recheck_s
    deadline = time.monotonic() + timeout_s
    events = request.app[TASK_EVENTS]
    waiters = request.app[METRICS].task_waiters
    woken = events.subscribe(task_id)  # before the first read: a change right after it is not missed
    waiters.inc()
    try:
        task, runs = await _state(request, task_id, q.since, full=True)
        seen = runs  # the runs `task` was read with
        while not _answerable(runs, q.since):
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), min(left_s, recheck_s))
            if _gone(request):
                break  # nobody to answer; the finally drops the waiter
            woken.clear()
            fresh, runs = await _state(request, task_id, q.since, full=False)
            task, seen = (fresh, runs) if fresh is not None else (task, seen)
        if runs != seen:  # a timeout after changes that did not call for an answer: the task moved too
            task, runs = await _state(request, task_id, q.since, full=True)
        assert task is not None  # a full read always brings the task
        return _answer(task, runs)
    finally:
        events.unsubscribe(task_id, woken)
        waiters.dec()
