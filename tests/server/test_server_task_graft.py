"""A task joins its parent's job, and on every node the runs of one job mount the same job folder: so only the
organization that initiated the parent, or a run token of the parent's own task, may name it as parent.

Organization A's researcher creates a task that targets A and B; B can see it (it targets B), but B's users
must not hang a task of their own under it. On SQLite and on PostgreSQL, through the real app.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func, select
from vserver_testkit import JWT_SECRET, World, client, db_url, world

from vfed.server.config import Settings
from vfed.server.models import Blob, Task
from vfed.server.state import SESSIONS

__all__ = ["client", "db_url", "world"]


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(data_dir=tmp_path, database_url=db_url, jwt_secret=JWT_SECRET, max_blob_bytes=1 << 20)


async def _counts(world: World) -> tuple[int, int]:
    """(task rows, blob rows): what a refused request must leave unchanged."""
    async with world.client.app[SESSIONS]() as s:
        tasks = (await s.execute(select(func.count()).select_from(Task))).scalar_one()
        blobs = (await s.execute(select(func.count()).select_from(Blob))).scalar_one()
    return int(tasks), int(blobs)


def _body(world: World, parent: dict[str, Any], org: str, blob: str | None = None) -> dict[str, Any]:
    target: dict[str, Any] = {"id": world.orgs[org]}
    if blob is not None:
        target["input_blob_id"] = blob
    return {
        "collaboration_id": world.collabs["ab"],
        "image": "alpine:3",
        "organizations": [target],
        "parent_id": parent["id"],
    }


async def test_another_organization_cannot_graft_onto_a_job(world: World) -> None:
    parent = await world.task("a_res", "ab", ["A", "B"])
    # B sees the parent (it targets B): the refusal is about who initiated it, not about visibility.
    status, seen = await world.call("b_res", "GET", f"/tasks/{parent['id']}")
    assert status == 200 and seen["id"] == parent["id"]
    for who in ("b_res", "b_admin"):
        blob = await world.upload(who, b"sealed-for-B")
        before = await _counts(world)
        status, body = await world.call(who, "POST", "/tasks", json=_body(world, parent, "B", blob))
        assert status == 403, body
        assert body["error"] == "forbidden" and "initiated by another organization" in body["detail"]
        assert await _counts(world) == before
    # The one-request form: refused too, and the input it brought is not kept.
    form = aiohttp.FormData()
    form.add_field("task", json.dumps(_body(world, parent, "B")), content_type="application/json")
    form.add_field("input", b"sealed-for-B", content_type="application/octet-stream", filename="input")
    before = await _counts(world)
    status, body = await world.call("b_res", "POST", "/tasks", data=form)
    assert status == 403 and body["error"] == "forbidden", body
    assert await _counts(world) == before
    _, job = await world.call("a_res", "GET", f"/tasks?job_id={parent['job_id']}")
    assert [t["id"] for t in job["data"]] == [parent["id"]]


async def test_the_initiating_organization_and_the_jobs_run_token_still_may(world: World) -> None:
    parent = await world.task("a_res", "ab", ["A", "B"])
    # another user of the initiating organization
    child = await world.task("a_res2", "ab", ["B"], parent_id=parent["id"])
    assert child["parent_id"] == parent["id"] and child["job_id"] == parent["job_id"]
    # a run token of the parent's own task, held by B's node for B's run of it (the proxy's subtasks)
    _, runs = await world.call("b_node", "GET", f"/runs?task_id={parent['id']}")
    (run,) = [r for r in runs["data"] if r["organization_id"] == world.orgs["B"]]
    status, _ = await world.call("b_node", "POST", f"/runs/{run['id']}/claim")
    assert status == 200
    status, token = await world.call("b_node", "POST", f"/runs/{run['id']}/token")
    assert status == 200
    world._tokens["run"] = token["token"]
    blob = await world.upload("run", b"sub-input")
    sub = {"image": "alpine:3", "organizations": [{"id": world.orgs["A"], "input_blob_id": blob}]}
    status, subtask = await world.call("run", "POST", "/tasks", json={**sub, "parent_id": parent["id"]})
    assert status == 201, subtask
    assert subtask["parent_id"] == parent["id"] and subtask["job_id"] == parent["job_id"]
    assert subtask["initiator_organization_id"] == world.orgs["B"]
    # ... but not of another task, even one its organization could see
    other = await world.task("a_res", "ab", ["A", "B"])
    status, body = await world.call("run", "POST", "/tasks", json={**sub, "parent_id": other["id"]})
    assert status == 403 and body["error"] == "forbidden", body
    _, job = await world.call("a_res", "GET", f"/tasks?job_id={parent['job_id']}")
    assert [t["id"] for t in job["data"]] == [parent["id"], child["id"], subtask["id"]]
