"""The researcher's AsyncClient against the real server app (SQLite and PostgreSQL): create_task seals the
input to every target's verified chain head from one listing of the members and signs a descriptor that
names its hash; results are downloaded together, come back decrypted in organization order and bound to their
run; each refusal still says what went wrong."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from tests.client.trustkit import node_chains, open_input, seal_result
from tests.server.s3_testkit import blob_backend, blobs_settings
from tests.server.vserver_testkit import World, client, db_url, settings, world

from vfed.client.client import AsyncClient
from vfed.client.errors import ApiError, ClientError, NotCertified, ResultMismatch, RunFailed, TrustRefused
from vfed.common.crypto import CryptoError, Keyring, decrypt_bytes
from vfed.common.payload import TaskInput
from vfed.common.trust import (
    ChainResolver,
    DescriptorDocument,
    certify,
    fingerprint,
    input_context,
    records_for_keys,
    result_context,
    revoke,
    rotation_record,
)
from vfed.node.log_sealing import seal_run_log_now

__all__ = ["blob_backend", "blobs_settings", "client", "db_url", "settings", "world"]


async def _publish(world: World, node: str, org: str, ring: Keyring | None = None) -> Keyring:
    """The node's key chain (all of its keyring's keys) on the server; the organization's key follows."""
    ring = ring or Keyring.generate()
    records = records_for_keys(world.orgs[org], ring.keys)
    path = f"/organizations/{world.orgs[org]}/key-records"
    status, body = await world.call(node, "POST", path, json={"records": [r.model_dump() for r in records]})
    assert status in (200, 201), body
    return ring


def _chains(world: World, who: str = "a_node") -> ChainResolver:
    async def records(org_id: int) -> list[Any]:
        _, body = await world.call(who, "GET", f"/organizations/{org_id}/key-records")
        return list(body["data"])

    async def revocations(org_id: int) -> list[Any]:
        _, body = await world.call(who, "GET", f"/organizations/{org_id}/revocations")
        return list(body["data"])

    return node_chains(records, revocations)


async def _researcher(world: World, **kwargs: Any) -> AsyncClient:
    url = str(world.client.make_url("")).rstrip("/")
    return AsyncClient(url, token=await world.token("a_res"), **kwargs)


async def _finish(
    world: World, node: str, ring: Keyring, task: dict[str, Any], org: str | None = None
) -> int:
    """The node's side: claim, verify the descriptor and the input's hash, open the input, seal a result to
    the descriptor's reply keys bound to the run (or fail), report. Returns the run id."""
    org_id = world.orgs[org or node[0].upper()]
    _, runs = await world.call(node, "GET", f"/runs?task_id={task['id']}&organization_id={org_id}")
    run_id = int(runs["data"][0]["id"])
    status, claimed = await world.call(node, "POST", f"/runs/{run_id}/claim")
    assert status == 200
    _, sealed = await world.call(node, "GET", f"/blobs/{claimed['input_blob_id']}")
    _, stored = await world.call(node, "GET", f"/tasks/{task['id']}")
    opened = await open_input(stored["descriptor"], sealed, ring, org_id, _chains(world, node))
    if opened.task_input.kwargs.get("fail_at") == node:
        log = seal_run_log_now(f"one\ntwo {node}\n", ring, [], org_id, int(task["id"]), run_id)
        patch: dict[str, Any] = {"status": "failed", "reason": "asked to", "sealed_log": log}
    else:
        value = {"node": node, "args": opened.task_input.args}
        result = seal_result(value, ring, opened.verified, org_id, run_id)
        patch = {"status": "completed", "result_blob_id": await world.upload(node, result)}
    status, _ = await world.call(node, "PATCH", f"/runs/{run_id}", json=patch)
    assert status == 200
    return run_id


