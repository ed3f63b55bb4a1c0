"""The proxy over a real Unix socket, against the real server app: routes, refusals, encryption both ways."""

from __future__ import annotations

import asyncio
import json

import pytest
from tests.proxy.proxy_kit import World, call, world

from vfed.common.crypto import Keyring, NotARecipient, decrypt_bytes, encrypt_bytes
from vfed.common.payload import TaskInput, encode_result

__all__ = ["world"]


async def test_run_and_organizations(world: World) -> None:
    status, body = await call(world, "GET", "/run")
    assert status == 200
    assert body == {
        "run_id": world.parent_run,
        "task_id": world.parent_task,
        "job_id": world.ctx.run.job_id,
        "organization_id": world.org_ids["a"],
        "collaboration_id": world.ctx.run.collaboration_id,
        "image": "vfed-test/node-probe",
    }
    status, body = await call(world, "GET", "/organizations")
    assert status == 200
    assert isinstance(body, dict)
    by_id = {o["id"]: o for o in body["data"]}
    assert set(by_id) == set(world.org_ids.values())
    assert by_id[world.org_ids["b"]]["key_id"] == world.keyrings["b"].current.key_id
    assert "public_key" not in by_id[world.org_ids["b"]]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nodes"),
        ("DELETE", "/run"),
        ("POST", "/token/node"),
        ("GET", "/blobs/abc"),
        ("PATCH", "/runs/1"),
        ("GET", "/api/v1/runs"),
        ("POST", "/run"),
    ],
)
async def test_unlisted_routes_answer_403_json(world: World, method: str, path: str) -> None:
    status, body = await call(world, method, path)
    assert status == 403
    assert isinstance(body, dict) and body["error"] == "forbidden" and path in body["detail"]


async def test_request_over_the_limit_answers_413(world: World) -> None:
    big = {"name": "x", "input": {"method": "echo", "args": ["y" * 100_000]}, "organizations": [1]}
    status, body = await call(world, "POST", "/tasks", json=big)
    assert status == 413
    assert isinstance(body, dict) and body["error"] == "too-large"


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        ({"name": "x", "organizations": [1]}, "exactly one of"),
        ({"name": "x", "organizations": [], "input": {"method": "m"}}, "organizations"),
        ({"name": "x", "organizations": [1], "input": {"method": "m"}, "extra": 1}, "extra"),
        ({"name": "x", "organizations": [1, 2], "inputs": {"1": {"method": "m"}}}, "one entry per"),
    ],
)
async def test_bad_task_bodies_answer_400(world: World, payload: dict[str, object], detail: str) -> None:
    status, body = await call(world, "POST", "/tasks", json=payload)
    assert status == 400, body
    assert isinstance(body, dict) and detail in body["detail"]


async def test_subtask_input_is_sealed_for_each_org_and_signed_by_ours(world: World) -> None:
    a, b = world.org_ids["a"], world.org_ids["b"]
    new = {"name": "sub", "input": {"method": "echo", "args": [1]}, "organizations": [a, b]}
    status, body = await call(world, "POST", "/tasks", json=new)
    assert status == 201, body
    assert isinstance(body, dict) and len(body["run_ids"]) == 2
    sender = world.keyrings["a"].current.public
    for name in ("a", "b"):
        (run,) = await world.nodes[name].list_runs(
            task_id=body["task_id"], organization_id=world.org_ids[name]
        )
        assert run.input_blob_id is not None
        blob = await world.nodes[name].download_blob(run.input_blob_id)
        assert b"echo" not in blob
        plain = decrypt_bytes(blob, world.keyrings[name], sender)
        assert TaskInput.from_json(plain) == TaskInput(method="echo", args=[1])
    task = await world.nodes["b"].get_task(body["task_id"])
    assert task.parent_id == world.parent_task and task.job_id == world.ctx.run.job_id


async def test_per_org_inputs_open_only_for_their_org(world: World) -> None:
    a, b = world.org_ids["a"], world.org_ids["b"]
    new = {
        "name": "sub",
        "inputs": {
            str(a): {"method": "echo", "args": ["for-a"]},
            str(b): {"method": "echo", "args": ["for-b"]},
        },
        "organizations": [a, b],
    }
    status, body = await call(world, "POST", "/tasks", json=new)
    assert status == 201, body
    assert isinstance(body, dict)
    sender = world.keyrings["a"].current.public
    (run_b,) = await world.nodes["b"].list_runs(task_id=body["task_id"], organization_id=b)
    assert run_b.input_blob_id is not None
    blob_b = await world.nodes["b"].download_blob(run_b.input_blob_id)
    assert TaskInput.from_json(decrypt_bytes(blob_b, world.keyrings["b"], sender)).args == ["for-b"]
    with pytest.raises(NotARecipient):
        decrypt_bytes(blob_b, world.keyrings["a"], sender)


