"""The researcher's side of the ledger against the real server: what `datasets()` / `leases()` and the
`vfed datasets|leases list` commands show to the grantee (and only to it), the head a descriptor carries,
and a server that rewrites its ledger caught at the client's next read, with the entry named."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from tests.node.node_harness import PASSWORD, Server, server_sql

from vfed.client.catalog import LeaseStatus
from vfed.client.cli_ledger import Duration
from vfed.client.client import AsyncClient
from vfed.client.errors import (
    ClientError,
    LedgerEntryInvalid,
    LedgerForked,
    LedgerTampered,
    LedgerUnavailable,
)
from vfed.client.ledger import HEAD_REUSE_S
from vfed.common.crypto import Keyring, OrgKey
from vfed.common.ledger import (
    DatasetUse,
    EmbeddedLedger,
    Head,
    LedgerState,
    LedgerView,
    dataset_entry,
    lease_entry,
    link,
    receipt_entry,
    revoke_entry,
)
from vfed.common.ledger.metadata import ColumnSummary, DatasetMetadata, seal_metadata
from vfed.common.trust import DescriptorDocument, SignedEntry, certify, fingerprint, records_for_keys
from vfed.node.server_api import NodeClient
from vfed.server.app import create_app

CID = 1
IMAGE = "sha256:" + "ab" * 32
DAY_S = 86400


class NodeTransport:
    """The ledger Transport over an organization's node session (how org admins' tools append)."""

    def __init__(self, node: NodeClient) -> None:
        self.node = node

    async def get_json(self, path: str, params: dict[str, str]) -> Any:
        return await self.node.request("GET", path, params=params)

    async def post_json(self, path: str, body: Any) -> Any:
        return await self.node.request("POST", path, json=body)


@dataclass
class World:
    """Organizations a (owns `patients` and `genomes`), b (the researcher's) and c (owns `claims`); an org
    admin of a with a certified key; res-b's own key, certified by b."""

    tmp: Path
    server: Server
    nodes: dict[str, NodeClient]
    orgs: dict[str, int]
    rings: dict[str, Keyring]
    users: dict[str, int]
    admin: OrgKey
    admin_cert: SignedEntry
    researcher_key_file: Path
    views: dict[str, LedgerView] = field(default_factory=dict)
    leases: dict[str, SignedEntry] = field(default_factory=dict)
    datasets: dict[str, SignedEntry] = field(default_factory=dict)
    now: int = field(default_factory=lambda: int(time.time()))

    def view(self, org: str) -> LedgerView:
        if org not in self.views:
            pins = {
                o: ring.keys[0].key_id
                for o, ring in zip(self.orgs.values(), self.rings.values(), strict=True)
            }
            self.views[org] = LedgerView(
                EmbeddedLedger(NodeTransport(self.nodes[org]), CID),
                lambda: LedgerState(CID, anchors=pins.get),
            )
        return self.views[org]

    async def append(self, org: str, make: Callable[[Head], SignedEntry]) -> SignedEntry:
        view = self.view(org)
        await view.sync()
        entry = make(view.head)
        await view.append(entry)
        return entry

    async def register(self, org: str, label: str, description: str = "") -> SignedEntry:
        entry = await self.append(
            org,
            lambda seen: dataset_entry(
                self.rings[org].current,
                collaboration=CID,
                organization=self.orgs[org],
                label=label,
                seen=seen,
                description=description,
            ),
        )
        self.datasets[label] = entry
        return entry

    async def grant(self, name: str, label: str, to: str, **terms: Any) -> SignedEntry:
        terms.setdefault("expires_at", self.now + 30 * DAY_S)
        entry = await self.append(
            "a",
            lambda seen: lease_entry(
                self.admin,
                collaboration=CID,
                dataset=self.datasets[label].digest,
                owner=self.orgs["a"],
                grantee=self.orgs[to],
                by_user=self.users["a"],
                certificate=self.admin_cert.digest,
                seen=seen,
                **terms,
            ),
        )
        self.leases[name] = entry
        return entry

    async def revoke(self, name: str, reason: str) -> None:
        await self.append(
            "a",
            lambda seen: revoke_entry(
                self.admin,
                collaboration=CID,
                lease=self.leases[name].digest,
                reason=reason,
                by_user=self.users["a"],
                certificate=self.admin_cert.digest,
                seen=seen,
            ),
        )

    async def receipt(self, name: str, label: str, epsilon: float | None, run: int) -> None:
        use = DatasetUse(
            label=label, dataset=self.datasets[label].digest, lease=self.leases[name].digest, epsilon=epsilon
        )
        await self.append(
            "a",
            lambda seen: receipt_entry(
                self.rings["a"].current,
                collaboration=CID,
                organization=self.orgs["a"],
                task=1,
                run=run,
                image=IMAGE,
                finished_at=self.now,
                status="completed",
                seen=seen,
                datasets=[use],
            ),
        )

    def client(self, **kwargs: Any) -> AsyncClient:
        return AsyncClient(
            self.server.url,
            key_file=self.researcher_key_file,
            trust_file=self.tmp / f"trust-{time.monotonic_ns()}",
            **kwargs,
        )

    def vfed(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "VFED_CONFIG_DIR": str(self.tmp / "cfg")}
        return subprocess.run(
            [sys.executable, "-m", "vfed.client.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )


async def _user_id(url: str, name: str) -> int:
    async with AsyncClient(url) as client:
        await client.login(name, PASSWORD)
        assert client.user_id is not None
        return client.user_id


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    server = Server(tmp_path / "server", mqtt_url=None)
    api_keys = await server.seed(["a", "b", "c"])
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            nodes, rings, orgs = {}, {}, {}
            for name, api_key in api_keys.items():
                nodes[name] = NodeClient(session, server.url, api_key)
                orgs[name] = (await nodes[name].login()).organization_id
                rings[name] = Keyring.generate()
                await nodes[name].post_key_records(orgs[name], records_for_keys(orgs[name], rings[name].keys))
            users = {name: await _user_id(server.url, f"res-{name}") for name in api_keys}
            admin = OrgKey.generate()
            admin_cert = certify(
                rings["a"].current, orgs["a"], users["a"], "res-a", admin.public, roles=["org-admin"]
            )
            researcher = Keyring.generate()
            key_file = tmp_path / "res-b-key.json"
            researcher.save(key_file)
            res_cert = certify(rings["b"].current, orgs["b"], users["b"], "res-b", researcher.current.public)
            for org, cert in (("a", admin_cert), ("b", res_cert)):
                await nodes[org].request(
                    "POST",
                    f"/organizations/{orgs[org]}/certificates",
                    json={"certificate": cert.model_dump()},
                )
            yield World(tmp_path, server, nodes, orgs, rings, users, admin, admin_cert, key_file)
    finally:
        await server.stop()


def _metadata(label: str) -> DatasetMetadata:
    return DatasetMetadata(
        label=label,
        type="csv",
        rows=120,
        columns=[
            ColumnSummary(name="age", type="int64", kind="numeric", missing=0, min=18, max=90, mean=51.5),
            ColumnSummary(name="ward", type="object", kind="categorical", missing=2, distinct=7),
        ],
        computed_at=int(time.time()),
    )


async def _populate(w: World) -> None:
    await w.register("a", "patients", "ward admissions 2019-2023")
    await w.register("a", "genomes")
    await w.register("c", "claims", "insurance claims")
    researcher_key = Keyring.load(w.researcher_key_file).current.public
    sealed = seal_metadata(
        _metadata("patients"),
        w.admin,
        [w.rings["b"].current.public, researcher_key],
        collaboration_id=CID,
        dataset_digest=w.datasets["patients"].digest,
    )
    await w.grant(
        "study",
        "patients",
        "b",
        expires_at=w.now + 2 * DAY_S,
        images=[IMAGE],
        max_runs=3,
        epsilon=1.0,
        purpose="readmission study",
        metadata=sealed,
    )
    await w.grant("old", "genomes", "b", not_before=w.now - 200, expires_at=w.now - 100)
    await w.grant("withdrawn", "genomes", "b")
    await w.revoke("withdrawn", "consent withdrawn")
    await w.grant("once", "genomes", "b", max_runs=1)
    await w.grant("for-c", "patients", "c")
    await w.grant("for-res-a", "patients", "b", users=[w.users["a"]])
    await w.receipt("study", "patients", 0.25, run=1)
    await w.receipt("once", "genomes", None, run=2)


async def test_datasets_and_leases_show_what_the_ledger_grants_the_researcher(world: World) -> None:
    w = world
    await _populate(w)
    async with w.client() as client:
        await client.login("res-b", PASSWORD)
        found = {d.label: d for d in await client.datasets()}
        assert set(found) == {"patients", "genomes", "claims"}
        patients = found["patients"]
        assert (patients.owner, patients.description) == (w.orgs["a"], "ward admissions 2019-2023")
        assert [x.id for x in patients.leases] == [w.leases["study"].digest]  # not c's, not res-a's
        lease = patients.lease
        assert lease is not None and lease.status is LeaseStatus.ACTIVE
        assert (lease.runs_used, lease.max_runs, lease.epsilon_used, lease.epsilon_cap) == (1, 3, 0.25, 1.0)
        assert lease.images == [IMAGE] and lease.purpose == "readmission study"
        assert patients.metadata is not None and patients.metadata.rows == 120
        assert [c.name for c in patients.metadata.columns] == ["age", "ward"]
        assert found["claims"].owner == w.orgs["c"] and found["claims"].leases == []
        assert found["genomes"].metadata is None

        leases = {x.id: x for x in await client.leases(CID)}
        named = {name: w.leases[name].digest for name in ("study", "old", "withdrawn", "once")}
        assert set(leases) == set(named.values())
        statuses = {name: leases[digest].status for name, digest in named.items()}
        assert statuses == {
            "study": LeaseStatus.ACTIVE,
            "old": LeaseStatus.EXPIRED,
            "withdrawn": LeaseStatus.REVOKED,
            "once": LeaseStatus.EXHAUSTED,
        }
        assert leases[named["withdrawn"]].revoked_reason == "consent withdrawn"
        soon = await client.leases(expiring_within_s=7 * DAY_S)
        assert [x.id for x in soon] == [named["study"]]

        receipts = await client.receipts(CID)
        assert [(r.run_id, r.status) for r in receipts] == [(1, "completed"), (2, "completed")]

    # res-a (organization a, not a grantee) sees the datasets but none of b's leases.
    async with AsyncClient(w.server.url, trust_file=w.tmp / "trust-a") as other:
        await other.login("res-a", PASSWORD)
        assert await other.leases() == []
        assert all(d.leases == [] and d.metadata is None for d in await other.datasets(CID))


async def test_cli_lists_datasets_and_leases(world: World) -> None:
    w = world
    await _populate(w)
    res = await asyncio.to_thread(
        w.vfed, "login", "--url", w.server.url, "--username", "res-b", "--password", PASSWORD,
        "--key-file", str(w.researcher_key_file),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr

    res = await asyncio.to_thread(w.vfed, "datasets", "list", "--format", "json")
    assert res.returncode == 0, res.stderr
    rows = {d["label"]: d for d in json.loads(res.stdout)}
    assert rows["patients"]["metadata"]["rows"] == 120
    assert [x["status"] for x in rows["patients"]["leases"]] == ["active"]
    res = await asyncio.to_thread(w.vfed, "datasets", "list", "--collaboration", str(CID))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 3
    line = next(x for x in lines if "patients" in x)
    assert "active" in line and "runs 1/3" in line and "epsilon 0.25/1" in line and "120 rows" in line
    assert "no lease for you" in next(x for x in lines if "claims" in x)

    res = await asyncio.to_thread(w.vfed, "leases", "list", "--format", "json")
    assert res.returncode == 0, res.stderr
    assert sorted(x["status"] for x in json.loads(res.stdout)) == [
        "active",
        "exhausted",
        "expired",
        "revoked",
    ]
    res = await asyncio.to_thread(w.vfed, "leases", "list", "--expiring", "7d")
    assert res.returncode == 0, res.stderr
    [line] = res.stdout.splitlines()
    assert line.startswith(w.leases["study"].digest[:12]) and "patients" in line
    res = await asyncio.to_thread(w.vfed, "leases", "list")
    assert "revoked (consent withdrawn)" in res.stdout and len(res.stdout.splitlines()) == 4

    res = await asyncio.to_thread(w.vfed, "leases", "list", "--expiring", "soon")
    assert res.returncode == 2 and "not a duration" in res.stderr and "Traceback" not in res.stderr
    res = await asyncio.to_thread(w.vfed, "datasets", "list", "--collaboration", "99")
    assert res.returncode == 1 and res.stderr.startswith("vfed: error:") and "no ledger" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


async def _descriptor(w: World, task_id: int) -> DescriptorDocument:
    stored = await w.nodes["a"].get_task(task_id)
    assert stored.descriptor is not None
    return DescriptorDocument.parse(stored.descriptor)


async def test_a_descriptor_carries_the_head_the_client_verified(world: World) -> None:
    w = world
    await w.register("a", "patients")
    async with w.client() as client:
        await client.login("res-b", PASSWORD)
        task = await client.create_task(CID, "img", "echo", organizations=[w.orgs["a"]])
        view = await client.ledger(CID)
        body = (await _descriptor(w, int(task["id"]))).body()
        assert body.ledger is not None
        assert (body.ledger.seq, body.ledger.hash) == (view.head.seq, view.head.hash) and view.head.seq > 0
        # A head read within HEAD_REUSE_S is reused (a researcher submitting task after task does not wait
        # for a read each time); once it is older, the next task reads what is new: an entry appended
        # meanwhile is in its head.
        first = view.head
        await w.register("a", "genomes")
        await asyncio.sleep(HEAD_REUSE_S + 0.2)
        task = await client.create_task(CID, "img", "echo", organizations=[w.orgs["a"]])
        body = (await _descriptor(w, int(task["id"]))).body()
        assert body.ledger is not None and body.ledger.seq == first.seq + 1 == view.head.seq
        assert body.ledger.hash == view.head.hash


async def test_a_server_without_ledgers_still_takes_tasks_without_a_head(world: World) -> None:
    """An older server (no ledger route: 404): the task is created, its descriptor names no head."""
    w = world
    await w.server.stop()

    @web.middleware
    async def no_ledger(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.endswith("/ledger"):
            raise web.HTTPNotFound(text='{"error": "not-found", "detail": "no such route"}')
        return await handler(request)

    app = create_app(w.server.settings())
    app.middlewares.insert(0, no_ledger)
    w.server.runner = web.AppRunner(app, access_log=None)
    await w.server.runner.setup()
    await web.TCPSite(w.server.runner, "127.0.0.1", w.server.port).start()
    async with w.client() as client:
        await client.login("res-b", PASSWORD)
        task = await client.create_task(CID, "img", "echo", organizations=[w.orgs["a"]])
        assert (await _descriptor(w, int(task["id"]))).body().ledger is None
        with pytest.raises(LedgerUnavailable, match="no ledger"):
            await client.datasets(CID)
        assert await client.datasets() == []


async def test_an_organization_the_trust_store_refuses_counts_for_nothing(world: World) -> None:
    """Pinned mode, organization c pinned to another first key: c's entries are left out (problems), the rest
    verifies, and tasks still carry the head of the whole chain."""
    w = world
    await _populate(w)
    async with AsyncClient(
        w.server.url, key_file=w.researcher_key_file, trust_file=w.tmp / "trust-pinned", trust="pinned"
    ) as client:
        for org in ("a", "b"):
            client.trust(w.orgs[org], fingerprint(w.rings[org].keys[0].public))
        client.trust(w.orgs["c"], fingerprint(Keyring.generate().current.public))
        await client.login("res-b", PASSWORD)
        assert {d.label for d in await client.datasets(CID)} == {"patients", "genomes"}
        view = await client.ledger(CID)
        assert any(f"organization {w.orgs['c']} is not pinned" in p.message for p in view.state.problems)
        task = await client.create_task(CID, "img", "echo", organizations=[w.orgs["a"]])
        body = (await _descriptor(w, int(task["id"]))).body()
        assert body.ledger is not None and (body.ledger.seq, body.ledger.hash) == (
            view.head.seq,
            view.head.hash,
        )


async def _rewrite(w: World, seq: int, old: str, new: str, *, rechain: bool) -> None:
    """What an operator with the database could do: change entry `seq`'s text (and its chain hash)."""
    [(text, prev)] = await server_sql(
        w.server,
        "SELECT e.entry, p.hash FROM ledger_entries e JOIN ledger_entries p ON p.collaboration_id = "
        "e.collaboration_id AND p.seq = e.seq - 1 WHERE e.collaboration_id = :c AND e.seq = :s",
        c=CID,
        s=seq,
    )
    assert old in text
    changed = text.replace(old, new)
    new_hash = link(CID, seq, prev, changed)
    statement = "UPDATE ledger_entries SET entry = :e" + (", hash = :h" if rechain else "")
    await server_sql(
        w.server, statement + " WHERE collaboration_id = :c AND seq = :s", e=changed, h=new_hash, c=CID, s=seq
    )


async def test_a_rewritten_ledger_is_caught_at_the_next_read_naming_the_entry(world: World) -> None:
    w = world
    await w.register("a", "patients")
    await w.grant("study", "patients", "b", purpose="readmission study")
    async with w.client() as client:
        await client.login("res-b", PASSWORD)
        assert [x.purpose for x in await client.leases(CID)] == ["readmission study"]
        head = (await client.ledger(CID)).head
        tasks_before = len(await client.tasks())

        # The lease (the head) rewritten and chained again: the client's next read sees another entry there.
        await _rewrite(w, head.seq, "readmission study", "any study at all", rechain=True)
        with pytest.raises(LedgerForked, match=f"entry {head.seq} differs"):
            await client.leases(CID)
        with pytest.raises(LedgerForked, match=f"entry {head.seq}"):
            await client.create_task(CID, "img", "echo", organizations=[w.orgs["a"]])
        assert len(await client.tasks()) == tasks_before  # no task was created

    # A client reading afresh finds the entry's signature broken, and the CLI says so in one line.
    async with w.client() as fresh:
        await fresh.login("res-b", PASSWORD)
        with pytest.raises(LedgerEntryInvalid, match=f"ledger entry {head.seq} "):
            await fresh.leases(CID)
    res = await asyncio.to_thread(
        w.vfed, "login", "--url", w.server.url, "--username", "res-b", "--password", PASSWORD,
        "--key-file", str(w.researcher_key_file),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = await asyncio.to_thread(w.vfed, "leases", "list", "--collaboration", str(CID))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    [error] = [x for x in res.stderr.splitlines() if not x.startswith("pinned organization")]  # tofu warnings
    assert error.startswith(f"vfed: error: ledger entry {head.seq} (lease.granted ")

    # An earlier entry edited without chaining it again: its stored hash no longer matches.
    dataset_seq = head.seq - 1
    await _rewrite(w, dataset_seq, '"label":"patients"', '"label":"patientz"', rechain=False)
    async with w.client() as fresh:
        await fresh.login("res-b", PASSWORD)
        with pytest.raises(
            LedgerTampered, match=f"ledger entry {dataset_seq} .*changed after it was chained"
        ):
            await fresh.datasets(CID)


@pytest.mark.parametrize(
    ("text", "seconds"), [("7d", 7 * DAY_S), ("12h", 43200), ("30m", 1800), ("2", 2 * DAY_S)]
)
def test_durations(text: str, seconds: float) -> None:
    assert Duration().convert(text, None, None) == seconds


def test_ledger_errors_are_exported_beside_the_clients() -> None:
    assert issubclass(LedgerUnavailable, ClientError)
    assert LedgerForked.reason == "ledger-fork"