async def test_create_wait_results(world: World) -> None:
    ring_a, ring_b = await _publish(world, "a_node", "A"), await _publish(world, "b_node", "B")
    async with await _researcher(world) as researcher:
        researcher.use_keyring(ring_a)
        task = await researcher.create_task(world.collabs["ab"], "alpine:3", "m", args=[7])
        assert task["organization_ids"] == [world.orgs["A"], world.orgs["B"]]
        for node, ring in (("b_node", ring_b), ("a_node", ring_a)):
            await _finish(world, node, ring, task)
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
        await _finish(world, "a_node", ring_a, failing)
        with pytest.raises(RunFailed) as failed:
            await researcher.results(failing)
        # the log is sealed to organization A, whose keyring this researcher holds
        assert failed.value.reason == "asked to" and failed.value.log_tail == "one\ntwo a_node"
        mixed = await researcher.create_task(
            world.collabs["ab"], "alpine:3", "m", kwargs={"fail_at": "b_node"}
        )
        for node, ring in (("a_node", ring_a), ("b_node", ring_b)):
            await _finish(world, node, ring, mixed)
        got = await researcher.results(mixed, raise_on_failure=False)
        assert got[0] == {"node": "a_node", "args": []} and isinstance(got[1], RunFailed)
        assert got[1].reason == "asked to" and got[1].log_tail == ""  # B's log is B's: not readable here


async def test_organization_key_signs_a_descriptor_that_verifies(world: World) -> None:
    """With the organization's keyring the researcher signs as the organization: one envelope for all
    targets, its SHA-256 in every target, sealed to each chain head and bound to the descriptor's nonce."""
    ring_a, ring_b = await _publish(world, "a_node", "A"), await _publish(world, "b_node", "B")
    async with await _researcher(world) as researcher:
        researcher.use_keyring(ring_a)
        task = await researcher.create_task(world.collabs["ab"], "alpine:3", "m", args=[1], datasets=["d1"])
        _, stored = await world.call("b_node", "GET", f"/tasks/{task['id']}")
        document = DescriptorDocument.parse(stored["descriptor"])
        assert task["descriptor_digest"] == document.digest
        assert researcher.descriptor_digests[task["id"]] == document.digest
        _, runs = await world.call("b_node", "GET", f"/runs?task_id={task['id']}")
        blob_id = runs["data"][0]["input_blob_id"]
        _, sealed = await world.call("b_node", "GET", f"/blobs/{blob_id}")
        opened = await open_input(stored["descriptor"], sealed, ring_b, world.orgs["B"], _chains(world))
        body = opened.verified.body
        assert body.signer.role == "organization" and opened.verified.certificate is None
        assert body.signer.key_id == ring_a.current.key_id and body.reply_to == [ring_a.current.key_id]
        assert body.initiator.org == world.orgs["A"] and body.initiator.user == world.users["a_res"]
        assert (body.image, body.method, body.collaboration) == ("alpine:3", "m", world.collabs["ab"])
        assert [(t.org, t.datasets, t.key_id) for t in body.targets] == [
            (world.orgs["A"], ["d1"], ring_a.current.key_id),
            (world.orgs["B"], ["d1"], ring_b.current.key_id),
        ]
        assert len({t.input for t in body.targets}) == 1  # one envelope for every target
        with pytest.raises(CryptoError):  # bound: without the descriptor's nonce it does not open
            decrypt_bytes(sealed, ring_b, lambda _k: ring_a.current.public)
        with pytest.raises(CryptoError):
            decrypt_bytes(sealed, ring_b, lambda _k: ring_a.current.public, context=input_context("0" * 32))
        # the own organization was pinned from the keyring, the other at first sight (tofu)
        pins = {p.organization_id: p for p in researcher.trusted()}
        assert pins[world.orgs["A"]].root == ring_a.keys[0].key_id and "own" in pins[world.orgs["A"]].note
        assert pins[world.orgs["B"]].root == ring_b.keys[0].key_id
        stored = await asyncio.to_thread(Path(os.environ["VFED_TRUST_FILE"]).read_text)
        assert f"\n{world.orgs['B']} " in stored and f"\n{world.orgs['A']} " not in stored  # own: in memory