async def test_results_come_back_decrypted_and_waits_end(world: World) -> None:
    b = world.org_ids["b"]
    new = {"name": "sub", "input": {"method": "echo"}, "organizations": [b]}
    _, created = await call(world, "POST", "/tasks", json=new)
    assert isinstance(created, dict)
    task_id, (run_id,) = created["task_id"], created["run_ids"]
    status, view = await call(world, "GET", f"/tasks/{task_id}/wait?timeout_s=0.3")
    assert status == 200 and isinstance(view, dict)
    assert view["done"] is False and view["runs"][0]["status"] == "pending"
    status, body = await call(world, "GET", f"/runs/{run_id}/result")
    assert status == 409 and isinstance(body, dict) and body["status"] == "pending"
    # Node b runs it: claims, seals its result for a (signed by b), reports completion.
    node_b = world.nodes["b"]
    await node_b.claim(run_id)
    sealed = encrypt_bytes(
        encode_result({"answer": 42}), world.keyrings["b"].current, [world.keyrings["a"].current.public]
    )
    blob = await node_b.upload_blob(sealed)
    await node_b.patch_run(run_id, status="completed", exit_code=0, result_blob_id=blob.id)
    status, view = await call(world, "GET", f"/tasks/{task_id}/wait?timeout_s=10")
    assert status == 200 and isinstance(view, dict)
    assert view["done"] is True and view["status"] == "completed"
    async with world.proxy_session.get(f"/runs/{run_id}/result") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        assert json.loads(await response.read())["value"] == {"answer": 42}


async def test_tasks_outside_the_job_are_forbidden(world: World) -> None:
    status, body = await call(world, "GET", f"/tasks/{world.parent_task}")
    assert status == 403, body
    status, body = await call(world, "GET", f"/runs/{world.parent_run}/result")
    assert status == 403, body
    status, body = await call(world, "GET", "/tasks/999999")
    assert status == 403, body
    status, body = await call(world, "GET", "/tasks/notanumber")
    assert status == 400, body


async def test_large_parquet_result_streams_back_with_its_content_type(world: World) -> None:
    import pandas as pd

    from vfed.common.payload import decode_result

    b = world.org_ids["b"]
    _, created = await call(
        world, "POST", "/tasks", json={"name": "s", "input": {"method": "m"}, "organizations": [b]}
    )
    assert isinstance(created, dict)
    (run_id,) = created["run_ids"]
    frame = pd.DataFrame({"x": range(300_000), "y": [f"row-{i}" for i in range(300_000)]})
    plain = encode_result(frame)
    assert len(plain) > 1024 * 1024
    await world.nodes["b"].claim(run_id)
    sealed = encrypt_bytes(plain, world.keyrings["b"].current, [world.keyrings["a"].current.public])
    blob = await world.nodes["b"].upload_blob(sealed)
    await world.nodes["b"].patch_run(run_id, status="completed", exit_code=0, result_blob_id=blob.id)
    async with world.proxy_session.get(f"/runs/{run_id}/result") as response:
        assert response.status == 200
        assert response.content_type == "application/vnd.apache.parquet"
        body = await response.read()
    assert body == plain
    pd.testing.assert_frame_equal(decode_result(body), frame)
    spool = world.ctx.spool_dir
    assert spool is not None
    for _ in range(50):  # the handler removes its spool right after the last byte went out
        if not list(spool.iterdir()):
            break
        await asyncio.sleep(0.05)
    assert list(spool.iterdir()) == []


async def test_tampered_result_is_refused(world: World) -> None:
    b = world.org_ids["b"]
    _, created = await call(
        world, "POST", "/tasks", json={"name": "s", "input": {"method": "m"}, "organizations": [b]}
    )
    assert isinstance(created, dict)
    (run_id,) = created["run_ids"]
    await world.nodes["b"].claim(run_id)
    # sealed for a, but signed by a stranger instead of organization b
    stranger = Keyring.generate()
    sealed = encrypt_bytes(encode_result(1), stranger.current, [world.keyrings["a"].current.public])
    blob = await world.nodes["b"].upload_blob(sealed)
    await world.nodes["b"].patch_run(run_id, status="completed", exit_code=0, result_blob_id=blob.id)
    status, body = await call(world, "GET", f"/runs/{run_id}/result")
    assert status == 502 and isinstance(body, dict) and body["error"] == "undecryptable", body
