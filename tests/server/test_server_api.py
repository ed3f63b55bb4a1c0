"""API behaviour through aiohttp's test client, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from s3_testkit import both_backends
from vserver_testkit import World, client, db_url, scrape_metrics, settings, world

from vfed.common import multipart
from vfed.common.crypto.keys import OrgKey

__all__ = ["client", "db_url", "settings", "world"]


async def test_health_openapi_docs_metrics(client: Any) -> None:
    r = await client.get("/api/v1/health")
    assert r.status == 200 and (await r.json())["status"] == "ok"
    doc = await (await client.get("/api/v1/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    assert "post" in doc["paths"]["/api/v1/runs/{id}/claim"]
    assert "TaskIn" in doc["components"]["schemas"]
    page = await (await client.get("/api/v1/docs")).text()
    assert "/api/v1/tasks/{id}/kill" in page and "http" not in page.split("<table>")[1]
    metrics = await scrape_metrics(client)
    assert 'vserver_requests_total{method="GET",route="/api/v1/health",status="200"} 1.0' in metrics
    assert 'vserver_runs{status="pending"}' in metrics


async def test_every_error_is_json(client: Any, world: World) -> None:
    cases = [
        await client.post("/api/v1/token/user", data=b"{not json"),
        await client.post("/api/v1/token/user", data=b""),
        await client.post("/api/v1/token/user", json={"username": "x"}),
        await client.post("/api/v1/token/user", json={"username": "x", "password": "y", "extra": 1}),
        await client.get("/api/v1/nowhere"),
        await client.delete("/api/v1/health"),
        await client.get("/api/v1/tasks"),
        await client.get("/api/v1/tasks", headers={"Authorization": "Bearer garbage"}),
        await client.get("/api/v1/tasks?page=0", headers=await world.h("a_res")),
        await client.get("/api/v1/tasks?status=nope", headers=await world.h("a_res")),
        await client.get("/api/v1/tasks/99999999999", headers=await world.h("a_res")),
    ]
    statuses = [r.status for r in cases]
    assert statuses == [400, 400, 422, 422, 404, 405, 401, 401, 422, 422, 404]
    for r in cases:
        body = await r.json()
        assert set(body) == {"error", "detail"} and body["detail"]


async def test_login_refresh_and_node_login(client: Any, world: World) -> None:
    r = await client.post(
        "/api/v1/token/user", json={"username": "a_res", "password": "correct horse battery"}
    )
    body = await r.json()
    assert body["user_id"] == world.users["a_res"] and body["organization_id"] == world.orgs["A"]
    r = await client.post("/api/v1/token/refresh", json={"refresh_token": body["refresh_token"]})
    assert r.status == 200
    fresh = await r.json()
    r = await client.get(
        f"/api/v1/users/{world.users['a_res']}",
        headers={"Authorization": f"Bearer {fresh['access_token']}"},
    )
    assert r.status == 200 and (await r.json())["username"] == "a_res"
    # a refresh token is not an access token, and vice versa
    r = await client.get("/api/v1/tasks", headers={"Authorization": f"Bearer {body['refresh_token']}"})
    assert r.status == 401
    r = await client.post("/api/v1/token/refresh", json={"refresh_token": body["access_token"]})
    assert r.status == 401
    r = await client.post("/api/v1/token/node", json={"api_key": world.api_keys["a_node"]})
    node = await r.json()
    assert node["node_id"] == world.nodes["a_node"] and node["collaboration_id"] == world.collabs["ab"]
    key_id = world.api_keys["a_node"].split(".")[0]
    for bad in (key_id + ".wrong", "nokey.secret", "no-dot-at-all"):
        r = await client.post("/api/v1/token/node", json={"api_key": bad})
        assert r.status == 401 and (await r.json())["error"] == "invalid-api-key"


async def test_node_online_status_and_heartbeat(world: World) -> None:
    status, me = await world.call("a_node", "GET", "/nodes/self")
    assert status == 200 and me["status"] == "online" and me["last_seen_at"]
    status, other = await world.call("a_admin", "GET", f"/nodes/{world.nodes['a_node2']}")
    assert other["status"] == "offline" and other["last_seen_at"] is None
    status, _beat = await world.call("a_node2", "POST", "/nodes/heartbeat")
    assert status == 200
    status, other = await world.call("a_admin", "GET", f"/nodes/{world.nodes['a_node2']}")
    assert other["status"] == "online"
    status, _ = await world.call("a_res", "POST", "/nodes/heartbeat")
    assert status == 403


async def test_login_throttles_without_locking(client: Any, world: World) -> None:
    async def attempt(password: str) -> Any:
        return await client.post("/api/v1/token/user", json={"username": "b_res", "password": password})

    codes = [(await attempt("wrong")).status for _ in range(3)]
    assert codes == [401, 401, 401]
    r = await attempt("correct horse battery")  # even the right password waits during the back-off
    assert r.status == 429 and int(r.headers["Retry-After"]) > 0
    assert (await r.json())["error"] == "too-many-attempts"
    # no lockout exists any more: tests/server/test_server_security_auth.py covers addresses and delays


async def test_public_key_validation_and_history(world: World) -> None:
    first, second = OrgKey.generate().public, OrgKey.generate().public
    path = f"/organizations/{world.orgs['A']}/public_key"
    status, body = await world.call("a_admin", "PUT", path, json={"public_key": "vfedpk1:garbage"})
    assert status == 422 and body["error"] == "invalid-public-key"
    status, body = await world.call("a_admin", "PUT", path, json={"public_key": first.to_text()})
    assert status == 200 and body["key_id"] == first.key_id
    status, body = await world.call("a_node", "PUT", path, json={"public_key": second.to_text()})
    assert status == 200 and body["key_id"] == second.key_id
    status, hist = await world.call("a_res", "GET", f"/organizations/{world.orgs['A']}/keys")
    assert [k["key_id"] for k in hist["data"]] == [first.key_id]
    status, _ = await world.call("a_res", "PUT", path, json={"public_key": second.to_text()})
    assert status == 403
    status, _ = await world.call("b_admin", "PUT", path, json={"public_key": second.to_text()})
    assert status == 403


@both_backends
async def test_blob_roundtrip_range_and_limit(client: Any, world: World) -> None:
    data = bytes(range(256)) * 1000
    status, body = await world.call("a_res", "POST", "/blobs", data=data)
    assert status == 201 and body["size"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    r = await client.get(f"/api/v1/blobs/{body['id']}", headers=await world.h("a_res"))
    assert r.status == 200 and await r.read() == data
    headers = {**await world.h("a_res"), "Range": "bytes=1000-"}
    r = await client.get(f"/api/v1/blobs/{body['id']}", headers=headers)
    assert r.status == 206 and await r.read() == data[1000:]
    status, err = await world.call("a_res", "POST", "/blobs", data=b"x" * (1024 * 1024 + 1))
    assert status == 413 and err["error"] == "too-large"

    async def chunks() -> Any:  # no Content-Length: the limit is enforced while streaming
        for _ in range(2):
            yield b"y" * (700 * 1024)

    r = await client.post("/api/v1/blobs", data=chunks(), headers=await world.h("a_res"))
    assert r.status == 413
    status, _ = await world.call("a_view", "POST", "/blobs", data=b"x")
    assert status == 403


async def test_claim_answers_json_without_multipart_accept(world: World) -> None:
    """A node that does not ask for multipart/mixed gets plain JSON (no input inside) and downloads it."""
    task = await world.task("a_res", "ab", ["A"], name="plain")
    _, runs = await world.call("a_node", "GET", f"/runs?task_id={task['id']}")
    run = runs["data"][0]
    status, claimed = await world.call("a_node", "POST", f"/runs/{run['id']}/claim")
    assert status == 200 and claimed["task"]["id"] == task["id"] and "input" not in claimed
    r = await world.client.get(f"/api/v1/blobs/{claimed['input_blob_id']}", headers=await world.h("a_node"))
    assert r.status == 200 and await r.read() == b"sealed-A"


async def test_task_lifecycle(world: World) -> None:
    task = await world.task("a_res", "ab", ["A", "B"], name="mean", datasets=["default"])
    assert task["status"] == "pending" and task["job_id"] == task["id"]
    assert task["organization_ids"] == [world.orgs["A"], world.orgs["B"]]
    status, runs = await world.call("a_node", "GET", f"/runs?task_id={task['id']}")
    assert runs["total"] == 1  # a node sees its own organization's run only
    run = runs["data"][0]
    # A node that accepts multipart/mixed gets the claim as JSON and a small input (from its blob row) as a
    # binary part, never base64 inside the JSON.
    headers = {**await world.h("a_node"), "Accept": "multipart/mixed, application/json"}
    r = await world.client.post(f"/api/v1/runs/{run['id']}/claim", headers=headers)
    assert r.status == 200 and r.content_type == "multipart/mixed"
    parts = multipart.split(r.headers["Content-Type"], await r.read(), "mixed")
    assert [p.content_type for p in parts] == ["application/json", "application/octet-stream"]
    assert parts[1].name == "input" and parts[1].data == b"sealed-A"
    claimed = json.loads(parts[0].data)
    assert claimed["status"] == "initializing" and claimed["node_id"] == world.nodes["a_node"]
    assert "input" not in claimed
    # The claim brings the task and the run's proxy token, so the node starts the run without asking again.
    assert claimed["task"]["id"] == task["id"] and claimed["task"]["datasets"] == ["default"]
    world._tokens["claimed-run"] = claimed["run_token"]["token"]
    status, own = await world.call("claimed-run", "GET", f"/tasks/{task['id']}")
    assert status == 200 and own["image"] == task["image"]
    status, again = await world.call("a_node2", "POST", f"/runs/{run['id']}/claim")
    assert status == 409 and again["error"] == "already-claimed"
    status, _ = await world.call("a_node2", "PATCH", f"/runs/{run['id']}", json={"status": "active"})
    assert status == 403
    status, active = await world.call("a_node", "PATCH", f"/runs/{run['id']}", json={"status": "active"})
    assert active["started_at"] is not None
    status, t = await world.call("a_res", "GET", f"/tasks/{task['id']}")
    assert t["status"] == "active"
    result = await world.upload("a_node", b"ciphertext-result")
    # An older node's plaintext `log` is dropped; the sealed log is kept as the node sent it.
    patch = {
        "status": "completed",
        "exit_code": 0,
        "result_blob_id": result,
        "log": "plaintext-tail-" * 100,
        "sealed_log": "c2VhbGVk",
    }
    status, done = await world.call("a_node", "PATCH", f"/runs/{run['id']}", json=patch)
    assert status == 200 and done["finished_at"] and done["sealed_log"] == "c2VhbGVk"
    assert "log" not in done and "plaintext-tail" not in json.dumps(done)
    status, again = await world.call("a_node", "PATCH", f"/runs/{run['id']}", json={"status": "failed"})
    assert status == 409 and again["error"] == "run-final"
    status, blob = await world.call("a_res", "GET", f"/blobs/{result}")  # the initiator reads the result
    assert status == 200 and blob == b"ciphertext-result"
    status, listed = await world.call("a_res", "GET", "/tasks?status=active")
    assert [x["id"] for x in listed["data"]] == [task["id"]]  # B's run is still pending


async def test_kill_marks_runs_and_blocks_updates(world: World) -> None:
    task = await world.task("a_res", "ab", ["A", "B"])
    status, runs = await world.call("a_node", "GET", f"/runs?task_id={task['id']}")
    run_id = runs["data"][0]["id"]
    await world.call("a_node", "POST", f"/runs/{run_id}/claim")
    status, _ = await world.call("a_res2", "POST", f"/tasks/{task['id']}/kill")
    assert status == 403  # a researcher kills only their own tasks
    status, killed = await world.call("a_res", "POST", f"/tasks/{task['id']}/kill")
    assert status == 200 and killed["status"] == "killed"
    status, body = await world.call("a_node", "PATCH", f"/runs/{run_id}", json={"status": "completed"})
    assert status == 409 and body["error"] == "run-killed"
    status, all_runs = await world.call("a_res", "GET", f"/runs?task_id={task['id']}")
    assert {r["status"] for r in all_runs["data"]} == {"killed"}


async def test_killed_run_takes_only_its_log(world: World) -> None:
    """The node stops a killed run's container and uploads the log so far; its status stays final."""
    task = await world.task("a_res", "ab", ["A", "B"])
    status, runs = await world.call("a_node", "GET", f"/runs?task_id={task['id']}")
    run_id = runs["data"][0]["id"]
    await world.call("a_node", "POST", f"/runs/{run_id}/claim")
    await world.call("a_node", "PATCH", f"/runs/{run_id}", json={"status": "active"})
    status, _ = await world.call("a_res", "POST", f"/tasks/{task['id']}/kill")
    assert status == 200
    late = ({"status": "killed", "sealed_log": "YQ=="}, {"exit_code": 1, "sealed_log": "Yg=="})
    for refused in (*late, {"status": "failed"}):
        status, body = await world.call("a_node", "PATCH", f"/runs/{run_id}", json=refused)
        assert status == 409 and body["error"] == "run-killed", refused
    status, body = await world.call("a_node2", "PATCH", f"/runs/{run_id}", json={"sealed_log": "bm90"})
    assert status == 403
    # ciphertext cannot be cut to a tail: a sealed log over the cap is refused whole, with a JSON reason
    too_big = {"sealed_log": "A" * 200_000}
    status, body = await world.call("a_node", "PATCH", f"/runs/{run_id}", json=too_big)
    assert status == 413 and body["error"] == "too-large" and "sealed_log" in body["detail"]
    status, body = await world.call("a_node", "PATCH", f"/runs/{run_id}", json={"sealed_log": "not b64!"})
    assert status == 422
    sealed = {"sealed_log": "x" * 5000 + "EN"}
    status, run = await world.call("a_node", "PATCH", f"/runs/{run_id}", json=sealed)
    assert status == 200 and run["status"] == "killed" and run["exit_code"] is None
    assert run["sealed_log"] == "x" * 5000 + "EN"
    status, seen = await world.call("a_res", "GET", f"/runs/{run_id}")
    assert seen["status"] == "killed" and seen["sealed_log"] == run["sealed_log"]