async def test_researcher_key_with_certificate(world: World) -> None:
    """A researcher's own certified key signs (role user, the certificate travels with the descriptor) and
    results come back sealed to it; an uncertified key is told what the admin has to run."""
    ring_a, ring_b = await _publish(world, "a_node", "A"), await _publish(world, "b_node", "B")
    mine = Keyring.generate()
    async with await _researcher(world) as researcher:
        researcher.use_keyring(mine)
        with pytest.raises(NotCertified, match=f"vnode users certify {world.users['a_res']} --key vfedpk1:"):
            await researcher.create_task(world.collabs["ab"], "alpine:3", "m")
    cert = certify(ring_a.current, world.orgs["A"], world.users["a_res"], "a_res", mine.current.public)
    path = f"/organizations/{world.orgs['A']}/certificates"
    status, body = await world.call("a_admin", "POST", path, json={"certificate": cert.model_dump()})
    assert status == 201, body
    async with await _researcher(world) as researcher:
        researcher.use_keyring(mine)
        task = await researcher.create_task(world.collabs["ab"], "alpine:3", "m", args=["r"])
        _, stored = await world.call("b_node", "GET", f"/tasks/{task['id']}")
        document = DescriptorDocument.parse(stored["descriptor"])
        assert document.certificate is not None and document.certificate.digest == cert.digest
        for node, ring in (("a_node", ring_a), ("b_node", ring_b)):
            await _finish(world, node, ring, task)
        _, runs = await world.call("b_node", "GET", f"/runs?task_id={task['id']}")
        opened_by = await open_input(
            stored["descriptor"],
            (await world.call("b_node", "GET", f"/blobs/{runs['data'][0]['input_blob_id']}"))[1],
            ring_b,
            world.orgs["B"],
            _chains(world),
        )
        verified = opened_by.verified
        assert verified.body.signer.role == "user" and verified.body.initiator.user == world.users["a_res"]
        assert verified.certificate is not None and verified.certificate.key == mine.current.public
        assert [k.key_id for k in verified.reply_keys] == [mine.current.key_id]
        values = await researcher.results(task)
        assert values == [{"node": "a_node", "args": ["r"]}, {"node": "b_node", "args": ["r"]}]

    # revoked: the client refuses to sign with it
    revocation = revoke(ring_a.current, world.orgs["A"], cert, "left")
    path = f"/organizations/{world.orgs['A']}/revocations"
    status, body = await world.call("a_admin", "POST", path, json={"revocation": revocation.model_dump()})
    assert status == 201, body
    async with await _researcher(world) as researcher:
        researcher.use_keyring(mine)
        with pytest.raises(TrustRefused, match="revoked") as refused:
            await researcher.create_task(world.collabs["ab"], "alpine:3", "m")
        assert refused.value.reason == "certificate-revoked"


async def test_an_organization_that_wants_results_sealed_to_it_too(world: World) -> None:
    """The certificate carries the organization's policy: the client then names the organization's key
    among the reply keys, and both the researcher and the organization open the result."""
    ring_a, ring_b = await _publish(world, "a_node", "A"), await _publish(world, "b_node", "B")
    mine = Keyring.generate()
    cert = certify(
        ring_a.current,
        world.orgs["A"],
        world.users["a_res"],
        "a_res",
        mine.current.public,
        seal_to_organization=True,
    )
    path = f"/organizations/{world.orgs['A']}/certificates"
    status, body = await world.call("a_admin", "POST", path, json={"certificate": cert.model_dump()})
    assert status == 201, body
    async with await _researcher(world) as researcher:
        researcher.use_keyring(mine)
        task = await researcher.create_task(
            world.collabs["ab"], "alpine:3", "m", args=["o"], organizations=[world.orgs["B"]]
        )
        run_id = await _finish(world, "b_node", ring_b, task)
        _, stored = await world.call("b_node", "GET", f"/tasks/{task['id']}")
        body_of = DescriptorDocument.parse(stored["descriptor"]).body()
        assert body_of.reply_to == [mine.current.key_id, ring_a.current.key_id]
        assert await researcher.results(task) == [{"node": "b_node", "args": ["o"]}]
        _, run = await world.call("b_node", "GET", f"/runs/{run_id}")
        status, sealed = await world.call("a_admin", "GET", f"/blobs/{run['result_blob_id']}")
        assert status == 200, sealed
        digest = DescriptorDocument.parse(stored["descriptor"]).digest
        context = result_context(digest, world.orgs["B"], run_id)
        opened = decrypt_bytes(sealed, ring_a, lambda _k: ring_b.current.public, context=context)
        assert json.loads(opened)["value"] == {"node": "b_node", "args": ["o"]}


