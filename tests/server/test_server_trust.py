"""Key chains, researcher certificates and task descriptors on the server, on SQLite and PostgreSQL.

The server stores and serves signed entries verbatim; as an honest server it refuses what no node would
accept. What it serves is checked here with the same `vfed.common.trust` code nodes and clients run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import aiohttp
from sqlalchemy import func, select
from vserver_testkit import World, client, db_url, settings, world

from vfed.common.crypto import Keyring, OrgKey
from vfed.common.trust import (
    KIND_ROTATION,
    DescriptorDocument,
    SignedEntry,
    Target,
    certify,
    genesis_record,
    new_body,
    parse_records,
    records_for_keys,
    revoke,
    revoked_digests,
    rotation_record,
    sign_document,
    sign_entry,
    verify_chain,
)
from vfed.server.app import create_app
from vfed.server.config import Settings
from vfed.server.models import Task
from vfed.server.state import SESSIONS

__all__ = ["client", "db_url", "settings", "world"]


def wire(entries: list[SignedEntry]) -> list[dict[str, Any]]:
    return [e.model_dump(mode="json") for e in entries]


async def post_records(w: World, who: str, org: str, entries: list[SignedEntry]) -> tuple[int, Any]:
    return await w.call(
        who, "POST", f"/organizations/{w.orgs[org]}/key-records", json={"records": wire(entries)}
    )


async def publish_chain(w: World, org: str, rotations: int = 1) -> list[OrgKey]:
    """An organization's keyring with `rotations` rotations, its chain published by its node."""
    ring = Keyring.generate()
    for _ in range(rotations):
        ring.rotate()
    status, body = await post_records(w, f"{org.lower()}_node", org, records_for_keys(w.orgs[org], ring.keys))
    assert status == 201, body
    return ring.keys


async def test_key_records_append_serve_and_are_idempotent(world: World) -> None:
    org = world.orgs["A"]
    keys = Keyring.generate().keys
    keys += [OrgKey.generate(created_s=keys[0].created_s + i) for i in (1, 2)]
    records = records_for_keys(org, keys)
    status, body = await world.call("a_admin", "GET", f"/organizations/{org}/key-records")
    assert status == 200 and body == {"data": [], "head_key_id": None}

    status, body = await post_records(world, "a_admin", "A", records[:1])
    assert status == 201 and body["head_key_id"] == keys[0].key_id and body["data"] == wire(records[:1])
    status, shown = await world.call("a_res", "GET", f"/organizations/{org}")
    assert shown["key_id"] == keys[0].key_id and shown["public_key"] == keys[0].public.to_text()

    # the node publishes the whole chain: the stored genesis is skipped, the rotations appended in order
    status, body = await post_records(world, "a_node", "A", records)
    assert status == 201 and body["head_key_id"] == keys[2].key_id and body["data"] == wire(records)
    status, again = await post_records(world, "a_node", "A", records)
    assert status == 200 and again == body
    # a record of a key already on the chain, made again (another created_at), is not a second record
    status, again = await post_records(world, "a_node", "A", [genesis_record(org, keys[0], created_at=7)])
    assert status == 200 and again == body

    # peers (a researcher of B, B's node) read it; what they get verifies against the first key's pin
    for reader in ("b_res", "b_node", "root"):
        status, served = await world.call(reader, "GET", f"/organizations/{org}/key-records")
        assert status == 200 and served == body
    chain = verify_chain(org, parse_records(body["data"]), keys[0].key_id)
    assert chain.head == keys[2].public and [k.key for k in chain.keys] == [k.public for k in keys]
    status, _ = await world.call("c_res", "GET", f"/organizations/{org}/key-records")
    assert status == 404

    # the organization's current key follows the head; the key it replaced went into the history
    _, shown = await world.call("b_res", "GET", f"/organizations/{org}")
    assert shown["key_id"] == keys[2].key_id and shown["public_key"] == keys[2].public.to_text()
    _, history = await world.call("a_res", "GET", f"/organizations/{org}/keys")
    assert [k["key_id"] for k in history["data"]] == [keys[0].key_id]


