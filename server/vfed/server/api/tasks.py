"""Tasks: one per request of a researcher (or of a running algorithm), one run per target organization."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from sqlalchemy import ColumnElement, Table, and_, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.server.access import Scope, require, task_filter
from vfed.server.api.blobs import readable_blob
from vfed.server.api.common import (
    caller,
    equal_filters,
    json_response,
    page_of,
    paginate,
    path_id,
    read_json,
    read_query,
    session,
)
from vfed.server.auth import Principal
from vfed.server.errors import ApiError, forbidden, not_found
from vfed.server.models import (
    TERMINAL,
    Node,
    Run,
    RunStatus,
    Task,
    TaskStatus,
    collaboration_members,
    derive_task_status,
    utcnow,
)
from vfed.server.schemas import TaskIn, TaskOut, TaskQuery
from vfed.server.state import DOORBELL

TASKS: Table = Task.__table__  # type: ignore[assignment]
RUNS: Table = Run.__table__  # type: ignore[assignment]


def out(t: Task, org_ids: list[int]) -> TaskOut:
    """The task as the API shows it."""
    return TaskOut(
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
        status=t.status,
        created_at=t.created_at,
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
    """Re-derive a task's status from its runs (kept on the row so lists can filter on it)."""
    statuses = list((await s.execute(select(Run.status).where(Run.task_id == task_id))).scalars())
    await s.execute(update(Task).where(Task.id == task_id).values(status=derive_task_status(statuses)))


@dataclass(frozen=True)
class _Collab:
    id: int
    members: frozenset[int]


async def _collab(s: AsyncSession, collab_id: int) -> _Collab:
    """The collaboration's member ids in one query (none: it does not exist, or nobody could use it)."""
    rows = await s.execute(
        select(collaboration_members.c.organization_id).where(
            collaboration_members.c.collaboration_id == collab_id
        )
    )
    return _Collab(collab_id, frozenset(rows.scalars()))


async def _context(s: AsyncSession, p: Principal, body: TaskIn) -> tuple[_Collab, Task | None]:
    """The collaboration and parent a new task belongs to, checked against the caller."""
    if p.kind == "run":
        if body.parent_id not in (None, p.task_id) or body.collaboration_id not in (None, p.collaboration_id):
            raise forbidden("a run token creates subtasks of its own task, in its own collaboration")
        assert p.collaboration_id is not None
        return await _collab(s, p.collaboration_id), await s.get(Task, p.task_id)
    scope = require(p, "task", "create")
    if body.collaboration_id is None:
        raise ApiError(422, "validation-error", "collaboration_id: required")
    collab = await _collab(s, body.collaboration_id)
    if not collab.members or (scope < Scope.GLOBAL and p.organization_id not in collab.members):
        raise not_found("collaboration", body.collaboration_id)
    parent = None
    if body.parent_id is not None:
        parent = (
            await s.execute(select(Task).where(Task.id == body.parent_id, task_filter(p, Scope.ORGANIZATION)))
        ).scalar_one_or_none()
        if parent is None or parent.collaboration_id != collab.id:
            raise not_found("task", body.parent_id)
    return collab, parent


async def _check_targets(s: AsyncSession, p: Principal, collab: _Collab, body: TaskIn) -> None:
    members = collab.members
    ids = [o.id for o in body.organizations]
    if len(set(ids)) != len(ids):
        raise ApiError(422, "validation-error", "organizations: an organization is listed twice")
    if not set(ids) <= members:
        raise ApiError(
            422, "validation-error", f"organizations: {sorted(set(ids) - members)} not in the collaboration"
        )
    for blob_id in {o.input_blob_id for o in body.organizations if o.input_blob_id}:
        if await readable_blob(s, p, blob_id) is None:
            raise ApiError(422, "validation-error", f"input_blob_id: unknown blob {blob_id}")


async def create_task(request: web.Request) -> web.Response:
    """A task, one pending run per target organization, and a doorbell for each target node."""
    body = await read_json(request, TaskIn)
    async with session(request) as s:
        p = await caller(request, s)
        collab, parent = await _context(s, p, body)
        await _check_targets(s, p, collab, body)
        digest = body.image_digest or (body.image.split("@", 1)[1] if "@" in body.image else None)
        task = Task(  # not added to the session: two Core INSERTs cost less than the ORM's unit of work
            collaboration_id=collab.id,
            initiator_organization_id=p.organization_id,
            initiator_user_id=p.user_id,
            initiator_run_id=p.run_id,
            image=body.image,
            image_digest=digest,
            name=body.name,
            description=body.description,
            datasets=body.datasets,
            parent_id=parent.id if parent else None,
            job_id=job_of(parent) if parent else None,  # NULL: a top-level task is its own job
            status=TaskStatus.PENDING,
            created_at=utcnow(),
        )
        values = {c.key: getattr(task, c.key) for c in TASKS.columns if c.key != "id"}
        task.id = (await s.execute(insert(TASKS).values(values).returning(TASKS.c.id))).scalar_one()
        rows = [
            {
                "task_id": task.id,
                "job_id": job_of(task),
                "organization_id": o.id,
                "input_blob_id": o.input_blob_id,
            }
            for o in body.organizations
        ]
        inserted = await s.execute(insert(RUNS).returning(RUNS.c.id, RUNS.c.organization_id), rows)
        runs = sorted(
            (RunRef(run_id, task.id, org_id, None) for run_id, org_id in inserted), key=lambda r: r.id
        )
        targets = await ring_targets(request, s, collab.id, runs)  # same connection, before it is released
        await s.commit()
        publish(request, targets, "run-created")
    return json_response(out(task, [r.organization_id for r in runs]), 201)


@dataclass(frozen=True)
class RunRef:
    """What the doorbell needs to know of a run."""

    id: int
    task_id: int
    organization_id: int
    node_id: int | None


def job_of(task: Task) -> int:
    """A top-level task is its own job; subtasks carry their job id."""
    return task.job_id if task.job_id is not None else task.id


def in_job(job_id: int) -> ColumnElement[bool]:
    """Tasks of job `job_id`."""
    return or_(Task.job_id == job_id, and_(Task.job_id.is_(None), Task.id == job_id))


async def ring(request: web.Request, s: AsyncSession, collab_id: int, runs: list[RunRef], event: str) -> None:
    """Doorbell every node that may act on these runs (the claimer, or all nodes of the organization)."""
    publish(request, await ring_targets(request, s, collab_id, runs), event)


def publish(request: web.Request, targets: list[tuple[int, RunRef]], event: str) -> None:
    """Queue one doorbell per (node, run); call only once the runs are committed."""
    doorbell = request.app[DOORBELL]
    for node_id, r in targets:
        doorbell.ring(node_id, event, r.id, r.task_id)


async def ring_targets(
    request: web.Request, s: AsyncSession, collab_id: int, runs: list[RunRef]
) -> list[tuple[int, RunRef]]:
    """(node, run) pairs to ring: the claimer, or all nodes of the organization; none without a broker."""
    if request.app[DOORBELL].address is None:
        return []
    orgs = {r.organization_id for r in runs if r.node_id is None}
    nodes: dict[int, list[int]] = {}
    if orgs:
        rows = await s.execute(
            select(Node.organization_id, Node.id).where(
                Node.collaboration_id == collab_id, Node.organization_id.in_(orgs)
            )
        )
        for org_id, node_id in rows:
            nodes.setdefault(org_id, []).append(node_id)
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
        killed = select(Run.id, Run.task_id, Run.organization_id, Run.node_id).where(
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
