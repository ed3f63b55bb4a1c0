"""The server's embedded ledger, on SQLite and PostgreSQL: appends are verified and chained one after the
other, reads page through stored texts, key records travel onto the ledgers of their organization's
collaborations, and what the server serves verifies with the `LedgerState` nodes and clients run.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from tests import infra
from vserver_testkit import JWT_SECRET, World, client, db_url, scrape_metrics, seed, settings, world

from vfed.common.crypto import Keyring, OrgKey
from vfed.common.ledger import (
    EMPTY_HEAD,
    EmbeddedLedger,
    Head,
    LedgerState,
    LedgerView,
    checkpoint_entry,
    dataset_entry,
    lease_entry,
)
from vfed.common.trust import SignedEntry, certify, records_for_keys, revoke, rotation_record
from vfed.server.app import create_app
from vfed.server.config import MqttSettings, Settings
from vfed.server.importer import ImportFile, run_import
from vfed.server.state import DOORBELL, SESSIONS

__all__ = ["client", "db_url", "settings", "world"]


def wire(entry: SignedEntry) -> dict[str, Any]:
    return entry.model_dump(mode="json")


class WorldTransport:
    """The ledger client's transport over the test client, as one caller of the world."""

    def __init__(self, w: World, who: str) -> None:
        self.w, self.who = w, who

    async def get_json(self, path: str, params: dict[str, str]) -> Any:
        status, body = await self.w.call(self.who, "GET", path, params=params)
        assert status == 200, body
        return body

    async def post_json(self, path: str, body: Any) -> Any:
        status, answer = await self.w.call(self.who, "POST", path, json=body)
        assert status == 201, answer
        return answer


class Fed:
    """The world's organizations with key chains published, and a verifying view per caller."""

    def __init__(self, w: World) -> None:
        self.w = w
        self.rings: dict[str, Keyring] = {}

    async def publish(self, org: str, rotations: int = 1) -> Keyring:
        ring = Keyring.generate()
        for _ in range(rotations):
            ring.rotate()
        records = [wire(r) for r in records_for_keys(self.w.orgs[org], ring.keys)]
        status, body = await self.w.call(
            f"{org.lower()}_node" if org != "C" else "c_node",
            "POST",
            f"/organizations/{self.w.orgs[org]}/key-records",
            json={"records": records},
        )
        assert status == 201, body
        self.rings[org] = ring
        return ring

    def pins(self) -> dict[int, str | None]:
        return {self.w.orgs[o]: r.keys[0].key_id for o, r in self.rings.items()}

    def view(self, who: str, collab: str = "ab") -> LedgerView:
        cid = self.w.collabs[collab]
        pins = self.pins()
        return LedgerView(
            EmbeddedLedger(WorldTransport(self.w, who), cid),
            lambda: LedgerState(cid, anchors=pins.get),
        )

    def checkpoint(self, org: str, seen: Head, collab: str = "ab", now: float | None = None) -> SignedEntry:
        return checkpoint_entry(
            self.rings[org].current,
            collaboration=self.w.collabs[collab],
            organization=self.w.orgs[org],
            seen=seen,
            now=now,
        )


async def read_all(w: World, who: str, collab: str, after: int = 0, limit: int = 1000) -> Any:
    status, body = await w.call(
        who, "GET", f"/collaborations/{w.collabs[collab]}/ledger?after={after}&limit={limit}"
    )
    assert status == 200, body
    return body


async def post(
    w: World, who: str, entry: SignedEntry | dict[str, Any], collab: str = "ab"
) -> tuple[int, Any]:
    raw = wire(entry) if isinstance(entry, SignedEntry) else entry
    return await w.call(who, "POST", f"/collaborations/{w.collabs[collab]}/ledger", json={"entry": raw})