async def test_finished_run_refuses_a_late_log(world: World) -> None:
    """Only a killed run takes a log after its end: a run its node finished reported its log then."""
    task = await world.task("a_res", "ab", ["A", "B"])
    status, runs = await world.call("a_node", "GET", f"/runs?task_id={task['id']}")
    run_id = runs["data"][0]["id"]
    await world.call("a_node", "POST", f"/runs/{run_id}/claim")
    patch = {"status": "failed", "exit_code": 3, "reason": "disclosure-refused", "sealed_log": "Zmlyc3Q="}
    status, _ = await world.call("a_node", "PATCH", f"/runs/{run_id}", json=patch)
    assert status == 200
    status, body = await world.call("a_node", "PATCH", f"/runs/{run_id}", json={"sealed_log": "c2Vjb25k"})
    assert status == 409 and body["error"] == "run-final"
    status, seen = await world.call("a_res", "GET", f"/runs/{run_id}")
    assert seen["status"] == "failed" and seen["sealed_log"] == "Zmlyc3Q="
    assert seen["reason"] == "disclosure-refused"


async def test_run_token_scope_and_expiry(world: World) -> None:
    task = await world.task("a_res", "ab", ["A", "B"])
    status, runs = await world.call("a_node", "GET", f"/runs?task_id={task['id']}")
    run_id = runs["data"][0]["id"]
    status, _ = await world.call("a_node", "POST", f"/runs/{run_id}/token")
    assert status == 403  # not claimed by this node yet
    await world.call("a_node", "POST", f"/runs/{run_id}/claim")
    status, tok = await world.call("a_node", "POST", f"/runs/{run_id}/token")
    assert status == 200 and tok["expires_at"]
    world._tokens["run"] = tok["token"]
    blob = await world.upload("run", b"sub-input")
    sub = {"image": "alpine:3", "organizations": [{"id": world.orgs["B"], "input_blob_id": blob}]}
    status, subtask = await world.call("run", "POST", "/tasks", json=sub)
    assert status == 201 and subtask["parent_id"] == task["id"] and subtask["job_id"] == task["job_id"]
    status, seen = await world.call("run", "GET", "/tasks")
    assert {t["id"] for t in seen["data"]} == {task["id"], subtask["id"]}
    other = await world.task("a_res", "ab", ["A"])
    status, _ = await world.call("run", "GET", f"/tasks/{other['id']}")
    assert status == 404
    status, _ = await world.call("run", "POST", "/tasks", json={**sub, "parent_id": other["id"]})
    assert status == 403
    status, _ = await world.call("run", "GET", f"/organizations/{world.orgs['C']}")
    assert status == 404
    status, _ = await world.call("run", "GET", "/users")
    assert status == 403
    await world.call("a_node", "PATCH", f"/runs/{run_id}", json={"status": "completed"})
    status, body = await world.call("run", "GET", "/tasks")
    assert status == 401 and body["error"] == "token-expired"


