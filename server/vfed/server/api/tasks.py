"""Tasks: one per request of a researcher (or of a running algorithm), one run per target organization."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime

from aiohttp import web
from sqlalchemy import ColumnElement, and_, bindparam, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.common.api import resources as res
from vfed.common.api.statuses import TERMINAL, RunStatus, TaskStatus, task_status
from vfed.server.access import Scope, require, task_filter
from vfed.server.api.common import (
    caller,
    equal_filters,
    json_response,
    page_of,
    paginate,
    path_id,
    read_query,
    session,
)
from vfed.server.auth import Principal
from vfed.server.errors import forbidden, not_found
from vfed.server.models import Node, Run, Task, utcnow
from vfed.server.schemas import TaskQuery
from vfed.server.state import DOORBELL
from vfed.server.task_events import mark_changed


@dataclass(frozen=True)
class NewTask:
    """A task row just inserted (no ORM object: building one costs more than the INSERT)."""

    id: int
    collaboration_id: int
    initiator_organization_id: int
    initiator_user_id: int | None
    image: str
    image_digest: str | None
    name: str
    description: str
    datasets: list[str]
    parent_id: int | None
    job_id: int | None
    status: TaskStatus
    created_at: datetime
    descriptor: str | None = None


def out(t: Task | NewTask, org_ids: list[int]) -> res.Task:
    """The task as the API shows it (rows from our own database: no validation needed)."""
    return res.Task.model_construct(
        id=t.id,
        collaboration_id=t.collaboration_id,
        initiator_organization_id=t.initiator_organization_id,
        initiator_user_id=t.initiator_user_id,
        image=t.image,
        image_digest=t.image_digest,
        name=t.name,
        description=t.description,
        organization_ids=org_ids,
        datasets=list(t.datasets or []),
        parent_id=t.parent_id,
        job_id=job_of(t),
        status=TaskStatus(t.status),
        created_at=t.created_at,
        descriptor=t.descriptor,
        links={
            "self": f"/api/v1/tasks/{t.id}",
            "runs": f"/api/v1/runs?task_id={t.id}",
            "collaboration": f"/api/v1/collaborations/{t.collaboration_id}",
            "parent": f"/api/v1/tasks/{t.parent_id}" if t.parent_id else None,
            "subtasks": f"/api/v1/tasks?parent_id={t.id}",
            "job": f"/api/v1/tasks?job_id={job_of(t)}",
        },
    )


async def target_orgs(s: AsyncSession, task_ids: list[int]) -> dict[int, list[int]]:
    """Target organizations of each task, from its runs."""
    found: dict[int, list[int]] = {t: [] for t in task_ids}
    if task_ids:
        rows = await s.execute(
            select(Run.task_id, Run.organization_id).where(Run.task_id.in_(task_ids)).order_by(Run.id)
        )
        for task_id, org_id in rows:
            found[task_id].append(org_id)
    return found


async def refresh_status(s: AsyncSession, task_id: int) -> None:
    """Re-derive a task's status from its runs (kept on the row so lists can filter on it); the session's
    commit then wakes whoever waits on the task. The task row is locked first (PostgreSQL) so concurrent
    changes to its runs derive the status one after the other, each from the runs the other committed."""
    await s.execute(select(Task.id).where(Task.id == task_id).with_for_update())
    statuses = list((await s.execute(select(Run.status).where(Run.task_id == task_id))).scalars())
    await s.execute(update(Task).where(Task.id == task_id).values(status=task_status(statuses)))
    mark_changed(s, task_id)


@dataclass(frozen=True)
class RunRef:
    """What the doorbell needs to know of a run."""

    id: int
    task_id: int
    organization_id: int
    node_id: int | None
    job_id: int  # in the doorbell, so a node can prepare the job's volume while its claim is in flight


def job_of(task: Task | NewTask) -> int:
    """A top-level task is its own job; subtasks carry their job id."""
    return task.job_id if task.job_id is not None else task.id


def in_job(job_id: int) -> ColumnElement[bool]:
    """Tasks of job `job_id`."""
    return or_(Task.job_id == job_id, and_(Task.job_id.is_(None), Task.id == job_id))


async def ring(request: web.Request, s: AsyncSession, collab_id: int, runs: list[RunRef], event: str) -> None:
    """Doorbell every node that may act on these runs (the claimer, or all nodes of the organization)."""
    publish(request, await ring_targets(request, s, collab_id, runs), event)


def publish(request: web.Request, targets: list[tuple[int, RunRef]], event: str) -> None:
    """Queue one doorbell per (node, run); call only once the runs are committed. New runs rung to many
    nodes at once carry a spread, so their claims do not all reach the server in the same instant."""
    doorbell = request.app[DOORBELL]
    spread_s = doorbell.spread_for(len({n for n, _ in targets})) if event == "run-created" else 0.0
    for node_id, r in targets:
        doorbell.ring(node_id, event, r.id, r.task_id, r.job_id, spread_s)


_NODES_OF_ORGS = select(Node.organization_id, Node.id).where(
    Node.collaboration_id == bindparam("collab"), Node.organization_id.in_(bindparam("orgs", expanding=True))
)


async def ring_targets(
    request: web.Request, s: AsyncSession, collab_id: int, runs: list[RunRef]
) -> list[tuple[int, RunRef]]:
    """(node, run) pairs to ring: the claimer, or all nodes of the organization; none without a broker."""
    if request.app[DOORBELL].address is None:
        return []
    orgs = {r.organization_id for r in runs if r.node_id is None}
    nodes: dict[int, list[int]] = {}
    if orgs:
        conn = await s.connection()
        rows = await conn.execute(_NODES_OF_ORGS, {"collab": collab_id, "orgs": list(orgs)})
        for org_id, node_id in rows:
            nodes.setdefault(org_id, []).append(node_id)
    return pair_targets(nodes, runs)


def pair_targets(nodes: dict[int, list[int]], runs: list[RunRef]) -> list[tuple[int, RunRef]]:
    """(node, run) pairs: a claimed run's node, else every node of the run's organization (`nodes` by org)."""
    return [
        (node_id, r)
        for r in runs
        for node_id in ([r.node_id] if r.node_id is not None else nodes.get(r.organization_id, []))
    ]


async def list_tasks(request: web.Request) -> web.Response:
    """Tasks the caller may see, filtered."""
    q = read_query(request, TaskQuery)
    async with session(request) as s:
        p = await caller(request, s)
        where = [
            task_filter(p, require(p, "task", "read")),
            *equal_filters(
                (Task.collaboration_id, q.collaboration_id),
                (Task.parent_id, q.parent_id),
                (Task.status, q.status),
            ),
        ]
        if q.job_id is not None:
            where.append(in_job(q.job_id))
        rows, total = await paginate(s, Task, where, q.page, q.per_page)
        orgs = await target_orgs(s, [t.id for t in rows])
    return web.json_response(page_of(request, [out(t, orgs[t.id]) for t in rows], total, q.page, q.per_page))


async def visible_task(s: AsyncSession, p: Principal, task_id: int) -> Task:
    """The task, or 404 when the caller may not see it."""
    where = task_filter(p, require(p, "task", "read"))
    task = (await s.execute(select(Task).where(Task.id == task_id, where))).scalar_one_or_none()
    if task is None:
        raise not_found("task", task_id)
    return task


_TASK_COLUMNS = [getattr(Task, f.name) for f in fields(NewTask)]


async def visible_task_row(s: AsyncSession, p: Principal, task_id: int) -> NewTask:
    """As visible_task, as a plain row (no ORM object: for answers built from it and nothing else)."""
    where = task_filter(p, require(p, "task", "read"))
    row = (await s.execute(select(*_TASK_COLUMNS).where(Task.id == task_id, where))).first()
    if row is None:
        raise not_found("task", task_id)
    return NewTask(*row)


async def get_task(request: web.Request) -> web.Response:
    """One task."""
    async with session(request) as s:
        p = await caller(request, s)
        task = await visible_task(s, p, path_id(request))
        orgs = await target_orgs(s, [task.id])
    return json_response(out(task, orgs[task.id]))


async def kill_task(request: web.Request) -> web.Response:
    """Mark every unfinished run of the task (and of its job, for a top-level task) killed; ring nodes."""
    async with session(request) as s:
        p = await caller(request, s)
        task = await visible_task(s, p, path_id(request))
        scope = require(p, "task", "kill")
        if scope == Scope.OWN and task.initiator_user_id != p.user_id:
            raise forbidden("you may kill only tasks you created")
        if scope == Scope.ORGANIZATION and task.initiator_organization_id != p.organization_id:
            raise forbidden("you may kill only your organization's tasks")
        scope_ids = select(Task.id).where(in_job(task.id)) if task.parent_id is None else [task.id]
        live = [Run.task_id.in_(scope_ids), Run.status.not_in(list(TERMINAL))]
        ids = list((await s.execute(select(Run.id).where(*live))).scalars())
        await s.execute(
            update(Run)
            .where(Run.id.in_(ids), Run.status.not_in(list(TERMINAL)))
            .values(status=RunStatus.KILLED, finished_at=utcnow())
        )
        killed = select(Run.id, Run.task_id, Run.organization_id, Run.node_id, Run.job_id).where(
            Run.id.in_(ids), Run.status == RunStatus.KILLED
        )
        runs = [RunRef(*row) for row in await s.execute(killed)]
        for task_id in {r.task_id for r in runs} | {task.id}:
            await refresh_status(s, task_id)
        await s.commit()
        await s.refresh(task)
        await ring(request, s, task.collaboration_id, runs, "run-killed")
        orgs = await target_orgs(s, [task.id])
    return json_response(out(task, orgs[task.id]))