async def test_append_and_read_back_in_pages(world: World) -> None:
    fed = Fed(world)
    await fed.publish("A")
    await fed.publish("B")
    await fed.publish("C")
    view = fed.view("a_node")
    await view.sync()
    assert view.head.seq == 4  # A's and B's genesis and rotation, carried from their key-records endpoint
    dataset = dataset_entry(
        fed.rings["A"].current,
        collaboration=world.collabs["ab"],
        organization=world.orgs["A"],
        label="cohort",
        seen=view.head,
        description="a cohort",
    )
    status, placed = await post(world, "a_admin", dataset)
    assert status == 201 and placed["seq"] == 5, placed
    posted = [dataset]
    b_view = fed.view("b_node")
    for i in range(7):
        by, org = (b_view, "B") if i % 2 else (view, "A")
        await by.sync()
        entry = fed.checkpoint(org, by.head, now=1000 + i)
        head = await by.append(entry)  # read back and verified at the place the server reported
        assert head.seq == 6 + i
        posted.append(entry)

    full = await read_all(world, "b_res", "ab")
    assert full["collaboration_id"] == world.collabs["ab"] and full["length"] == 12
    assert [e["seq"] for e in full["entries"]] == list(range(1, 13))
    assert [e["entry"] for e in full["entries"][4:]] == [wire(e) for e in posted]
    assert full["entries"][4]["hash"] == placed["hash"]
    pages, after = [], 0
    while True:
        page = await read_all(world, "a_view", "ab", after=after, limit=5)
        assert page["length"] == 12
        if not page["entries"]:
            break
        pages += page["entries"]
        after = page["entries"][-1]["seq"]
    assert pages == full["entries"]
    assert (await read_all(world, "a_res", "ab", after=12))["entries"] == []
    assert (await read_all(world, "root", "ab", after=3, limit=2))["entries"] == full["entries"][3:5]

    fresh = fed.view("b_node")
    assert await fresh.sync() == 12 and fresh.head == view.head
    report = await fresh.verify_full()
    assert report.length == 12 and report.problems == ()
    # C's chain is on C's collaboration's ledger only
    cx = await read_all(world, "c_res", "cx")
    assert [e["entry"]["kind"] for e in cx["entries"]] == ["key.genesis", "key.rotation"]

    text = await scrape_metrics(world.client)
    assert 'vserver_ledger_appends_total{kind="ledger.checkpoint"} 7.0' in text
    assert 'vserver_ledger_appends_total{kind="dataset.registered"} 1.0' in text
    assert 'vserver_ledger_appends_total{kind="key.genesis"} 3.0' in text