async def test_a_result_moved_to_another_run_is_refused(world: World, tmp_path: Path) -> None:
    """Node B stores the result of its run of task 1 as the result of its run of task 2: the client refuses
    it, naming the run; a new client (the digest read back from the server) refuses it the same way."""
    ring_a, ring_b = await _publish(world, "a_node", "A"), await _publish(world, "b_node", "B")
    only_b = [world.orgs["B"]]
    async with await _researcher(world) as researcher:
        researcher.use_keyring(ring_a)
        first = await researcher.create_task(world.collabs["ab"], "alpine:3", "m", organizations=only_b)
        second = await researcher.create_task(world.collabs["ab"], "alpine:3", "m", organizations=only_b)
        await _finish(world, "b_node", ring_b, first)
        assert await researcher.results(first) == [{"node": "b_node", "args": []}]
        _, runs = await world.call("b_node", "GET", f"/runs?task_id={first['id']}")
        moved_blob = runs["data"][0]["result_blob_id"]
        _, runs = await world.call("b_node", "GET", f"/runs?task_id={second['id']}")
        run_id = runs["data"][0]["id"]
        await world.call("b_node", "POST", f"/runs/{run_id}/claim")
        status, _ = await world.call(
            "b_node", "PATCH", f"/runs/{run_id}", json={"status": "completed", "result_blob_id": moved_blob}
        )
        assert status == 200
        with pytest.raises(ResultMismatch, match=f"run {run_id} ") as moved:
            await researcher.results(second)
        assert moved.value.run_id == run_id and moved.value.organization_id == world.orgs["B"]
    async with await _researcher(world) as fresh:
        fresh.use_keyring(ring_a)
        assert await fresh.results(first) == [{"node": "b_node", "args": []}]
        with pytest.raises(ResultMismatch):
            await fresh.results(second)
    async with await _researcher(world) as stranger:  # another key: not its descriptor, not its results
        stranger.use_keyring(Keyring.generate())
        with pytest.raises(ClientError, match="not signed by a key of yours"):
            await stranger.results(first)


async def test_pinned_mode_and_a_mismatching_pin(world: World) -> None:
    ring_a, ring_b = await _publish(world, "a_node", "A"), await _publish(world, "b_node", "B")
    async with await _researcher(world, trust="pinned") as researcher:
        researcher.use_keyring(ring_a)
        with pytest.raises(TrustRefused, match=f"organization {world.orgs['B']} is not pinned") as refused:
            await researcher.create_task(world.collabs["ab"], "alpine:3", "m")
        assert refused.value.reason == "untrusted-key" and "vfed trust" in str(refused.value)
        researcher.trust(world.orgs["B"], fingerprint(ring_b.keys[0].public))
        task = await researcher.create_task(world.collabs["ab"], "alpine:3", "m")
        assert len(task["organization_ids"]) == 2

        other = Keyring.generate()
        researcher.trust(world.orgs["B"], fingerprint(other.current.public))
        with pytest.raises(TrustRefused, match="does not match the pinned fingerprint"):
            await researcher.create_task(world.collabs["ab"], "alpine:3", "m")
        rows = {r.id: r for r in await researcher.organizations_with_trust()}
        assert rows[world.orgs["A"]].pinned == "yes"
        assert rows[world.orgs["A"]].fingerprint == fingerprint(ring_a.keys[0].public)
        assert rows[world.orgs["B"]].pinned == "MISMATCH"
        assert rows[world.orgs["B"]].fingerprint == fingerprint(ring_b.keys[0].public)
        assert researcher.untrust(world.orgs["B"]) and not researcher.untrust(world.orgs["B"])
        rows = {r.id: r for r in await researcher.organizations_with_trust()}
        assert rows[world.orgs["B"]].pinned == "no"
    assert "MISMATCH" not in json.dumps({i: r.model_dump(mode="json") for i, r in rows.items()})


