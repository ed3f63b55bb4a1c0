"""The proxy with the run's verified descriptor and pinned key chains, as the node starts it: a subtask's
descriptor embeds the run's own and verifies at the target, inputs are sealed to chain heads and bound to it,
results are bound to their run, and the run's subtask limits refuse."""

from __future__ import annotations

import json
from typing import Any

from tests.client.trustkit import node_chains, open_input, seal_result
from tests.proxy.proxy_kit import World, call, signed

from vfed.common.crypto import encrypt_bytes
from vfed.common.payload import encode_result
from vfed.common.trust import DescriptorDocument, result_context

__all__ = ["signed"]


async def _subtask(world: World, orgs: list[str], **extra: Any) -> dict[str, Any]:
    ids = [world.org_ids[o] for o in orgs]
    new = {"name": "sub", "input": {"method": "echo", "args": [1]}, "organizations": ids, **extra}
    status, body = await call(world, "POST", "/tasks", json=new)
    assert status == 201, body
    assert isinstance(body, dict)
    return body


async def _open_as(world: World, name: str, task_id: int) -> Any:
    """Node `name`'s view of its run of the subtask: descriptor verified (parent included), input opened."""
    node = world.nodes[name]
    (run,) = await node.list_runs(task_id=task_id, organization_id=world.org_ids[name])
    assert run.input_blob_id is not None
    task = await node.get_task(task_id)
    assert task.descriptor is not None
    sealed = await node.download_blob(run.input_blob_id)
    chains = node_chains(node.key_records, node.revocations)
    opened = await open_input(task.descriptor, sealed, world.keyrings[name], world.org_ids[name], chains)
    return run, opened


async def test_subtask_descriptor_embeds_the_parent_and_verifies(signed: World) -> None:
    world = signed
    assert world.ctx.descriptor is not None
    created = await _subtask(world, ["a", "b"])
    for name in ("a", "b"):
        _, opened = await _open_as(world, name, created["task_id"])
        verified, body = opened.verified, opened.verified.body
        assert opened.task_input.method == "echo" and opened.task_input.args == [1]
        assert body.parent == world.ctx.descriptor.digest and body.depth == 1
        assert verified.parent is not None and verified.parent.digest == world.ctx.descriptor.digest
        assert verified.document.parent == world.ctx.descriptor
        assert body.signer.role == "organization" and body.signer.key_id == world.keyrings["a"].current.key_id
        assert (body.initiator.org, body.initiator.user) == (world.org_ids["a"], None)
        assert [r.key_id for r in verified.reply_keys] == [world.keyrings["a"].current.key_id]
        assert body.collaboration == world.ctx.run.collaboration_id and body.image == world.ctx.run.image
        target = verified.target(world.org_ids[name])
        assert target is not None and target.key_id == world.keyrings[name].current.key_id
    assert world.ctx.subtask_digests[created["task_id"]] == verified.digest


async def test_per_organization_inputs_get_their_own_hash(signed: World) -> None:
    world = signed
    a, b = world.org_ids["a"], world.org_ids["b"]
    new = {
        "name": "sub",
        "inputs": {
            str(a): {"method": "echo", "args": ["for-a"]},
            str(b): {"method": "echo", "args": ["for-b"]},
        },
        "organizations": [a, b],
    }
    status, created = await call(world, "POST", "/tasks", json=new)
    assert status == 201 and isinstance(created, dict), created
    _, opened_b = await _open_as(world, "b", created["task_id"])
    _, opened_a = await _open_as(world, "a", created["task_id"])
    assert opened_b.task_input.args == ["for-b"] and opened_a.task_input.args == ["for-a"]
    assert len({t.input for t in opened_b.verified.body.targets}) == 2
    mixed = {**new, "inputs": {str(a): {"method": "echo"}, str(b): {"method": "other"}}}
    status, body = await call(world, "POST", "/tasks", json=mixed)
    assert status == 400 and isinstance(body, dict) and "same method" in body["detail"]