async def test_refusals_answer_json_reasons(world: World) -> None:
    fed = Fed(world)
    await fed.publish("A")
    b_ring = await fed.publish("B")
    ab = world.collabs["ab"]
    path = f"/collaborations/{ab}/ledger"

    for query in ("after=-1", "limit=0", "limit=5001", "after=x", "after=1&after=2", "since=3"):
        status, body = await world.call("a_res", "GET", f"{path}?{query}")
        assert status == 400 and body["error"] == "bad-query" and body["detail"], (query, body)
    for who in ("c_res", "c_admin", "c_node"):  # not a member: the ledger does not exist for them
        status, body = await world.call(who, "GET", path)
        assert (status, body["error"]) == (404, "not-found"), who
        status, body = await post(world, who, fed.checkpoint("A", EMPTY_HEAD))
        assert status == 404, who
    status, _ = await world.call("root", "GET", "/collaborations/9999/ledger")
    assert status == 404

    async def refused(who: str, entry: Any, status: int, error: str, *words: str) -> None:
        code, body = await post(world, who, entry)
        assert (code, body["error"]) == (status, error), body
        assert all(w in body["detail"] for w in words), body

    genesis = records_for_keys(world.orgs["A"], [OrgKey.generate()])[0]
    await refused("a_node", genesis, 400, "ledger-entry-invalid", "key-records")
    await refused("a_node", {"v": 1}, 400, "ledger-entry-invalid")
    await refused(
        "a_node", {"v": 1, "kind": "lease.sold", "body": {}, "sigs": []}, 400, "ledger-entry-invalid"
    )
    status, body = await world.call("a_node", "POST", path, json={"entry": None})
    assert status == 422, body

    head = (await read_all(world, "a_res", "ab"))["entries"][-1]
    seen = Head(seq=head["seq"], hash=head["hash"])
    # B's checkpoint, posted by a caller of A: 403; a viewer of B may not append at all
    await refused("a_node", fed.checkpoint("B", seen), 403, "forbidden", "organization")
    await refused("a_view", fed.checkpoint("A", seen), 403, "forbidden")
    # A's dataset signed with B's key: the verifier's message
    forged = dataset_entry(
        b_ring.current, collaboration=ab, organization=world.orgs["A"], label="x", seen=seen
    )
    await refused("a_node", forged, 400, "ledger-entry-invalid", "not signed by a key of organization")
    wrong_head = Head(seq=seen.seq, hash="ab" * 32)
    await refused("a_node", fed.checkpoint("A", wrong_head), 400, "ledger-fork", f"entry {seen.seq}")
    await refused(
        "a_node", fed.checkpoint("A", seen, collab="cx"), 400, "ledger-entry-invalid", "collaboration"
    )
    # a lease signed with the organization's own key instead of an admin's certified key
    dataset = dataset_entry(
        fed.rings["A"].current, collaboration=ab, organization=world.orgs["A"], label="d", seen=seen
    )
    status, placed = await post(world, "a_node", dataset)
    assert status == 201, placed
    lease = lease_entry(
        fed.rings["A"].current,
        collaboration=ab,
        dataset=dataset.digest,
        owner=world.orgs["A"],
        grantee=world.orgs["B"],
        expires_at=int(time.time()) + 3600,
        by_user=world.users["a_admin"],
        certificate="0" * 64,
        seen=Head(seq=placed["seq"], hash=placed["hash"]),
    )
    await refused("a_node", lease, 400, "ledger-entry-invalid", "own key")
    await refused("b_node", lease, 403, "forbidden", f"organization {world.orgs['A']}")  # B leases A's data?
    entry = fed.checkpoint("A", seen)
    assert (await post(world, "a_node", entry))[0] == 201
    await refused("a_node2", entry, 409, "exists", "already")
    assert (await read_all(world, "a_res", "ab"))["length"] == seen.seq + 2


