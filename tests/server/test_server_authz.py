"""Authorization matrix: every role x every endpoint x own/other organization, and zero cross-org leaks.

Organizations A and C share nothing; B shares a collaboration with A. Every attacker from A must see
nothing of C and nothing of B's private objects; every attacker from C nothing of A or B. Denials may be
403 or 404, never a 2xx, and nothing may change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from vserver_testkit import World, client, db_url, settings, world

from vfed.common.crypto.keys import OrgKey

__all__ = ["client", "db_url", "settings", "world"]


@dataclass
class Objects:
    """One organization's objects: a finished task/run (with result), a running one, blobs."""

    org: int
    collab: int
    user: int
    node: int
    task: int
    run: int
    input_blob: str
    result_blob: str
    live_task: int
    live_run: int


async def _org_objects(w: World, o: str, collab: str, res: str, node: str) -> Objects:
    done = await w.task(res, collab, [o])
    _, runs = await w.call(node, "GET", f"/runs?task_id={done['id']}")
    run = runs["data"][0]
    await w.call(node, "POST", f"/runs/{run['id']}/claim")
    result = await w.upload(node, b"result of " + o.encode())
    await w.call(node, "PATCH", f"/runs/{run['id']}", json={"status": "completed", "result_blob_id": result})
    live = await w.task(res, collab, [o])
    _, live_runs = await w.call(node, "GET", f"/runs?task_id={live['id']}")
    live_run = live_runs["data"][0]["id"]
    await w.call(node, "POST", f"/runs/{live_run}/claim")
    return Objects(
        w.orgs[o],
        w.collabs[collab],
        w.users[res],
        w.nodes[node],
        done["id"],
        run["id"],
        run["input_blob_id"],
        result,
        live["id"],
        live_run,
    )


async def _scene(w: World) -> dict[str, Objects]:
    scene = {
        "A": await _org_objects(w, "A", "ab", "a_res", "a_node"),
        "C": await _org_objects(w, "C", "cx", "c_res", "c_node"),
        "B": await _org_objects(w, "B", "ab", "b_res", "b_node"),
    }
    for side, node in (("A", "a_node"), ("C", "c_node")):
        _, tok = await w.call(node, "POST", f"/runs/{scene[side].live_run}/token")
        w._tokens[f"{side.lower()}_run"] = tok["token"]
    return scene


ATTACKERS = ["a_admin", "a_res", "a_view", "a_node", "a_run", "c_admin", "c_res", "c_view", "c_node", "c_run"]


def _reads(v: Objects, w: World) -> list[str]:
    return [
        f"/organizations/{v.org}",
        f"/organizations/{v.org}/keys",
        f"/collaborations/{v.collab}",
        f"/nodes/{v.node}",
        f"/users/{v.user}",
        f"/tasks/{v.task}",
        f"/tasks/{v.live_task}",
        f"/tasks/{v.task}/wait?timeout_s=0",
        f"/tasks/{v.live_task}/wait?timeout_s=0",
        f"/runs/{v.run}",
        f"/runs/{v.live_run}",
        f"/blobs/{v.input_blob}",
        f"/blobs/{v.result_blob}",
    ]


def _writes(v: Objects) -> list[tuple[str, str, Any]]:
    key = OrgKey.generate().public.to_text()
    return [
        ("PUT", f"/organizations/{v.org}/public_key", {"public_key": key}),
        ("POST", f"/tasks/{v.live_task}/kill", None),
        ("POST", f"/runs/{v.live_run}/claim", None),
        ("PATCH", f"/runs/{v.live_run}", {"status": "failed"}),
        ("POST", f"/runs/{v.live_run}/token", None),
        ("POST", "/nodes", {"collaboration_id": v.collab, "organization_id": v.org}),
        ("POST", "/users", {"username": "intruder", "password": "long enough", "organization_id": v.org}),
        ("PATCH", f"/users/{v.user}", {"password": "hijacked!!"}),
        ("POST", "/tasks", {"collaboration_id": v.collab, "image": "x", "organizations": [{"id": v.org}]}),
        ("PATCH", f"/collaborations/{v.collab}", {"name": "renamed"}),
        ("POST", "/organizations", {"name": "rogue"}),
        ("POST", "/collaborations", {"name": "rogue", "organization_ids": [v.org]}),
    ]


def _multipart_task(v: Objects) -> aiohttp.FormData:
    """The one-request form of task creation, aimed at the victim's collaboration and organization."""
    form = aiohttp.FormData()
    fields = {"collaboration_id": v.collab, "image": "x", "organizations": [{"id": v.org}]}
    form.add_field("task", json.dumps(fields), content_type="application/json")
    form.add_field("input", b"sealed", content_type="application/octet-stream", filename="input")
    return form


def _victims(attacker: str, scene: dict[str, Objects]) -> list[Objects]:
    return [scene["C"]] if attacker.startswith("a_") else [scene["A"], scene["B"]]


