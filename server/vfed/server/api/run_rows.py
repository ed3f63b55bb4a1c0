"""Statements of the run paths a node takes on every task (claim, PATCH), built once as Core SQL.

A claim used to load the run, update it, re-read every run of its task for the task's status, commit and
then load run, task, target organizations and input again: eight round trips, each through the ORM. Here the
conditional UPDATE hands the new row back (RETURNING), and one statement per table brings what else the
answer needs. The authorization filter is the node's own `run_filter`, with the organization and
collaboration bound at execution (`node_params`), so no statement is rebuilt per request.
"""

from __future__ import annotations

import functools
from dataclasses import fields
from typing import Any

from sqlalchemy import ColumnElement, Row, Table, Update, bindparam, func, or_, select, update
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from vfed.common.api.statuses import TERMINAL, RunStatus, task_status
from vfed.server.access import NODE_RUNS
from vfed.server.api.tasks import NewTask
from vfed.server.auth import Principal
from vfed.server.models import Blob, Run, Task
from vfed.server.task_events import mark_changed

RUNS: Table = Run.__table__  # type: ignore[assignment]
TASKS: Table = Task.__table__  # type: ignore[assignment]
BLOBS: Table = Blob.__table__  # type: ignore[assignment]
_R = RUNS.c

# pending -> initializing for exactly one node, and only for a run the node may see
CLAIM = (
    update(RUNS)
    .where(_R.id == bindparam("run"), _R.status == RunStatus.PENDING, _R.node_id.is_(None), NODE_RUNS)
    .values(
        status=RunStatus.INITIALIZING,
        node_id=bindparam("node"),
        claimed_at=bindparam("now", type_=_R.claimed_at.type),
    )
    .returning(*RUNS.c)
)
_TASK_COLUMNS = [TASKS.c[f.name] for f in fields(NewTask)]
_INPUT = select(BLOBS.c.data).where(BLOBS.c.id == bindparam("blob")).scalar_subquery()
# the task row is locked (PostgreSQL; SQLite holds the database's write lock already) before its runs are
# read, so two nodes finishing runs of one task at once cannot both derive the status from a stale view
_TASK = select(*_TASK_COLUMNS).where(TASKS.c.id == bindparam("task")).with_for_update(of=TASKS)
_TASK_AND_INPUT = (
    select(*_TASK_COLUMNS, _INPUT).where(TASKS.c.id == bindparam("task")).with_for_update(of=TASKS)
)
# a task's status depends only on which statuses its runs have: a few rows, not one per run (a task to 1,000
# organizations has its runs claimed and finished 2,000 times, each re-deriving the status)
_STATUSES_OF = select(_R.status).where(_R.task_id == bindparam("task")).distinct()
_ORGS_OF = select(_R.organization_id).where(_R.task_id == bindparam("task")).order_by(_R.id)
# PostgreSQL: the target organizations as one array, decoded by the driver instead of row by row
_ORGS_OF_PG = select(func.array_agg(aggregate_order_by(_R.organization_id, _R.id))).where(
    _R.task_id == bindparam("task")
)
_SET_STATUS = update(TASKS).where(TASKS.c.id == bindparam("task")).values(status=bindparam("derived"))
_BLOB_OWNER = select(BLOBS.c.owner_node_id).where(BLOBS.c.id == bindparam("blob"))


def node_params(p: Principal, **params: Any) -> dict[str, Any]:
    """Execution parameters of a statement that uses NODE_RUNS, for node `p`."""
    return {"node_org": p.organization_id, "node_collab": p.collaboration_id, **params}


async def claim(conn: AsyncConnection, p: Principal, run_id: int, now: Any) -> Row[Any] | None:
    """The claimed run's new row, or None when the run is not this node's to claim (or no longer pending)."""
    params = node_params(p, run=run_id, node=p.node_id, now=now)
    return (await conn.execute(CLAIM, params)).first()


async def settle(
    s: AsyncSession,
    conn: AsyncConnection,
    task_id: int,
    input_blob_id: str | None = None,
    *,
    orgs: bool = True,
) -> tuple[NewTask, list[int], bytes | None]:
    """After a change to the task's runs: re-derive the task's status (written only when it changed), and
    return the task, its target organizations (empty unless `orgs`) and, when asked, the data of a row-kept
    input blob."""
    stmt, params = (_TASK_AND_INPUT, {"blob": input_blob_id}) if input_blob_id else (_TASK, {})
    row = (await conn.execute(stmt, {"task": task_id, **params})).one()
    statuses = (await conn.execute(_STATUSES_OF, {"task": task_id})).scalars().all()
    derived = task_status(list(statuses))
    values = dict(zip((f.name for f in fields(NewTask)), row, strict=False))
    if derived != values["status"]:
        await conn.execute(_SET_STATUS, {"task": task_id, "derived": derived})
        values["status"] = derived
    mark_changed(s, task_id)  # the commit wakes whoever waits on the task
    data = row[-1] if input_blob_id else None
    return NewTask(**values), await _orgs_of(conn, task_id) if orgs else [], data


async def _orgs_of(conn: AsyncConnection, task_id: int) -> list[int]:
    """The task's target organizations, in the order of their runs."""
    if conn.dialect.name == "postgresql":
        return list((await conn.execute(_ORGS_OF_PG, {"task": task_id})).scalar_one() or [])
    return list((await conn.execute(_ORGS_OF, {"task": task_id})).scalars())


async def blob_owner_is(conn: AsyncConnection, blob_id: str, node_id: int | None) -> bool:
    """True when blob `blob_id` exists and node `node_id` uploaded it (a run's result must be its own)."""
    owner = (await conn.execute(_BLOB_OWNER, {"blob": blob_id})).first()
    return owner is not None and owner[0] == node_id


@functools.cache
def update_own_run(columns: tuple[str, ...], log_only: bool) -> Update:
    """UPDATE of a run by the node that claimed it, unless final (a killed run still takes a sealed-log-only
    update), RETURNING the new row; one statement per set of columns, each value bound as `v_<column>`.
    `started_at` keeps the first value it was given."""
    still_open: ColumnElement[bool] = _R.status.not_in(list(TERMINAL))
    if log_only:
        still_open = or_(still_open, _R.status == RunStatus.KILLED)
    values: dict[str, Any] = {c: bindparam(f"v_{c}", type_=_R[c].type) for c in columns}
    if "started_at" in values:
        values["started_at"] = func.coalesce(_R.started_at, values["started_at"])
    where = [_R.id == bindparam("run"), _R.node_id == bindparam("node"), NODE_RUNS, still_open]
    return update(RUNS).where(*where).values(**values).returning(*RUNS.c)


async def update_run(
    conn: AsyncConnection, p: Principal, run_id: int, values: dict[str, Any]
) -> Row[Any] | None:
    """The run's new row, or None when it is not this node's run or already final."""
    stmt = update_own_run(tuple(sorted(values)), set(values) == {"sealed_log"})
    params = node_params(p, run=run_id, node=p.node_id, **{f"v_{k}": v for k, v in values.items()})
    return (await conn.execute(stmt, params)).first()
