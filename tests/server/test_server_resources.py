"""The server answers with the shared resource models of `vfed.common.api.resources`: what it serves parses
into them and dumps back to the very same JSON (what `vfed ... --format json` prints), and its OpenAPI
document names them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from vserver_testkit import World, client, settings, world

from vfed.common.api import resources as res
from vfed.server import schemas
from vfed.server.openapi import build_openapi
from vfed.server.routes import OPS

__all__ = ["client", "settings", "world"]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite only: the shape of an answer does not depend on the database (test_server_api runs both)."""
    return f"sqlite+aiosqlite:///{tmp_path / 'vserver.sqlite'}"


def same_json(model: type[BaseModel], served: dict[str, Any]) -> BaseModel:
    """Parse `served` with `model`; its dump is the served JSON, key for key and in the same order (a page's
    envelope in any order, each of its items exactly)."""
    parsed = model.model_validate(served)
    if isinstance(parsed, res.Page):
        envelope = parsed.model_dump(mode="json")
        assert json.dumps(envelope, sort_keys=True) == json.dumps(served, sort_keys=True)
        assert served["data"], "an empty page proves nothing"
        for item, raw in zip(parsed.data, served["data"], strict=True):  # type: ignore[attr-defined]
            assert json.dumps(item.model_dump(mode="json")) == json.dumps(raw)
    else:
        assert json.dumps(parsed.model_dump(mode="json")) == json.dumps(served)
    return parsed


async def test_every_resource_round_trips(world: World) -> None:
    task = await world.task("a_res", "ab", ["A", "B"], name="mean", datasets=["default"])
    parsed_task = same_json(res.Task, task)
    assert isinstance(parsed_task, res.Task) and parsed_task.status == "pending" and not parsed_task.finished
    _, runs = await world.call("a_node", "GET", f"/runs?task_id={task['id']}")
    page = same_json(res.RunPage, runs)
    assert isinstance(page, res.RunPage) and page.total == 1
    run_id = runs["data"][0]["id"]
    status, claimed = await world.call("a_node", "POST", f"/runs/{run_id}/claim")
    assert status == 200
    claim = same_json(res.Claim, claimed)
    assert isinstance(claim, res.Claim) and claim.task.id == task["id"] and claim.run_token.token
    blob = await world.call("a_node", "POST", "/blobs", data=b"result")
    assert blob[0] == 201 and same_json(res.Blob, blob[1])
    patch = {"status": "completed", "exit_code": 0, "result_blob_id": blob[1]["id"]}
    _, done = await world.call("a_node", "PATCH", f"/runs/{run_id}", json=patch)
    parsed_run = same_json(res.Run, done)
    assert isinstance(parsed_run, res.Run) and parsed_run.finished and parsed_run.finished_at is not None
    reads: list[tuple[str, type[BaseModel]]] = [
        (f"/tasks/{task['id']}", res.Task),
        ("/tasks", res.TaskPage),
        (f"/runs/{run_id}", res.Run),
        (f"/tasks/{task['id']}/wait?timeout_s=0", res.TaskWait),
        (f"/organizations/{world.orgs['A']}", res.Organization),
        ("/organizations", res.OrganizationPage),
        (f"/collaborations/{world.collabs['ab']}", res.Collaboration),
        ("/collaborations", res.CollaborationPage),
        (f"/nodes/{world.nodes['a_node']}", res.Node),
        ("/nodes", res.NodePage),
    ]
    for path, model in reads:
        status, body = await world.call("a_res", "GET", path)
        assert status == 200, (path, body)
        same_json(model, body)


def test_reading_is_forward_compatible() -> None:
    """A field a newer server adds is ignored; one an older server leaves out takes its default."""
    run = res.Run.model_validate(
        {"id": 1, "task_id": 2, "job_id": 2, "organization_id": 3, "status": "active", "added_later": [1]}
    )
    assert run.node_id is None and run.links == {} and "added_later" not in run.model_dump()
    old = {"id": 2, "collaboration_id": 1, "image": "x", "job_id": 2, "status": "failed"}
    task = res.Task.model_validate(old)
    assert task.finished and task.description == "" and task.organization_ids == []


def test_openapi_names_the_shared_models() -> None:
    schemas_doc = build_openapi()["components"]["schemas"]
    shared = [
        res.Organization,
        res.Collaboration,
        res.Node,
        res.Blob,
        res.Task,
        res.Run,
        res.RunState,
        res.TaskWait,
        res.Claim,
        res.RunToken,
        res.OrganizationPage,
        res.TaskPage,
        res.RunPage,
    ]
    for model in shared:
        component = schemas_doc[model.__name__]
        # every declared field is always emitted, so the document says each is required
        assert set(component["properties"]) == set(model.model_fields), model.__name__
        assert set(component["required"]) == set(model.model_fields), model.__name__
    served = {op.response for op in OPS if op.response is not None}
    assert set(shared) - {res.RunState} <= served
    # the server keeps no response model of its own for a resource the shared module defines
    assert not [m.__name__ for m in served if m.__module__ == schemas.__name__ and m.__name__ in res.__all__]
    for name in ("TaskOut", "RunOut", "OrganizationOut", "NodeOut", "BlobOut", "CollaborationOut"):
        assert name not in schemas_doc and not hasattr(schemas, name)