def _mentions(obj: Any, v: Objects) -> bool:
    """True when a listed object belongs to or points at the victim organization."""
    if not isinstance(obj, dict):
        return False
    org_fields = ("organization_id", "initiator_organization_id")
    if any(obj.get(f) == v.org for f in org_fields) or v.org in obj.get("organization_ids", []):
        return True
    return obj.get("id") in (v.task, v.live_task) and "job_id" in obj


@pytest.mark.parametrize("attacker", ATTACKERS)
async def test_no_cross_organization_reads_or_writes(world: World, attacker: str) -> None:
    scene = await _scene(world)
    for v in _victims(attacker, scene):
        for path in _reads(v, world):
            status, body = await world.call(attacker, "GET", path)
            assert status in (403, 404), (attacker, path, status, body)
        for method, path, payload in _writes(v):
            status, body = await world.call(attacker, method, path, json=payload)
            assert status in (401, 403, 404, 409, 422), (attacker, method, path, status, body)
        status, body = await world.call(attacker, "POST", "/tasks", data=_multipart_task(v))
        assert status in (401, 403, 404, 422), (attacker, "multipart POST /tasks", status, body)
    # nothing changed for the victims
    for v in _victims(attacker, scene):
        _, org = await world.call("root", "GET", f"/organizations/{v.org}")
        assert org["public_key"] is None
        _, live = await world.call("root", "GET", f"/runs/{v.live_run}")
        assert live["status"] == "initializing"
        _, users = await world.call("root", "GET", f"/users?organization_id={v.org}")
        assert "intruder" not in {u["username"] for u in users["data"]}
        _, collab = await world.call("root", "GET", f"/collaborations/{v.collab}")
        assert collab["name"] != "renamed"
    _, tasks = await world.call("root", "GET", "/tasks")
    assert tasks["total"] == 6  # the scene's two tasks per organization: no intruder's, in either form
    _, orgs = await world.call("root", "GET", "/organizations?name=rogue")
    assert orgs["total"] == 0


LISTS = ["/organizations", "/collaborations", "/nodes", "/users", "/tasks", "/runs", "/roles"]


@pytest.mark.parametrize("attacker", ATTACKERS)
async def test_lists_never_leak(world: World, attacker: str) -> None:
    scene = await _scene(world)
    for v in _victims(attacker, scene):
        filters = [
            f"organization_id={v.org}",
            f"collaboration_id={v.collab}",
            f"task_id={v.task}",
            f"job_id={v.task}",
            f"node_id={v.node}",
            "per_page=500",
        ]
        for path in LISTS:
            for q in filters:
                status, body = await world.call(attacker, "GET", f"{path}?{q}")
                if status != 200:
                    assert status in (403, 422), (attacker, path, q, status)
                    continue
                leaked = [o for o in body["data"] if _mentions(o, v)]
                assert not leaked, (attacker, path, q, leaked)


OWN_READS = {
    "a_admin": ["org", "collab", "node", "user", "task", "wait", "run", "input", "result"],
    "a_res": ["org", "collab", "node", "task", "wait", "run", "input", "result"],
    "a_view": ["org", "collab", "node", "task", "wait", "run", "input", "result"],
    "a_node": ["org", "collab", "task", "wait", "run", "input", "result"],
}


@pytest.mark.parametrize("who", sorted(OWN_READS))
async def test_own_organization_is_visible(world: World, who: str) -> None:
    """The matrix's other half: the denials above are not because nothing is readable at all."""
    mine = (await _scene(world))["A"]
    paths = {
        "org": f"/organizations/{mine.org}",
        "collab": f"/collaborations/{mine.collab}",
        "node": f"/nodes/{mine.node}",
        "user": f"/users/{mine.user}",
        "task": f"/tasks/{mine.task}",
        "wait": f"/tasks/{mine.task}/wait?timeout_s=0",
        "run": f"/runs/{mine.run}",
        "input": f"/blobs/{mine.input_blob}",
        "result": f"/blobs/{mine.result_blob}",
    }
    for key in OWN_READS[who]:
        status, body = await world.call(who, "GET", paths[key])
        assert status == 200, (who, key, status, body)
    # shared collaboration: A sees B as an organization (to encrypt for it), not B's private objects
    b = await _scene_b(world)
    status, _ = await world.call(who, "GET", f"/organizations/{b}")
    assert status == 200


async def _scene_b(world: World) -> int:
    return world.orgs["B"]


async def test_researcher_cannot_see_other_users_or_kill_others_tasks(world: World) -> None:
    theirs = await world.task("a_res2", "ab", ["A"])
    status, _ = await world.call("a_res", "GET", f"/users/{world.users['a_res2']}")
    assert status == 404
    status, _ = await world.call("a_res", "POST", f"/tasks/{theirs['id']}/kill")
    assert status == 403
    status, _ = await world.call("a_admin", "POST", f"/tasks/{theirs['id']}/kill")
    assert status == 200
    status, _ = await world.call(
        "a_view",
        "POST",
        "/tasks",
        json={
            "collaboration_id": world.collabs["ab"],
            "image": "x",
            "organizations": [{"id": world.orgs["A"]}],
        },
    )
    assert status == 403