async def test_subtask_of_user_and_job_filter(world: World) -> None:
    parent = await world.task("a_res", "ab", ["A"])
    child = await world.task("a_res", "ab", ["B"], parent_id=parent["id"])
    assert child["job_id"] == parent["job_id"] and child["parent_id"] == parent["id"]
    status, job = await world.call("a_res", "GET", f"/tasks?job_id={parent['job_id']}")
    assert [t["id"] for t in job["data"]] == [parent["id"], child["id"]]
    status, _body = await world.call(
        "b_res",
        "POST",
        "/tasks",
        json={
            "collaboration_id": world.collabs["ab"],
            "image": "x",
            "organizations": [{"id": world.orgs["B"]}],
            "parent_id": parent["id"],
        },
    )
    assert status == 404  # B cannot hang subtasks under A's task it cannot see


async def test_pagination_and_links(world: World) -> None:
    for _ in range(5):
        await world.task("a_res", "ab", ["A"])
    status, page = await world.call("a_res", "GET", "/tasks?per_page=2&page=2")
    assert status == 200
    assert page["total"] == 5 and len(page["data"]) == 2 and page["page"] == 2
    assert "page=3" in page["links"]["next"]
    _status, last = await world.call("a_res", "GET", "/tasks?per_page=2&page=3")
    assert len(last["data"]) == 1 and last["links"]["next"] is None
    assert last["data"][0]["links"]["runs"].endswith(f"task_id={last['data'][0]['id']}")