async def test_key_records_are_carried_onto_ledgers(world: World) -> None:
    fed = Fed(world)
    a_ring = await fed.publish("A")
    await fed.publish("C")
    org_a = world.orgs["A"]
    researcher = OrgKey.generate()
    cert = certify(a_ring.current, org_a, world.users["a_res"], "a_res", researcher.public)
    status, body = await world.call(
        "a_admin", "POST", f"/organizations/{org_a}/certificates", json={"certificate": wire(cert)}
    )
    assert status == 201, body
    revocation = revoke(a_ring.current, org_a, cert, "left")
    status, body = await world.call(
        "a_admin", "POST", f"/organizations/{org_a}/revocations", json={"revocation": wire(revocation)}
    )
    assert status == 201, body
    status, body = await world.call(  # the same again: stored already, not carried twice
        "a_admin", "POST", f"/organizations/{org_a}/revocations", json={"revocation": wire(revocation)}
    )
    assert status == 200, body
    a_records = [wire(r) for r in records_for_keys(org_a, a_ring.keys)]
    carried = [*a_records, wire(cert), wire(revocation)]
    assert [e["entry"] for e in (await read_all(world, "a_res", "ab"))["entries"]] == carried

    # A joins C's collaboration: its records, certificate and revocation follow C's, oldest first
    cx = world.collabs["cx"]
    status, body = await world.call(
        "root", "PATCH", f"/collaborations/{cx}", json={"organization_ids": [world.orgs["C"], org_a]}
    )
    assert status == 200, body
    c_records = [wire(r) for r in records_for_keys(world.orgs["C"], fed.rings["C"].keys)]
    assert [e["entry"] for e in (await read_all(world, "c_res", "cx"))["entries"]] == c_records + carried
    status, _ = await world.call("root", "PATCH", f"/collaborations/{cx}", json={"name": "cx2"})
    assert status == 200
    assert (await read_all(world, "c_res", "cx"))["length"] == len(c_records + carried)

    # a new rotation of A lands on both of its ledgers
    new_key = OrgKey.generate()
    rotation = rotation_record(org_a, a_ring.current, new_key)
    status, body = await world.call(
        "a_node", "POST", f"/organizations/{org_a}/key-records", json={"records": [wire(rotation)]}
    )
    assert status == 201, body
    for collab in ("ab", "cx"):
        assert (await read_all(world, "a_res", collab))["entries"][-1]["entry"] == wire(rotation)

    # B joins through `vserver import`; a new collaboration made through the API starts with its members'
    async with world.client.app[SESSIONS]() as s:
        await run_import(
            s, ImportFile.model_validate({"collaborations": [{"name": "cx2", "organizations": ["org-B"]}]})
        )
    b_ring = await fed.publish("B")  # B's chain is published after it joined: carried right away
    b_records = [wire(r) for r in records_for_keys(world.orgs["B"], b_ring.keys)]
    assert [e["entry"] for e in (await read_all(world, "root", "cx"))["entries"]][-2:] == b_records
    async with world.client.app[SESSIONS]() as s:
        spec = {"collaborations": [{"name": "cx2", "organizations": ["org-A", "org-B", "org-C"]}]}
        await run_import(s, ImportFile.model_validate(spec))  # nothing new: nothing appended
    assert (await read_all(world, "root", "cx"))["length"] == len(c_records + carried) + 1 + 2
    status, made = await world.call(
        "root", "POST", "/collaborations", json={"name": "new", "organization_ids": [world.orgs["B"], org_a]}
    )
    assert status == 201, made
    status, fresh = await world.call("root", "GET", f"/collaborations/{made['id']}/ledger")
    assert [e["entry"] for e in fresh["entries"]] == [
        *a_records,
        wire(rotation),
        wire(cert),
        wire(revocation),
        *b_records,
    ]

    fed.rings["A"] = Keyring([*a_ring.keys, new_key])
    world.collabs["new"] = made["id"]
    for collab in ("ab", "cx", "new"):  # every ledger verifies, with certificates and revocations counted
        view = fed.view("root", collab)
        await view.sync()
        assert view.state.problems == [] and view.head.seq > 0
        assert view.state.certificates(org_a) == [cert]


async def test_concurrent_appends_get_consecutive_places(
    aiohttp_client: Any, settings: Settings, world: World
) -> None:
    """Several callers on two server processes sharing the database append at once."""
    fed = Fed(world)
    await fed.publish("A")
    await fed.publish("B")
    other = await aiohttp_client(create_app(settings))
    callers = ["a_node", "a_node2", "b_node", "a_admin", "b_admin", "a_res"]
    headers = {who: await world.h(who) for who in callers}
    start = (await read_all(world, "root", "ab"))["length"]
    seen = Head(seq=start, hash=(await read_all(world, "root", "ab"))["entries"][-1]["hash"])

    async def one(i: int) -> tuple[int, Any]:
        who = callers[i % len(callers)]
        entry = fed.checkpoint("A" if who.startswith("a") else "B", seen, now=2000 + i)
        http = world.client if i % 2 else other
        r = await http.post(
            f"/api/v1/collaborations/{world.collabs['ab']}/ledger",
            json={"entry": wire(entry)},
            headers=headers[who],
        )
        return r.status, await r.json()

    answers = await asyncio.gather(*(one(i) for i in range(24)))
    assert all(status == 201 for status, _ in answers), answers
    assert sorted(a["seq"] for _, a in answers) == list(range(start + 1, start + 25))
    view = fed.view("b_res")
    assert await view.sync() == start + 24
    placed = {a["seq"]: a["hash"] for _, a in answers}
    assert all(view.state.hash_at(seq) == h for seq, h in placed.items())