async def test_key_records_that_would_not_verify_are_refused(world: World) -> None:
    org = world.orgs["A"]
    k1, k2, k3, other = (OrgKey.generate(created_s=1000 + i) for i in range(4))
    genesis, rotation = genesis_record(org, k1), rotation_record(org, k1, k2)

    async def refused(entries: list[Any], status: int, error: str) -> None:
        r, body = await world.call(
            "a_admin", "POST", f"/organizations/{org}/key-records", json={"records": entries}
        )
        assert (r, body["error"]) == (status, error), body

    await refused(wire([rotation]), 422, "invalid-key-record")  # its previous key is not stored
    await refused([{"v": 1, "kind": "key.genesis"}], 422, "invalid-key-record")
    await refused([{**genesis.model_dump(mode="json"), "v": 2}], 422, "invalid-key-record")
    await refused(wire([certify(k1, org, 1, "x", k2.public)]), 422, "invalid-key-record")
    await refused(wire([genesis_record(world.orgs["B"], k1)]), 422, "invalid-key-record")
    tampered = genesis.model_dump(mode="json")
    tampered["body"]["created_at"] += 1
    await refused([tampered], 422, "invalid-key-record")
    status, _ = await post_records(world, "a_admin", "A", [genesis])
    assert status == 201

    # a rotation is signed by the previous and the new key: neither alone, nor a stranger, will do
    body = {"org": org, "key": k2.public.to_text(), "prev": k1.key_id, "created_at": 1001}
    await refused(wire([sign_entry(KIND_ROTATION, body, [k2])]), 422, "invalid-key-record")
    await refused(wire([sign_entry(KIND_ROTATION, body, [k1])]), 422, "invalid-key-record")
    await refused(wire([sign_entry(KIND_ROTATION, body, [other, k2])]), 422, "invalid-key-record")
    no_prev = {k: v for k, v in body.items() if k != "prev"}
    await refused(wire([sign_entry(KIND_ROTATION, no_prev, [k1, k2])]), 422, "invalid-key-record")
    await refused(wire([genesis_record(org, other)]), 409, "key-chain-conflict")

    status, _ = await post_records(world, "a_admin", "A", [rotation])
    assert status == 201
    # a second rotation from k1 would fork the chain; the request is refused whole (k2 -> k3 is not kept)
    await refused(
        wire([rotation_record(org, k2, k3), rotation_record(org, k1, other)]), 409, "key-chain-fork"
    )
    await refused(wire([rotation_record(org, k2, k1)]), 422, "invalid-key-record")  # a loop
    _, served = await world.call("a_res", "GET", f"/organizations/{org}/key-records")
    assert served == {"data": wire([genesis, rotation]), "head_key_id": k2.key_id}
    status, body = await world.call(
        "a_admin", "POST", f"/organizations/{org}/key-records", json={"records": []}
    )
    assert status == 422 and body["error"] == "validation-error"


async def test_who_may_publish_key_records(world: World) -> None:
    records = records_for_keys(world.orgs["A"], [OrgKey.generate(created_s=5)])
    for who, status in (("a_res", 403), ("a_view", 403), ("b_admin", 403), ("b_res", 403), ("b_node", 403)):
        assert (await post_records(world, who, "A", records))[0] == status, who
    assert (await post_records(world, "c_admin", "A", records))[0] == 404  # A is invisible to C
    assert (await post_records(world, "a_node", "A", records))[0] == 201
    records = records_for_keys(world.orgs["B"], [OrgKey.generate(created_s=5)])
    assert (await post_records(world, "root", "B", records))[0] == 201


async def test_racing_rotations_store_no_fork(aiohttp_client: Any, settings: Settings, world: World) -> None:
    """Two servers on one database get different rotations from the same key at once: one wins, no fork."""
    servers = [world.client, await aiohttp_client(create_app(settings))]
    org = world.orgs["A"]
    head = OrgKey.generate(created_s=1)
    assert (await post_records(world, "a_node", "A", [genesis_record(org, head)]))[0] == 201
    headers = await world.h("a_node2")

    async def post(c: Any, body: dict[str, Any]) -> tuple[int, Any]:
        r = await c.post(f"/api/v1/organizations/{org}/key-records", json=body, headers=headers)
        return r.status, await r.json()

    for _ in range(3):
        news = [OrgKey.generate(created_s=2) for _ in range(8)]
        bodies = [{"records": wire([rotation_record(org, head, new)])} for new in news]
        answers = await asyncio.gather(*(post(servers[i % 2], b) for i, b in enumerate(bodies)))
        assert sorted(status for status, _ in answers) == [201] + [409] * 7, answers
        head = next(new for new, (status, _) in zip(news, answers, strict=True) if status == 201)
    _, served = await world.call("a_res", "GET", f"/organizations/{org}/key-records")
    chain = verify_chain(org, parse_records(served["data"]), None)  # a stored fork would raise ChainForked
    assert len(served["data"]) == 4 and chain.head == head.public == chain.keys[-1].key
    assert served["head_key_id"] == head.key_id