async def test_create_task_refusals(world: World) -> None:
    ring_a = await _publish(world, "a_node", "A")
    async with await _researcher(world) as researcher:
        researcher.use_keyring(ring_a)
        with pytest.raises(TrustRefused, match="published no key record"):  # B has not published one
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
    """The second task lists no members and reads no chain; after B rotates its key, the next task's first
    POST is refused (409 stale-key, nothing stored), the client lists and verifies again, seals to B's new
    head and the retry lands."""
    ring_a, ring_b = await _publish(world, "a_node", "A"), await _publish(world, "b_node", "B")
    async with await _researcher(world) as researcher:
        researcher.use_keyring(ring_a)
        listings: list[str] = []
        real_get_all, real_request = researcher.api.get_all, researcher.api.request

        def counted(path: str, *args: Any) -> Any:
            listings.append(path)
            return real_get_all(path, *args)

        def counted_request(method: str, path: str, **kwargs: Any) -> Any:
            if path.endswith("/key-records"):
                listings.append(path)
            return real_request(method, path, **kwargs)

        monkeypatch.setattr(researcher.api, "get_all", counted)
        monkeypatch.setattr(researcher.api, "request", counted_request)
        collab = world.collabs["ab"]
        await researcher.create_task(collab, "alpine:3", "m", args=[1])
        first = list(listings)
        await researcher.create_task(collab, "alpine:3", "m", args=[2])
        assert listings == first and first.count("/organizations") == 1

        old_b = Keyring(ring_b.keys)
        new_key = ring_b.rotate()
        rotation = rotation_record(world.orgs["B"], ring_b.keys[-2], new_key)
        path = f"/organizations/{world.orgs['B']}/key-records"
        status, _ = await world.call("b_node", "POST", path, json={"records": [rotation.model_dump()]})
        assert status == 201
        _, before = await world.call("a_res", "GET", f"/tasks?collaboration_id={collab}")
        task = await researcher.create_task(collab, "alpine:3", "m", args=[3])
        assert listings.count("/organizations") == 2
        _, after = await world.call("a_res", "GET", f"/tasks?collaboration_id={collab}")
        assert len(after["data"]) == len(before["data"]) + 1  # the refused attempt left no task

        _, runs = await world.call(
            "b_node", "GET", f"/runs?task_id={task['id']}&organization_id={world.orgs['B']}"
        )
        _, sealed = await world.call("b_node", "GET", f"/blobs/{runs['data'][0]['input_blob_id']}")
        _, stored = await world.call("b_node", "GET", f"/tasks/{task['id']}")
        opened = await open_input(stored["descriptor"], sealed, ring_b, world.orgs["B"], _chains(world))
        assert opened.task_input.args == [3]
        nonce = opened.verified.body.nonce
        with pytest.raises(CryptoError):
            decrypt_bytes(sealed, old_b, lambda _k: ring_a.current.public, context=input_context(nonce))
        assert TaskInput.from_json(
            decrypt_bytes(sealed, ring_b, lambda _k: ring_a.current.public, context=input_context(nonce))
        ).args == [3]
