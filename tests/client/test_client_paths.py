"""The researcher's AsyncClient against the real server app (SQLite and PostgreSQL): create_task seals the
input for every target from one listing of the members, results are downloaded together and come back
decrypted in organization order, and each refusal still says what went wrong."""

from __future__ import annotations

from typing import Any

import pytest
from tests.server.vserver_testkit import World, client, db_url, settings, world

from vfed.client.client import AsyncClient
from vfed.client.errors import ApiError, ClientError, RunFailed
from vfed.common.crypto import CryptoError, Keyring, decrypt_bytes, encrypt_bytes
from vfed.common.payload import TaskInput, encode_result

__all__ = ["client", "db_url", "settings", "world"]


async def _publish(world: World, node: str, org: str) -> Keyring:
    ring = Keyring.generate()
    path = f"/organizations/{world.orgs[org]}/public_key"
    status, _ = await world.call(node, "PUT", path, json={"public_key": ring.current.public.to_text()})
    assert status == 200
    return ring


async def _researcher(world: World) -> AsyncClient:
    url = str(world.client.make_url("")).rstrip("/")
    return AsyncClient(url, token=await world.token("a_res"))


async def _finish(world: World, node: str, ring: Keyring, researcher: Keyring, task: dict[str, Any]) -> Any:
    """The node's side: claim, open the input, seal a result for the researcher (or fail), report."""
    _, runs = await world.call(node, "GET", f"/runs?task_id={task['id']}")
    run_id = runs["data"][0]["id"]
    status, claimed = await world.call(node, "POST", f"/runs/{run_id}/claim")
    assert status == 200
    _, sealed = await world.call(node, "GET", f"/blobs/{claimed['input_blob_id']}")
    task_input = TaskInput.from_json(decrypt_bytes(sealed, ring, lambda _k: researcher.current.public))
    if task_input.kwargs.get("fail_at") == node:
        patch: dict[str, Any] = {"status": "failed", "reason": "asked to", "log": "one\ntwo\n"}
    else:
        value = {"node": node, "args": task_input.args}
        result = encrypt_bytes(encode_result(value), ring.current, [researcher.current.public])
        patch = {"status": "completed", "result_blob_id": await world.upload(node, result)}
    status, _ = await world.call(node, "PATCH", f"/runs/{run_id}", json=patch)
    assert status == 200


async def test_create_wait_results(world: World) -> None:
    ring_a, ring_b = await _publish(world, "a_node", "A"), await _publish(world, "b_node", "B")
    async with await _researcher(world) as researcher:
        researcher.use_keyring(ring_a)
        task = await researcher.create_task(world.collabs["ab"], "alpine:3", "m", args=[7])
        assert task["organization_ids"] == [world.orgs["A"], world.orgs["B"]]
        for node, ring in (("b_node", ring_b), ("a_node", ring_a)):
            await _finish(world, node, ring, ring_a, task)
        assert (await researcher.wait(task, timeout_s=30, progress=False))["status"] == "completed"
        values = await researcher.results(task)
        assert values == [{"node": "a_node", "args": [7]}, {"node": "b_node", "args": [7]}]

        failing = await researcher.create_task(
            world.collabs["ab"],
            "alpine:3",
            "m",
            kwargs={"fail_at": "a_node"},
            organizations=[world.orgs["A"]],
        )
        assert failing["organization_ids"] == [world.orgs["A"]]
        await _finish(world, "a_node", ring_a, ring_a, failing)
        with pytest.raises(RunFailed) as failed:
            await researcher.results(failing)
        assert failed.value.reason == "asked to" and failed.value.log_tail == "one\ntwo"
        mixed = await researcher.create_task(
            world.collabs["ab"], "alpine:3", "m", kwargs={"fail_at": "b_node"}
        )
        for node, ring in (("a_node", ring_a), ("b_node", ring_b)):
            await _finish(world, node, ring, ring_a, mixed)
        got = await researcher.results(mixed, raise_on_failure=False)
        assert got[0] == {"node": "a_node", "args": []} and isinstance(got[1], RunFailed)


async def test_create_task_refusals(world: World) -> None:
    ring_a = await _publish(world, "a_node", "A")
    async with await _researcher(world) as researcher:
        researcher.use_keyring(ring_a)
        with pytest.raises(ClientError, match="no public key yet"):  # B has not published one
            await researcher.create_task(world.collabs["ab"], "alpine:3", "m")
        with pytest.raises(ApiError) as unknown:
            await researcher.create_task(world.collabs["cx"], "alpine:3", "m")
        assert unknown.value.status == 404  # a collaboration of others does not exist for A
        with pytest.raises(ApiError) as invisible:
            await researcher.create_task(
                world.collabs["ab"], "alpine:3", "m", organizations=[world.orgs["C"]]
            )
        assert invisible.value.status == 404
        twice = [world.orgs["A"], world.orgs["A"]]
        with pytest.raises(ApiError) as repeated:
            await researcher.create_task(world.collabs["ab"], "alpine:3", "m", organizations=twice)
        assert repeated.value.status == 422 and "twice" in repeated.value.detail


async def test_members_keys_are_kept_and_a_rotated_key_is_never_used(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second task lists no members; after B rotates its key, the next task's first POST is refused
    (409 stale-key, nothing stored), the client lists again, seals to B's new key and the retry lands."""
    ring_a, old_b = await _publish(world, "a_node", "A"), await _publish(world, "b_node", "B")
    async with await _researcher(world) as researcher:
        researcher.use_keyring(ring_a)
        listings: list[str] = []
        real_get_all = researcher.api.get_all

        def counted(path: str, *args: Any) -> Any:
            listings.append(path)
            return real_get_all(path, *args)

        monkeypatch.setattr(researcher.api, "get_all", counted)
        collab = world.collabs["ab"]
        await researcher.create_task(collab, "alpine:3", "m", args=[1])
        await researcher.create_task(collab, "alpine:3", "m", args=[2])
        assert listings == ["/organizations"]

        new_b = await _publish(world, "b_node", "B")
        _, before = await world.call("a_res", "GET", f"/tasks?collaboration_id={collab}")
        task = await researcher.create_task(collab, "alpine:3", "m", args=[3])
        assert listings == ["/organizations", "/organizations"]
        _, after = await world.call("a_res", "GET", f"/tasks?collaboration_id={collab}")
        assert len(after["data"]) == len(before["data"]) + 1  # the refused attempt left no task

        _, runs = await world.call("b_node", "GET", f"/runs?task_id={task['id']}")
        _, sealed = await world.call("b_node", "GET", f"/blobs/{runs['data'][0]['input_blob_id']}")
        opened = decrypt_bytes(sealed, new_b, lambda _k: ring_a.current.public)
        assert TaskInput.from_json(opened).args == [3]
        with pytest.raises(CryptoError):
            decrypt_bytes(sealed, old_b, lambda _k: ring_a.current.public)
