"""A server that rewrites its ledger is caught: the attacker is the server's operator, who edits, drops,
reorders and inserts rows of `ledger_entries` directly, and shows two organizations different histories.

The ledger is built through the real API (key chains, an org admin's and a researcher's certificates, a
dataset, a lease signed by the admin's key, a receipt, a checkpoint); verifiers are `LedgerView`s over HTTP,
as nodes and clients keep them. Each lie raises a typed `LedgerError` whose message names the entry.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.node.node_harness import PASSWORD, Server, server_sql

from vfed.common.crypto import Keyring, OrgKey
from vfed.common.ledger import (
    DatasetUse,
    EmbeddedLedger,
    Head,
    LedgerEntryInvalid,
    LedgerError,
    LedgerForked,
    LedgerState,
    LedgerTampered,
    LedgerView,
    checkpoint_entry,
    dataset_entry,
    lease_entry,
    link,
    receipt_entry,
)
from vfed.common.trust import SignedEntry, certify, records_for_keys
from vfed.server.config import Settings

IMAGE = "sha256:" + "c" * 64


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None  # the server's default: SQLite in its data folder
    return str(request.getfixturevalue("postgres_url"))


@dataclass
class DbServer(Server):
    database_url: str | None = None

    def settings(self) -> Settings:
        return super().settings().model_copy(update={"database_url": self.database_url})


class HttpTransport:
    """The ledger client's transport: JSON over the server's API with a bearer token (as nodes have)."""

    def __init__(self, http: aiohttp.ClientSession, api: str, token: str) -> None:
        self.http, self.api, self.headers = http, api, {"Authorization": f"Bearer {token}"}

    async def get_json(self, path: str, params: dict[str, str]) -> Any:
        async with self.http.get(self.api + path, params=params, headers=self.headers) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def post_json(self, path: str, body: Any) -> Any:
        async with self.http.post(self.api + path, json=body, headers=self.headers) as r:
            answer = await r.json()
            assert r.status == 201, answer
            return answer


@dataclass
class Ledger:
    """Two organizations' ledger, built through the API, and what the test needs to lie about it."""

    server: DbServer
    http: aiohttp.ClientSession
    tokens: dict[str, str]
    orgs: dict[str, int]
    users: dict[str, int]
    rings: dict[str, Keyring]
    cid: int = 0
    admin: OrgKey = field(default_factory=OrgKey.generate)
    researcher: OrgKey = field(default_factory=OrgKey.generate)
    certs: dict[str, SignedEntry] = field(default_factory=dict)
    entries: dict[str, SignedEntry] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return self.server.url + "/api/v1"

    def view(self, who: str) -> LedgerView:
        pins = {self.orgs[o]: ring.keys[0].key_id for o, ring in self.rings.items()}
        cid = self.cid
        transport = HttpTransport(self.http, self.api, self.tokens[who])
        return LedgerView(EmbeddedLedger(transport, cid), lambda: LedgerState(cid, anchors=pins.get))

    async def call(self, who: str, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        async with self.http.request(method, self.api + path, headers=headers, **kw) as r:
            return r.status, await r.json()

    async def sql(self, statement: str, **params: Any) -> list[Any]:
        return await server_sql(self.server, statement, **{"cid": self.cid, **params})

    async def rows(self) -> list[Any]:
        return await self.sql(
            "SELECT seq, kind, digest, hash, entry FROM ledger_entries "
            "WHERE collaboration_id = :cid ORDER BY seq"
        )

    async def insert(self, seq: int, entry: SignedEntry, prev_hash: str) -> None:
        """An entry placed by hand, chained correctly (the attacker can compute hashes; not signatures)."""
        text = entry.to_json()
        await self.sql(
            "INSERT INTO ledger_entries (collaboration_id, seq, kind, digest, hash, entry, created_at) "
            "VALUES (:cid, :seq, :kind, :digest, :hash, :entry, CURRENT_TIMESTAMP)",
            seq=seq,
            kind=entry.kind,
            digest=entry.digest,
            hash=link(self.cid, seq, prev_hash, text),
            entry=text,
        )

    async def restore(self, rows: list[Any]) -> None:
        await self.sql("DELETE FROM ledger_entries WHERE collaboration_id = :cid")
        for seq, kind, digest, hash_, text in rows:
            await self.sql(
                "INSERT INTO ledger_entries (collaboration_id, seq, kind, digest, hash, entry, created_at) "
                "VALUES (:cid, :seq, :kind, :digest, :hash, :entry, CURRENT_TIMESTAMP)",
                seq=seq,
                kind=kind,
                digest=digest,
                hash=hash_,
                entry=text,
            )


async def _login(http: aiohttp.ClientSession, api: str, body: dict[str, str], kind: str) -> str:
    async with http.post(f"{api}/token/{kind}", json=body) as r:
        answer = await r.json()
        assert r.status == 200, answer
        return str(answer["access_token"])


@contextlib.asynccontextmanager
async def federation(tmp_path: Path, database_url: str | None) -> AsyncIterator[Ledger]:
    """alpha and beta in one collaboration: a node each, alpha's org admin and a researcher of alpha."""
    server = DbServer(tmp_path / "server", mqtt_url=None, database_url=database_url)
    keys = await server.import_spec(
        {
            "organizations": [{"name": "alpha"}, {"name": "beta"}],
            "collaborations": [{"name": "study", "organizations": ["alpha", "beta"]}],
            "users": [
                {
                    "username": "admin-alpha",
                    "password": PASSWORD,
                    "organization": "alpha",
                    "roles": ["org-admin"],
                },
                {"username": "res-alpha", "password": PASSWORD, "organization": "alpha"},
            ],
            "nodes": [
                {"name": f"node-{o}", "organization": o, "collaboration": "study"} for o in ("alpha", "beta")
            ],
        }
    )
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            api = server.url + "/api/v1"
            tokens = {o: await _login(http, api, {"api_key": keys[o]}, "node") for o in ("alpha", "beta")}
            tokens["res-alpha"] = await _login(
                http, api, {"username": "res-alpha", "password": PASSWORD}, "user"
            )
            orgs = {name: oid for oid, name in await server_sql(server, "SELECT id, name FROM organizations")}
            users = {name: uid for uid, name in await server_sql(server, "SELECT id, username FROM users")}
            (cid,) = (await server_sql(server, "SELECT id FROM collaborations WHERE name = 'study'"))[0]
            rings = {o: Keyring.generate() for o in ("alpha", "beta")}
            ledger = Ledger(server, http, tokens, orgs, users, rings, cid)
            await _build(ledger)
            yield ledger
    finally:
        await server.stop()


async def _build(fed: Ledger) -> None:
    """Key chains (4 entries), the admin's and the researcher's certificates (5, 6), a dataset (7), a lease
    signed by the admin's certified key (8), a receipt (9) and a checkpoint of beta (10)."""
    for org, ring in fed.rings.items():
        ring.rotate()
        records = [r.model_dump(mode="json") for r in records_for_keys(fed.orgs[org], ring.keys)]
        status, body = await fed.call(
            org, "POST", f"/organizations/{fed.orgs[org]}/key-records", json={"records": records}
        )
        assert status == 201, body
    alpha = fed.orgs["alpha"]
    for user, key, role in (
        ("admin-alpha", fed.admin, "org-admin"),
        ("res-alpha", fed.researcher, "researcher"),
    ):
        cert = certify(fed.rings["alpha"].current, alpha, fed.users[user], user, key.public, roles=[role])
        status, body = await fed.call(
            "alpha",
            "POST",
            f"/organizations/{alpha}/certificates",
            json={"certificate": cert.model_dump(mode="json")},
        )
        assert status == 201, body
        fed.certs[user] = cert
    view = fed.view("alpha")
    await view.sync()
    key = fed.rings["alpha"].current
    dataset = dataset_entry(key, collaboration=fed.cid, organization=alpha, label="cohort", seen=view.head)
    await view.append(dataset)
    lease = lease_entry(
        fed.admin,
        collaboration=fed.cid,
        dataset=dataset.digest,
        owner=alpha,
        grantee=fed.orgs["beta"],
        expires_at=int(time.time()) + 3600,
        by_user=fed.users["admin-alpha"],
        certificate=fed.certs["admin-alpha"].digest,
        seen=view.head,
    )
    await view.append(lease)
    receipt = receipt_entry(
        key,
        collaboration=fed.cid,
        organization=alpha,
        task=1,
        run=1,
        image=IMAGE,
        finished_at=int(time.time()),
        status="completed",
        seen=view.head,
        datasets=[DatasetUse(label="cohort", dataset=dataset.digest, lease=lease.digest)],
    )
    await view.append(receipt)
    beta = fed.view("beta")
    await beta.sync()
    checkpoint = checkpoint_entry(
        fed.rings["beta"].current, collaboration=fed.cid, organization=fed.orgs["beta"], seen=beta.head
    )
    await beta.append(checkpoint)
    fed.entries = {"dataset": dataset, "lease": lease, "receipt": receipt, "checkpoint": checkpoint}
    assert view.state.leases[lease.digest].runs == 1


def researcher_lease(fed: Ledger, seen: Head) -> SignedEntry:
    return lease_entry(
        fed.researcher,
        collaboration=fed.cid,
        dataset=fed.entries["dataset"].digest,
        owner=fed.orgs["alpha"],
        grantee=fed.orgs["beta"],
        expires_at=int(time.time()) + 3600,
        by_user=fed.users["res-alpha"],
        certificate=fed.certs["res-alpha"].digest,
        seen=seen,
    )


async def caught(view: LedgerView, error: type[LedgerError], *words: str, full: bool = False) -> LedgerError:
    with pytest.raises(error) as info:
        if full:
            await view.verify_full()
        else:
            await view.sync()
    assert all(w in info.value.message for w in words), info.value.message
    return info.value


async def test_every_rewrite_of_the_ledger_is_caught(tmp_path: Path, database_url: str | None) -> None:
    async with federation(tmp_path, database_url) as fed:
        honest = await fed.rows()
        assert [r[1] for r in honest][4:] == [
            "user.certificate",
            "user.certificate",
            "dataset.registered",
            "lease.granted",
            "run.receipt",
            "ledger.checkpoint",
        ]
        synced = fed.view("beta")  # a verifier that read the honest ledger
        assert await synced.sync() == 10
        head = synced.head

        # the honest server refuses a lease signed by a researcher's certified key
        status, body = await fed.call(
            "alpha",
            "POST",
            f"/collaborations/{fed.cid}/ledger",
            json={"entry": researcher_lease(fed, head).model_dump(mode="json")},
        )
        assert status == 400 and "only an org admin" in body["detail"], body

        cases: list[tuple[str, Callable[[], Any], type[LedgerError], tuple[str, ...]]] = []

        async def edit() -> None:  # the dataset's description rewritten in place
            text = honest[6][4].replace('"label":"cohort"', '"label":"cohorx"')
            await fed.sql(
                "UPDATE ledger_entries SET entry = :t WHERE collaboration_id = :cid AND seq = 7", t=text
            )

        async def edit_and_rechain() -> None:  # the same, with every hash from there on recomputed
            await edit()
            prev = honest[5][3]
            for seq, _, _, _, text in await fed.rows():
                if seq >= 7:
                    prev = link(fed.cid, seq, prev, text)
                    await fed.sql(
                        "UPDATE ledger_entries SET hash = :h WHERE collaboration_id = :cid AND seq = :s",
                        h=prev,
                        s=seq,
                    )

        async def drop() -> None:  # the lease dropped, later entries renumbered
            await fed.sql("DELETE FROM ledger_entries WHERE collaboration_id = :cid AND seq = 8")
            await fed.sql("UPDATE ledger_entries SET seq = -seq WHERE collaboration_id = :cid AND seq > 8")
            await fed.sql(
                "UPDATE ledger_entries SET seq = -seq - 1 WHERE collaboration_id = :cid AND seq < 0"
            )

        async def reorder() -> None:  # receipt and checkpoint swapped
            await fed.sql(
                "UPDATE ledger_entries SET seq = CASE seq WHEN 9 THEN -10 ELSE -9 END "
                "WHERE collaboration_id = :cid AND seq IN (9, 10)"
            )
            await fed.sql("UPDATE ledger_entries SET seq = -seq WHERE collaboration_id = :cid AND seq < 0")

        async def forged() -> None:  # alpha's dataset, signed with beta's key
            entry = dataset_entry(
                fed.rings["beta"].current,
                collaboration=fed.cid,
                organization=fed.orgs["alpha"],
                label="x",
                seen=head,
            )
            await fed.insert(11, entry, head.hash)

        async def by_researcher() -> None:
            await fed.insert(11, researcher_lease(fed, head), head.hash)

        cases = [
            ("edit", edit, LedgerTampered, ("ledger entry 7", "changed")),
            (
                "edit and rechain",
                edit_and_rechain,
                LedgerEntryInvalid,
                ("ledger entry 7", "not signed by a key"),
            ),
            ("drop", drop, LedgerTampered, ("ledger entry 8 (run.receipt",)),
            ("reorder", reorder, LedgerTampered, ("ledger entry 9 (ledger.checkpoint",)),
            ("forged", forged, LedgerEntryInvalid, ("ledger entry 11", f"organization {fed.orgs['alpha']}")),
            ("by a researcher", by_researcher, LedgerEntryInvalid, ("ledger entry 11", "only an org admin")),
        ]
        for name, tamper, error, words in cases:
            await tamper()
            fresh = fed.view("alpha")
            try:
                await caught(fresh, error, *words)  # a verifier meeting the ledger for the first time
                if name in ("edit", "drop", "reorder"):  # one that synced before, verifying in full
                    await caught(synced, error, *words, full=True)
                if name == "edit and rechain":  # one that synced before sees its history rewritten
                    await caught(synced, LedgerForked, "entry 10", "rewritten")
            finally:
                await fed.restore(honest)
        assert (await synced.verify_full()).length == 10  # the honest ledger, restored, verifies


async def test_a_fork_shown_to_two_organizations_is_caught(tmp_path: Path, database_url: str | None) -> None:
    async with federation(tmp_path, database_url) as fed:
        alpha = fed.view("alpha")
        await alpha.sync()
        alpha_head = alpha.head  # alpha verified beta's checkpoint at entry 10

        # the server drops beta's checkpoint for beta's eyes; beta, reading, signs another at the same place
        await fed.sql("DELETE FROM ledger_entries WHERE collaboration_id = :cid AND seq = 10")
        beta = fed.view("beta")
        assert await beta.sync() == 9
        other = checkpoint_entry(
            fed.rings["beta"].current,
            collaboration=fed.cid,
            organization=fed.orgs["beta"],
            seen=beta.head,
            now=time.time() + 60,
        )
        place = await beta.append(other)  # the server (rebuilding from its rewritten database) takes it at 10
        assert place.seq == 10 and place != alpha_head

        # each side meets the other's head (a task descriptor, a receipt): both report the fork
        with pytest.raises(LedgerForked) as info:
            await beta.ensure_head(alpha_head, "a receipt of alpha")
        assert "a receipt of alpha" in info.value.message and "entry 10" in info.value.message
        assert (info.value.seq, info.value.theirs) == (10, alpha_head.hash)
        with pytest.raises(LedgerForked) as info:
            await alpha.ensure_head(place, "a checkpoint of beta")
        assert "entry 10" in info.value.message
        # alpha reading again sees its history rewritten under it
        await caught(alpha, LedgerForked, "entry 10", "rewritten")

        # alpha's next entry names the head it verified: the honest verify refuses it, and a verifier it is
        # slipped to by hand reports the fork naming the entry
        receipt = receipt_entry(
            fed.rings["alpha"].current,
            collaboration=fed.cid,
            organization=fed.orgs["alpha"],
            task=2,
            run=2,
            image=IMAGE,
            finished_at=int(time.time()),
            status="completed",
            seen=alpha_head,
        )
        status, body = await fed.call(
            "alpha",
            "POST",
            f"/collaborations/{fed.cid}/ledger",
            json={"entry": receipt.model_dump(mode="json")},
        )
        assert (status, body["error"]) == (400, "ledger-fork"), body
        await fed.insert(11, receipt, place.hash)
        await caught(fed.view("beta"), LedgerForked, "ledger entry 11 (run.receipt", "fork")
        await caught(beta, LedgerForked, "ledger entry 11", "fork")