async def test_appends_continue_after_a_restart(
    aiohttp_client: Any, settings: Settings, world: World
) -> None:
    fed = Fed(world)
    a_ring = await fed.publish("A")
    admin = OrgKey.generate()
    cert = certify(
        a_ring.current, world.orgs["A"], world.users["a_admin"], "a_admin", admin.public, roles=["org-admin"]
    )
    status, body = await world.call(
        "a_node", "POST", f"/organizations/{world.orgs['A']}/certificates", json={"certificate": wire(cert)}
    )
    assert status == 201, body
    view = fed.view("a_node")
    await view.sync()
    ab = world.collabs["ab"]
    dataset = dataset_entry(
        a_ring.current, collaboration=ab, organization=world.orgs["A"], label="d", seen=view.head
    )
    await view.append(dataset)
    lease = lease_entry(
        admin,
        collaboration=ab,
        dataset=dataset.digest,
        owner=world.orgs["A"],
        grantee=world.orgs["B"],
        expires_at=int(time.time()) + 3600,
        by_user=world.users["a_admin"],
        certificate=cert.digest,
        seen=view.head,
    )
    await view.append(lease)
    before = view.head
    await world.client.close()

    again = await aiohttp_client(create_app(settings))  # a new process: its ledger states start empty
    world.client, world._tokens = again, {}
    status, body = await post(world, "a_node", lease)
    assert (status, body["error"]) == (409, "exists")
    entry = fed.checkpoint("A", before)
    status, placed = await post(world, "a_admin", entry)
    assert status == 201 and placed["seq"] == before.seq + 1, placed
    await view.sync()  # the view that synced before the restart goes on from where it was
    assert view.head == Head(seq=placed["seq"], hash=placed["hash"])
    assert view.state.leases[lease.digest].grantee == world.orgs["B"]
    # the new process verifies appends against what it rebuilt: a lease needs the certified admin still
    extend_by_org = lease_entry(
        a_ring.current,
        collaboration=ab,
        dataset=dataset.digest,
        owner=world.orgs["A"],
        grantee=world.orgs["B"],
        expires_at=int(time.time()) + 7200,
        by_user=world.users["a_admin"],
        certificate=cert.digest,
        seen=view.head,
    )
    status, body = await post(world, "a_node", extend_by_org)
    assert status == 400 and "org admin" in body["detail"], body


@pytest.mark.mqtt
async def test_an_append_rings_every_node_of_the_collaboration(
    aiohttp_client: Any, tmp_path: Path, mqtt_broker: infra.Broker
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        jwt_secret=JWT_SECRET,
        mqtt=MqttSettings(url=mqtt_broker.url),
    )
    w = await seed(await aiohttp_client(create_app(settings)))
    fed = Fed(w)
    await fed.publish("A")
    await asyncio.wait_for(w.client.app[DOORBELL].connected.wait(), 20)
    async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port) as sub:
        await sub.subscribe("vfed/nodes/#", qos=1)
        head = (await read_all(w, "a_res", "ab"))["entries"][-1]
        status, placed = await post(
            w, "a_node", fed.checkpoint("A", Head(seq=head["seq"], hash=head["hash"]))
        )
        assert status == 201, placed
        got: dict[str, Any] = {}
        async with asyncio.timeout(20):
            async for msg in sub.messages:
                message = json.loads(bytes(msg.payload))  # type: ignore[arg-type]
                if message.get("seq") == placed["seq"]:  # not a ring of the key records published before
                    got[str(msg.topic)] = message
                if len(got) == 3:
                    break
    ab = w.collabs["ab"]
    message = {
        "event": "ledger",
        "collaboration_id": ab,
        "seq": placed["seq"],
        "run_id": None,
        "task_id": None,
    }
    assert got == {f"vfed/nodes/{w.nodes[n]}": message for n in ("a_node", "a_node2", "b_node")}