async def test_results_are_bound_to_their_run(signed: World) -> None:
    """b's result for its run comes back decrypted (also once the proxy forgot the subtask's digest); the
    same result stored for another run, or an unbound one, answers 502 undecryptable."""
    world = signed
    node_b, ring_b, b = world.nodes["b"], world.keyrings["b"], world.org_ids["b"]
    first, second = await _subtask(world, ["b"]), await _subtask(world, ["b"])
    run_1, opened_1 = await _open_as(world, "b", first["task_id"])
    run_2, _ = await _open_as(world, "b", second["task_id"])
    await node_b.claim(run_1.id)
    blob = await node_b.upload_blob(seal_result({"answer": 42}, ring_b, opened_1.verified, b, run_1.id))
    await node_b.patch_run(run_1.id, status="completed", exit_code=0, result_blob_id=blob.id)
    status, body = await call(world, "GET", f"/runs/{run_1.id}/result")
    assert status == 200 and isinstance(body, dict) and body["value"] == {"answer": 42}, body
    world.ctx.subtask_digests.clear()  # a proxy that did not create it reads the digest back, checked
    status, body = await call(world, "GET", f"/runs/{run_1.id}/result")
    assert status == 200 and isinstance(body, dict) and body["value"] == {"answer": 42}, body

    await node_b.claim(run_2.id)  # the result of run 1, stored as run 2's
    await node_b.patch_run(run_2.id, status="completed", exit_code=0, result_blob_id=blob.id)
    status, body = await call(world, "GET", f"/runs/{run_2.id}/result")
    assert status == 502 and isinstance(body, dict) and body["error"] == "undecryptable", body
    assert "belongs to another run or task" in body["detail"]

    third = await _subtask(world, ["b"])
    run_3, _ = await _open_as(world, "b", third["task_id"])
    await node_b.claim(run_3.id)
    unbound = encrypt_bytes(encode_result(1), ring_b.current, [world.keyrings["a"].current.public])
    blob = await node_b.upload_blob(unbound)
    await node_b.patch_run(run_3.id, status="completed", exit_code=0, result_blob_id=blob.id)
    status, body = await call(world, "GET", f"/runs/{run_3.id}/result")
    assert status == 502 and isinstance(body, dict) and body["error"] == "undecryptable", body

    fourth = await _subtask(world, ["b"])
    run_4, _ = await _open_as(world, "b", fourth["task_id"])
    await node_b.claim(run_4.id)
    digest = DescriptorDocument.parse(str((await node_b.get_task(fourth["task_id"])).descriptor)).digest
    stranger = encrypt_bytes(  # bound right, but signed by a key not on b's chain
        encode_result(1),
        world.keyrings["b"].rotate(),
        [world.keyrings["a"].current.public],
        context=result_context(digest, b, run_4.id),
    )
    blob = await node_b.upload_blob(stranger)
    await node_b.patch_run(run_4.id, status="completed", exit_code=0, result_blob_id=blob.id)
    status, body = await call(world, "GET", f"/runs/{run_4.id}/result")
    assert status == 502 and isinstance(body, dict) and body["error"] == "undecryptable", body


async def test_subtask_limits_refuse(signed: World) -> None:
    world = signed
    world.ctx.max_subtasks_per_run = 1
    await _subtask(world, ["b"])
    status, body = await call(
        world, "POST", "/tasks", json={"name": "s", "input": {"method": "m"}, "organizations": [1]}
    )
    assert status == 429 and isinstance(body, dict) and body["error"] == "subtask-limit", body
    world.ctx.max_subtasks_per_run = 100
    world.ctx.max_subtask_depth = 0  # the run's task is at depth 0: a subtask would be at 1
    b = world.org_ids["b"]
    new = {"name": "s", "input": {"method": "m"}, "organizations": [b]}
    status, body = await call(world, "POST", "/tasks", json=new)
    assert status == 403 and isinstance(body, dict) and body["error"] == "subtask-limit", body
    assert "1 deep" in body["detail"]
    world.ctx.max_subtask_depth = 2
    assert world.ctx.created == 1  # refused attempts took no slot


async def test_targets_must_be_members_and_trusted(signed: World) -> None:
    world = signed
    new = {"name": "s", "input": {"method": "m"}, "organizations": [world.org_ids["b"], 999]}
    status, body = await call(world, "POST", "/tasks", json=new)
    assert status == 403 and isinstance(body, dict) and body["error"] == "not-a-member", body
    assert world.ctx.chains is not None
    world.ctx.chains.store.unpin(world.org_ids["b"])
    world.ctx.chains.forget(world.org_ids["b"])
    new = {"name": "s", "input": {"method": "m"}, "organizations": [world.org_ids["b"]]}
    status, body = await call(world, "POST", "/tasks", json=new)
    assert status == 403 and isinstance(body, dict) and body["error"] == "untrusted-key", body
    assert "not pinned" in body["detail"]
    assert json.dumps(body).count("untrusted-key") == 1
    assert world.ctx.created == 0