async def test_task_input_must_be_readable_by_creator(world: World) -> None:
    foreign = await world.upload("b_res", b"b's blob")
    status, body = await world.call(
        "a_res",
        "POST",
        "/tasks",
        json={
            "collaboration_id": world.collabs["ab"],
            "image": "x",
            "organizations": [{"id": world.orgs["A"], "input_blob_id": foreign}],
        },
    )
    assert status == 422 and "unknown blob" in body["detail"]
    status, body = await world.call(
        "a_res",
        "POST",
        "/tasks",
        json={
            "collaboration_id": world.collabs["ab"],
            "image": "x",
            "organizations": [{"id": world.orgs["C"]}],
        },
    )
    assert status == 422


async def test_users_and_nodes_by_admin(world: World) -> None:
    status, user = await world.call(
        "a_admin",
        "POST",
        "/users",
        json={"username": "newbie", "password": "long enough pw", "roles": ["viewer"]},
    )
    assert status == 201 and user["organization_id"] == world.orgs["A"] and user["roles"] == ["viewer"]
    status, _ = await world.call(
        "a_admin",
        "POST",
        "/users",
        json={"username": "evil", "password": "long enough pw", "roles": ["root"]},
    )
    assert status == 403
    status, _ = await world.call(
        "a_admin", "POST", "/users", json={"username": "newbie", "password": "long enough pw"}
    )
    assert status == 409
    status, node = await world.call(
        "a_admin", "POST", "/nodes", json={"collaboration_id": world.collabs["ab"]}
    )
    assert status == 201 and "." in node["api_key"]
    status, shown = await world.call("a_admin", "GET", f"/nodes/{node['id']}")
    assert "api_key" not in shown
    r = await world.client.post("/api/v1/token/node", json={"api_key": node["api_key"]})
    assert r.status == 200
    status, roles = await world.call("a_view", "GET", "/roles")
    assert {r["name"] for r in roles["data"]} == {"root", "org-admin", "researcher", "viewer", "node"}
    status, _ = await world.call(
        "a_view", "PATCH", f"/users/{world.users['a_view']}", json={"roles": ["root"]}
    )
    assert status == 403
    status, _me = await world.call(
        "a_view",
        "PATCH",
        f"/users/{world.users['a_view']}",
        json={"password": "another pw!", "old_password": "correct horse battery"},
    )
    assert status == 200