async def test_certificates_and_revocations(world: World) -> None:
    org, user = world.orgs["A"], world.users["a_res"]
    researcher = OrgKey.generate()
    path = f"/organizations/{org}/certificates"
    early = certify(OrgKey.generate(), org, user, "a_res", researcher.public)
    status, body = await world.call(
        "a_admin", "POST", path, json={"certificate": early.model_dump(mode="json")}
    )
    assert status == 422 and "key-records" in body["detail"]  # no chain published yet: nothing signed it
    k1, k2 = await publish_chain(world, "A")
    cert = certify(k2, org, user, "a_res", researcher.public)

    status, row = await world.call(
        "a_admin", "POST", path, json={"certificate": cert.model_dump(mode="json")}
    )
    assert status == 201, row
    assert (row["organization_id"], row["user_id"], row["key_id"]) == (org, user, researcher.key_id)
    assert row["certificate"] == cert.model_dump(mode="json") and row["digest"] == cert.digest
    assert row["revocation"] is None and row["revoked_at"] is None
    status, body = await world.call(
        "a_node", "POST", path, json={"certificate": cert.model_dump(mode="json")}
    )
    assert status == 409 and body["error"] == "exists"
    older = certify(
        k1, org, world.users["a_res2"], "a_res2", OrgKey.generate().public
    )  # any key of the chain
    status, _ = await world.call("a_node", "POST", path, json={"certificate": older.model_dump(mode="json")})
    assert status == 201

    refusals = [
        ("a_admin", certify(OrgKey.generate(), org, user, "a_res", researcher.public), 422),  # forged
        ("a_admin", certify(k2, org, world.users["b_res"], "b_res", researcher.public), 422),  # not A's user
        ("a_admin", certify(k2, world.orgs["B"], user, "a_res", researcher.public), 422),  # for B
        ("a_admin", genesis_record(org, k1), 422),  # not a certificate
        ("a_res", certify(k2, org, user, "a_res", OrgKey.generate().public), 403),
        ("b_admin", certify(k2, org, user, "a_res", OrgKey.generate().public), 403),
        ("c_admin", certify(k2, org, user, "a_res", OrgKey.generate().public), 404),
    ]
    for who, entry, expected in refusals:
        status, body = await world.call(
            who, "POST", path, json={"certificate": entry.model_dump(mode="json")}
        )
        assert status == expected, (who, body)
        assert expected != 422 or body["error"] == "invalid-certificate"

    status, listed = await world.call("b_res", "GET", path)
    assert status == 200 and [c["digest"] for c in listed["data"]] == [cert.digest, older.digest]
    _, mine = await world.call("a_res", "GET", f"{path}?user_id={user}")
    assert [c["digest"] for c in mine["data"]] == [cert.digest]
    _, by_key = await world.call("a_res", "GET", f"{path}?key_id={researcher.key_id}")
    assert [c["digest"] for c in by_key["data"]] == [cert.digest]
    assert (await world.call("a_res", "GET", f"{path}?key_id=nothex"))[0] == 422
    assert (await world.call("c_res", "GET", path))[0] == 404

    revocation = revoke(k2, org, cert, "left the project")
    revocations = f"/organizations/{org}/revocations"
    status, row = await world.call(
        "a_node", "POST", revocations, json={"revocation": revocation.model_dump(mode="json")}
    )
    assert status == 201 and row["revocation"] == revocation.model_dump(mode="json") and row["revoked_at"]
    status, _ = await world.call(
        "a_admin", "POST", revocations, json={"revocation": revocation.model_dump(mode="json")}
    )
    assert status == 200  # the same revocation again
    status, body = await world.call(
        "a_admin",
        "POST",
        revocations,
        json={"revocation": revoke(k2, org, cert, "again").model_dump(mode="json")},
    )
    assert status == 409 and body["error"] == "already-revoked"
    unknown = revoke(k2, org, certify(k2, org, user, "a_res", OrgKey.generate().public))
    status, _ = await world.call(
        "a_admin", "POST", revocations, json={"revocation": unknown.model_dump(mode="json")}
    )
    assert status == 404
    forged = revoke(OrgKey.generate(), org, older)
    status, body = await world.call(
        "a_admin", "POST", revocations, json={"revocation": forged.model_dump(mode="json")}
    )
    assert status == 422 and body["error"] == "invalid-revocation"
    assert (
        await world.call(
            "b_admin", "POST", revocations, json={"revocation": revocation.model_dump(mode="json")}
        )
    )[0] == 403

    status, served = await world.call("b_node", "GET", revocations)
    assert status == 200 and served == {"data": [revocation.model_dump(mode="json")]}
    _, records = await world.call("b_node", "GET", f"/organizations/{org}/key-records")
    chain = verify_chain(org, parse_records(records["data"]), k1.key_id)
    assert revoked_digests([SignedEntry.parse(e) for e in served["data"]], chain) == {cert.digest}
    _, listed = await world.call("a_res", "GET", path)
    assert [c["revocation"] is not None for c in listed["data"]] == [True, False]


