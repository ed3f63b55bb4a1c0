"""Leases enforced at the node (`leases: required`): a real server app on SQLite with its ledger, a real
agent, real Docker. Datasets are registered and leases granted and revoked by an org admin's certified key
the way `vnode datasets|leases` do it, straight onto the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests import infra
from tests.node.node_harness import (
    PASSWORD,
    PROBE_DP_IMAGE,
    PROBE_IMAGE,
    Server,
    ensure_probe_image,
    post_signed_task,
    wait_run_status,
    write_node_config,
)

from vfed.client.client import AsyncClient
from vfed.common.crypto import Keyring, OrgKey
from vfed.common.ledger import Head, LedgerForked, dataset_entry, lease_entry, revoke_entry
from vfed.common.ledger.fabric import FabricSettings
from vfed.common.trust import certify
from vfed.node.agent import Agent
from vfed.node.config import NodeSettings, load_settings
from vfed.node.lease_store import LEASES_FILE, LeaseStore
from vfed.node.leases import LeaseGuard
from vfed.node.ledger import NodeLedger

pytestmark = [pytest.mark.docker]

FINAL = {"completed", "failed", "start-failed", "not-allowed", "killed", "crashed"}
LABELS = ("patients", "expired", "wrongimage", "wronguser", "capped", "nolease", "unregistered")
OTHER_IMAGE = "sha256:" + "0" * 64


@pytest.fixture(scope="module", autouse=True)
def probe_image() -> None:
    ensure_probe_image()


@dataclass
class Site:
    """One organization with `leases: required`, its agent set up (its loop not running), a researcher and an
    org admin (the same user, with an own key certified as `org-admin`)."""

    server: Server
    settings: NodeSettings
    agent: Agent
    researcher: AsyncClient
    collaboration: int
    admin: OrgKey
    certificate: str
    admin_ledger: NodeLedger
    """The ledger as `vnode datasets|leases` see it (their own view, the agent's only through the server)."""

    @property
    def org(self) -> int:
        assert self.researcher.organization_id is not None
        return self.researcher.organization_id

    @property
    def user(self) -> int:
        assert self.researcher.user_id is not None
        return self.researcher.user_id

    @property
    def ledger(self) -> NodeLedger:
        assert self.agent.services is not None and self.agent.services.ledger is not None
        return self.agent.services.ledger

    @property
    def guard(self) -> LeaseGuard:
        assert self.agent.services is not None and self.agent.services.leases is not None
        return self.agent.services.leases

    def org_key(self) -> OrgKey:
        return Keyring.load(self.settings.key_path).current

    async def _head(self) -> Head:
        await self.admin_ledger.sync()
        return self.admin_ledger.head

    async def register(self, label: str) -> str:
        entry = dataset_entry(
            self.org_key(),
            collaboration=self.collaboration,
            organization=self.org,
            label=label,
            seen=await self._head(),
        )
        await self.admin_ledger.append(entry)
        return entry.digest

    async def grant(self, dataset: str, expires_in_s: float = 3600, **terms: Any) -> str:
        now = time.time()
        entry = lease_entry(
            self.admin,
            collaboration=self.collaboration,
            dataset=dataset,
            owner=self.org,
            grantee=self.org,
            expires_at=int(now + expires_in_s),
            by_user=self.user,
            certificate=self.certificate,
            seen=await self._head(),
            **terms,
        )
        await self.admin_ledger.append(entry)
        return entry.digest

    async def revoke(self, lease: str, reason: str) -> None:
        entry = revoke_entry(
            self.admin,
            collaboration=self.collaboration,
            lease=lease,
            reason=reason,
            by_user=self.user,
            certificate=self.certificate,
            seen=await self._head(),
        )
        await self.admin_ledger.append(entry)

    async def task(self, label: str, method: str = "echo", *args: Any, **kwargs: Any) -> dict[str, Any]:
        image = kwargs.pop("image", PROBE_IMAGE)
        return await self.researcher.create_task(
            self.collaboration, image, method, args=list(args), kwargs=kwargs, datasets=[label]
        )


@contextlib.asynccontextmanager
async def site(
    tmp_path: Path,
    mqtt_url: str | None = None,
    database_url: str | None = None,
    fabric: FabricSettings | None = None,
    **config: Any,
) -> AsyncIterator[Site]:
    """`fabric`: the collaboration's ledger is on that Fabric channel (tests/fabric), for the node, the org
    admin and the researcher alike; its chaincode must be initialized for organization 1 and collaboration
    1, which the server's first seeded organization and collaboration are."""
    data = tmp_path / "patients.csv"
    data.write_text("age,weight\n30,70\n")
    datasets = {label: {"uri": str(data), "type": "csv"} for label in LABELS}
    config.setdefault("leases", "required")
    if fabric is not None:
        config["ledger"] = {"backend": "fabric", "fabric": fabric.model_dump(mode="json")}
    server = Server(tmp_path / "server", mqtt_url=mqtt_url, database_url=database_url)
    keys = await server.seed(["alpha"])
    await server.start()
    path = write_node_config(
        tmp_path / "alpha.yaml",
        name=f"nl{secrets.token_hex(3)}",
        api_key=keys["alpha"],
        server_url=server.url,
        mqtt_url=mqtt_url,
        datasets=datasets,
        poll_interval_s=0.5,
        **config,
    )
    settings = load_settings(path)
    try:
        async with (
            Agent(settings) as agent,
            AsyncClient(server.url, key_file=settings.key_path) as researcher,
            aiohttp.ClientSession() as session,
        ):
            await researcher.login("res-alpha", PASSWORD)
            org, user = researcher.organization_id, researcher.user_id
            assert org is not None and user is not None and agent.services is not None
            collaboration = int((await researcher.collaborations())[0]["id"])
            if fabric is not None:
                assert (org, collaboration) == (1, 1), "the chaincode was initialized for 1 and 1"
                researcher.fabric_ledgers[collaboration] = fabric
            admin = Keyring.generate().current
            org_key = Keyring.load(settings.key_path).current
            certificate = certify(org_key, org, user, "res-alpha", admin.public, roles=["org-admin"])
            await agent.services.client.request(
                "POST",
                f"/organizations/{org}/certificates",
                json={"certificate": certificate.model_dump(mode="json")},
            )
            admin_ledger = await NodeLedger.connect(settings, session)
            if fabric is not None:  # the server carries certificates onto its own ledger only
                await admin_ledger.append(certificate)
            try:
                yield Site(
                    server,
                    settings,
                    agent,
                    researcher,
                    collaboration,
                    admin,
                    certificate.digest,
                    admin_ledger,
                )
            finally:
                await admin_ledger.aclose()
    finally:
        await server.stop()


async def only_run(s: Site, task: dict[str, Any], timeout_s: float = 60) -> dict[str, Any]:
    (run,) = await wait_run_status(s.researcher, int(task["id"]), FINAL, timeout_s=timeout_s)
    return dict(run)


def refusals(agent: Agent) -> float:
    return agent.metrics.registry.get_sample_value("vfed_node_lease_refusals_total") or 0.0


async def test_a_leased_run_runs_and_its_receipt_lands_on_the_ledger_and_verifies(tmp_path: Path) -> None:
    async with site(tmp_path) as s:
        dataset = await s.register("patients")
        lease = await s.grant(dataset, max_runs=5)
        task = await s.task("patients", "echo", 3)
        await s.agent.run(burst=True)
        run = await only_run(s, task)
        assert run["status"] == "completed", run
        assert await s.guard.receipts.deliver()
        report = await s.ledger.verify_full()
        assert not report.problems, report
        (receipt,) = s.ledger.state.receipts_for(s.org)
        body = receipt.body
        assert (body.task, body.run, body.status) == (task["id"], run["id"], "completed")
        assert [(u.label, u.dataset, u.lease) for u in body.datasets] == [("patients", dataset, lease)]
        assert body.image.startswith("sha256:") and body.started_at is not None
        assert body.started_at <= body.finished_at
        blob = await s.researcher.api.download_blob(run["result_blob_id"])
        assert body.result == hashlib.sha256(blob).hexdigest()
        assert body.input is not None and body.descriptor is not None
        assert s.ledger.state.leases[lease].runs == 1
        # A head no verifier here has seen at a place it knows: a fork, counted.
        with pytest.raises(LedgerForked):
            await s.ledger.ensure_head(Head(seq=1, hash="f" * 64), "a test")
        forks = s.agent.metrics.registry.get_sample_value("vfed_node_ledger_forks_total")
        assert forks == 1
        length = s.agent.metrics.registry.get_sample_value("vfed_node_ledger_length")
        assert length == s.ledger.length
        # A quiet organization checkpoints once a day, not more.
        now = time.time() + 2 * 86400
        assert await s.guard.receipts.checkpoint_if_due(now) is not None
        assert await s.guard.receipts.checkpoint_if_due(now + 60) is None
        assert len(s.ledger.state.checkpoints) == 1


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """The server's database: SQLite in its data folder, or PostgreSQL."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_url"))


async def test_runs_without_a_valid_lease_are_refused(tmp_path: Path, database_url: str | None) -> None:
    """No registration, no lease, an expired lease, another image, another user, an epsilon cap with a
    method that declares none, and max_runs reached by runs started at the same time; on SQLite and on
    PostgreSQL."""
    async with site(tmp_path, database_url=database_url) as s:
        other_user = s.user + 1000
        for label in ("patients", "expired", "wrongimage", "wronguser", "capped", "nolease"):
            digest = await s.register(label)
            if label == "patients":
                await s.grant(digest, max_runs=2)
            elif label == "expired":
                await s.grant(digest, not_before=int(time.time()) - 100, expires_in_s=-10)
            elif label == "wrongimage":
                await s.grant(digest, images=[OTHER_IMAGE])
            elif label == "wronguser":
                await s.grant(digest, users=[other_user])
            elif label == "capped":
                await s.grant(digest, epsilon=1.0)
        refused = {label: await s.task(label) for label in LABELS if label != "patients"}
        concurrent = [await s.task("patients", "sleep", 1) for _ in range(4)]
        await s.agent.run(burst=True)
        runs = {label: await only_run(s, task) for label, task in refused.items()}
        for label, run in runs.items():
            assert run["status"] == "not-allowed", (label, run)
            assert run["reason"].startswith("no-valid-lease: "), (label, run)
        assert "not registered on the ledger" in runs["unregistered"]["reason"]
        assert "has no lease for organization" in runs["nolease"]["reason"]
        assert "expired at" in runs["expired"]["reason"]
        assert "does not allow image" in runs["wrongimage"]["reason"]
        assert f"not user {s.user}" in runs["wronguser"]["reason"]
        assert "declares no epsilon" in runs["capped"]["reason"]
        statuses = sorted([(await only_run(s, t))["status"] for t in concurrent])
        assert statuses == ["completed", "completed", "not-allowed", "not-allowed"], statuses
        exhausted = [r for t in concurrent if (r := await only_run(s, t))["status"] == "not-allowed"]
        assert all("exhausted" in r["reason"] for r in exhausted), exhausted
        assert refusals(s.agent) == len(LABELS) - 1 + 2


async def test_a_task_whose_signer_saw_another_history_is_refused_as_a_fork(tmp_path: Path) -> None:
    """The researcher's descriptor names a ledger head: another entry at that place here, or a place beyond
    what the server shows this node, is a fork; the run is refused with both heads logged and counted."""
    async with site(tmp_path) as s:
        await s.grant(await s.register("patients"), max_runs=10)
        await s.ledger.sync()
        here = s.ledger.head

        async def task_saw(head: tuple[int, str]) -> dict[str, Any]:
            return await post_signed_task(
                s.researcher,
                s.org_key(),
                collaboration=s.collaboration,
                targets={s.org: s.org_key().public},
                image=PROBE_IMAGE,
                datasets=["patients"],
                ledger=head,
            )

        other = await task_saw((here.seq, "e" * 64))
        beyond = await task_saw((here.seq + 50, "e" * 64))
        fine = await task_saw((here.seq, here.hash))
        await s.agent.run(burst=True)
        expected = ((other, f"entry {here.seq} of this node's ledger"), (beyond, "shows this verifier only"))
        for task, words in expected:
            run = await only_run(s, task)
            assert run["status"] == "not-allowed", run
            assert run["reason"].startswith("ledger-fork: "), run
            assert words in run["reason"], run
        assert (await only_run(s, fine))["status"] == "completed"
        forks = s.agent.metrics.registry.get_sample_value("vfed_node_ledger_forks_total")
        assert forks == 2


async def test_an_epsilon_capped_lease_admits_declared_epsilon_up_to_its_cap(tmp_path: Path) -> None:
    async with site(tmp_path) as s:
        lease = await s.grant(await s.register("capped"), epsilon=1.0)
        first = await s.task("capped", "echo", image=PROBE_DP_IMAGE, epsilon=0.7)
        await s.agent.run(burst=True)
        assert (await only_run(s, first))["status"] == "completed"
        second = await s.task("capped", "echo", image=PROBE_DP_IMAGE, epsilon=0.7)
        await s.agent.run(burst=True)
        run = await only_run(s, second)
        assert run["status"] == "not-allowed" and "epsilon cap is spent" in run["reason"], run
        assert await s.guard.receipts.deliver()
        assert s.ledger.state.leases[lease].epsilon_spent == pytest.approx(0.7)


async def test_expiry_and_revocation_kill_running_runs(tmp_path: Path) -> None:
    async with site(tmp_path) as s:
        expiring = await s.grant(await s.register("expired"), expires_in_s=6)
        revoked = await s.grant(await s.register("patients"))
        long_one = await s.task("expired", "sleep", 60)
        other = await s.task("patients", "sleep", 60)
        serving = asyncio.create_task(s.agent.run())
        try:
            await wait_run_status(s.researcher, int(other["id"]), {"active"}, timeout_s=30)
            await s.revoke(revoked, "the study ended")
            runs = {
                name: await only_run(s, task, timeout_s=40)
                for name, task in (("expired", long_one), ("revoked", other))
            }
        finally:
            s.agent.stop()
            await asyncio.wait_for(serving, 30)
        assert runs["revoked"]["status"] == "killed", runs
        assert runs["revoked"]["reason"].startswith("lease-revoked: "), runs
        assert "the study ended" in runs["revoked"]["reason"]
        assert runs["expired"]["status"] == "killed", runs
        assert runs["expired"]["reason"].startswith("lease-expired: "), runs
        assert expiring[:12] in runs["expired"]["reason"]
        assert await s.guard.receipts.deliver()
        statuses = {r.body.run: r.body.status for r in s.ledger.state.receipts_for(s.org)}
        assert statuses == {runs["expired"]["id"]: "killed", runs["revoked"]["id"]: "killed"}


@pytest.mark.mqtt
async def test_a_revocation_rings_the_doorbell_and_the_run_is_killed(
    tmp_path: Path, mqtt_broker: infra.Broker
) -> None:
    """With the broker up the node syncs only on a ring (or a timer at an expiry, or once a minute): the
    revocation's ring is what kills the run here."""
    async with site(tmp_path, mqtt_url=mqtt_broker.url) as s:
        lease = await s.grant(await s.register("patients"))
        task = await s.task("patients", "sleep", 60)
        serving = asyncio.create_task(s.agent.run())
        try:
            await wait_run_status(s.researcher, int(task["id"]), {"active"}, timeout_s=30)
            assert s.agent.doorbell is not None and s.agent.doorbell.connected.is_set()
            await s.revoke(lease, "consent withdrawn")
            run = await only_run(s, task, timeout_s=40)
        finally:
            s.agent.stop()
            await asyncio.wait_for(serving, 30)
        assert run["status"] == "killed" and run["reason"].startswith("lease-revoked: "), run


async def test_reservations_and_queued_receipts_survive_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database_url: str | None
) -> None:
    """A run's receipt is queued while the ledger cannot take it; node and server restart; the reservation
    still refuses a second run on a one-run lease, and the queued receipt is sent by the restarted node
    (on SQLite and on PostgreSQL)."""
    async with site(tmp_path, database_url=database_url) as s:
        lease = await s.grant(await s.register("patients"), max_runs=1)
        first = await s.task("patients", "echo", 1)

        async def hold() -> None:
            await asyncio.Event().wait()

        monkeypatch.setattr(s.guard.receipts, "run", hold)  # nothing is sent by this agent
        await s.agent.run(burst=True)
        done = await only_run(s, first)
        assert done["status"] == "completed"
        second = await s.task("patients", "echo", 2)
        settings, server = s.settings, s.server
    store = LeaseStore(settings.data_dir / LEASES_FILE)
    assert [q.run_key.rpartition(":")[2] for q in store.queued()] == [str(done["id"])]
    store.close()
    await server.stop()  # stopped already with the site; the server restarts with the node
    await server.start()
    try:
        async with (
            Agent(settings) as agent,
            AsyncClient(server.url, key_file=settings.key_path) as researcher,
        ):
            await researcher.login("res-alpha", PASSWORD)
            await agent.run(burst=True)
            (run,) = await wait_run_status(researcher, int(second["id"]), FINAL)
            assert run["status"] == "not-allowed" and "exhausted" in run["reason"], run
            assert agent.services is not None and agent.services.leases is not None
            assert await agent.services.leases.receipts.deliver()
            ledger = agent.services.ledger
            assert ledger is not None
            (receipt,) = ledger.state.receipts_for(researcher.organization_id)
            assert receipt.body.run == done["id"] and receipt.body.datasets[0].lease == lease
            assert not LeaseStore(settings.data_dir / LEASES_FILE).queued()
    finally:
        await server.stop()


async def test_leases_off_keeps_todays_behaviour(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="vfed")
    async with site(tmp_path, leases="off") as s:
        assert s.agent.services is not None
        assert s.agent.services.ledger is None and s.agent.services.leases is None
        task = await s.task("patients", "echo", 1)
        await s.agent.run(burst=True)
        assert (await only_run(s, task))["status"] == "completed"
    assert any("leases: off" in r.getMessage() for r in caplog.records)