def descriptor(
    w: World, signer: OrgKey, orgs: list[str], *, image: str = "alpine:3", collab: str = "ab"
) -> str:
    """A researcher-signed descriptor document, as text that is deliberately not canonical (indented)."""
    targets = [
        Target(org=w.orgs[o], input=hashlib.sha256(o.encode()).hexdigest(), key_id=signer.key_id)
        for o in orgs
    ]
    body = new_body(
        collaboration=w.collabs[collab],
        initiator_org=w.orgs["A"],
        initiator_user=w.users["a_res"],
        signer=signer.public,
        signer_role="user",
        image=image,
        method="central",
        targets=targets,
    )
    cert = certify(signer, w.orgs["A"], w.users["a_res"], "a_res", signer.public)
    document = sign_document(body, signer, certificate=cert)
    return json.dumps(json.loads(document.to_json()), indent=1)


async def test_descriptor_is_stored_verbatim_and_reaches_the_node(world: World) -> None:
    signer = OrgKey.generate()
    text = descriptor(world, signer, ["A", "B"])
    task = await world.task("a_res", "ab", ["A", "B"], descriptor=text)
    assert task["descriptor"] == text
    status, shown = await world.call("b_res", "GET", f"/tasks/{task['id']}")
    assert status == 200 and shown["descriptor"] == text
    _, listed = await world.call("a_res", "GET", "/tasks")
    assert {t["id"]: t["descriptor"] for t in listed["data"]}[task["id"]] == text
    _, waited = await world.call("a_res", "GET", f"/tasks/{task['id']}/wait?timeout_s=0")
    assert waited["task"]["descriptor"] == text

    _, runs = await world.call("b_node", "GET", f"/runs?task_id={task['id']}")
    status, claimed = await world.call("b_node", "POST", f"/runs/{runs['data'][0]['id']}/claim")
    assert status == 200 and claimed["task"]["descriptor"] == text
    document = DescriptorDocument.parse(claimed["task"]["descriptor"])
    assert document.body().image == "alpine:3" and document.descriptor.signed_by(signer.public)

    # the run token a claim brings reads the collaboration's key records, but publishes none
    world._tokens["run"] = claimed["run_token"]["token"]
    assert (await world.call("run", "GET", f"/organizations/{world.orgs['A']}/key-records"))[0] == 200
    assert (await post_records(world, "run", "B", records_for_keys(world.orgs["B"], [signer])))[0] == 403

    plain = await world.task("a_res", "ab", ["A"])
    assert plain["descriptor"] is None


async def test_descriptor_in_the_multipart_form(world: World) -> None:
    text = descriptor(world, OrgKey.generate(), ["A"])
    fields = {
        "collaboration_id": world.collabs["ab"],
        "image": "alpine:3",
        "organizations": [{"id": world.orgs["A"]}],
        "descriptor": text,
    }
    form = aiohttp.FormData()
    form.add_field("task", json.dumps(fields), content_type="application/json")
    form.add_field("input", b"sealed", content_type="application/octet-stream", filename="input")
    status, task = await world.call("a_res", "POST", "/tasks", data=form)
    assert status == 201 and task["descriptor"] == text
    _, shown = await world.call("a_res", "GET", f"/tasks/{task['id']}")
    assert shown["descriptor"] == text


async def test_descriptor_refusals_store_nothing(client: Any, world: World) -> None:
    signer = OrgKey.generate()
    cases = [
        ("not json", ["A"], "invalid-descriptor"),
        ("[1, 2]", ["A"], "invalid-descriptor"),
        ('{"descriptor": 1}', ["A"], "invalid-descriptor"),
        ("", ["A"], "invalid-descriptor"),
        (descriptor(world, signer, ["A"], image="evil:1"), ["A"], "descriptor-mismatch"),
        (descriptor(world, signer, ["A"]), ["A", "B"], "descriptor-mismatch"),
        (descriptor(world, signer, ["A", "B"]), ["A"], "descriptor-mismatch"),
        (descriptor(world, signer, ["A"], collab="cx"), ["A"], "descriptor-mismatch"),
    ]
    for text, orgs, error in cases:
        payload = {
            "collaboration_id": world.collabs["ab"],
            "image": "alpine:3",
            "organizations": [
                {"id": world.orgs[o], "input_blob_id": await world.upload("a_res", b"x")} for o in orgs
            ],
            "descriptor": text,
        }
        status, body = await world.call("a_res", "POST", "/tasks", json=payload)
        assert (status, body["error"]) == (422, error), (text[:40], body)
    async with client.app[SESSIONS]() as s:
        assert (await s.execute(select(func.count()).select_from(Task))).scalar_one() == 0


async def test_openapi_documents_the_trust_endpoints(client: Any) -> None:
    doc = await (await client.get("/api/v1/openapi.json")).json()
    for path in ("key-records", "certificates", "revocations"):
        assert set(doc["paths"][f"/api/v1/organizations/{{id}}/{path}"]) == {"get", "post"}
    assert "descriptor" in doc["components"]["schemas"]["TaskIn"]["properties"]
    assert "descriptor" in doc["components"]["schemas"]["Task"]["properties"]
