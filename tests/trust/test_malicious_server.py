"""A server that lies: it edits its own database between the researcher and the node, and every lie is caught.

The federation is real (the server app on loopback, a node agent with real Docker, the researcher's client);
the attacker is the server's operator, who can change any row. Each case ends with the run refused with a
typed reason and no container started for it, the node serving on, and an honest task still completing.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import docker
import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from tests.node.node_harness import (
    PASSWORD,
    PROBE_IMAGE,
    Server,
    ensure_probe_image,
    running_agent,
    wait_run_status,
    write_node_config,
)

from vfed.client.client import AsyncClient
from vfed.client.errors import ResultMismatch, TrustRefused
from vfed.common.crypto import Keyring, OrgKey
from vfed.common.trust import (
    DescriptorDocument,
    SignedEntry,
    Target,
    certify,
    fingerprint,
    genesis_record,
    new_body,
    records_for_keys,
    revoke,
    rotation_record,
    sign_document,
    sign_entry,
)
from vfed.node.config import load_settings
from vfed.node.runtime.base import container_name
from vfed.server import db
from vfed.server.models import Run, Task

ORGS = ["alpha", "beta", "gamma", "delta", "epsilon"]
FINAL = {"completed", "failed", "start-failed", "not-allowed", "killed", "crashed"}

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def probe_image() -> None:
    ensure_probe_image()


@dataclass
class Federation:
    """Five organizations; alpha runs a node (pinned mode, every other organization pinned)."""

    server: Server
    tmp: Path
    api_keys: dict[str, str]
    rings: dict[str, Keyring]
    ids: dict[str, int] = field(default_factory=dict)
    collaboration: int = 0
    http: aiohttp.ClientSession | None = None

    @property
    def api(self) -> str:
        return self.server.url + "/api/v1"

    async def node_headers(self, org: str) -> dict[str, str]:
        assert self.http is not None
        async with self.http.post(f"{self.api}/token/node", json={"api_key": self.api_keys[org]}) as r:
            body = await r.json()
            assert r.status == 200, body
        return {"Authorization": f"Bearer {body['access_token']}"}

    async def post(self, org: str, path: str, body: dict[str, Any]) -> Any:
        assert self.http is not None
        async with self.http.post(self.api + path, json=body, headers=await self.node_headers(org)) as r:
            answer = await r.json()
            assert r.status in (200, 201), (path, r.status, answer)
            return answer

    async def publish_chain(self, org: str) -> None:
        records = [e.model_dump(mode="json") for e in records_for_keys(self.ids[org], self.rings[org].keys)]
        await self.post(org, f"/organizations/{self.ids[org]}/key-records", {"records": records})

    def key_file(self, name: str, ring: Keyring) -> Path:
        path = self.tmp / f"{name}.key"
        ring.save(path)
        return path

    @contextlib.asynccontextmanager
    async def researcher(self, org: str, key_file: Path) -> AsyncIterator[AsyncClient]:
        trust = self.tmp / f"trust-{secrets.token_hex(4)}"
        async with AsyncClient(self.server.url, key_file=key_file, trust_file=trust, trust="pinned") as c:
            await c.login(f"res-{org}", PASSWORD)
            for other, ring in self.rings.items():
                c.trust(self.ids[other], fingerprint(ring.keys[0].public))
            yield c

    async def tamper(self, *statements: Any) -> None:
        """The operator's hand on the database."""
        engine = db.make_engine(self.server.settings().db_url())
        try:
            async with AsyncSession(engine, expire_on_commit=False) as s:
                for statement in statements:
                    await s.execute(statement)
                await s.commit()
        finally:
            await engine.dispose()

    async def task_row(self, task_id: int) -> Task:
        engine = db.make_engine(self.server.settings().db_url())
        try:
            async with AsyncSession(engine, expire_on_commit=False) as s:
                return (await s.execute(select(Task).where(Task.id == task_id))).scalar_one()
        finally:
            await engine.dispose()

    async def copy_task(self, task_id: int, **changes: Any) -> int:
        """A new task row (and a pending run for alpha) made by the server from an existing one."""
        engine = db.make_engine(self.server.settings().db_url())
        try:
            async with AsyncSession(engine, expire_on_commit=False) as s:
                old = (await s.execute(select(Task).where(Task.id == task_id))).scalar_one()
                run = (await s.execute(select(Run).where(Run.task_id == task_id))).scalars().first()
                assert run is not None
                fields = {
                    c.name: getattr(old, c.key)
                    for c in Task.__table__.columns
                    if c.name not in ("id", "status", "created_at", "job_id")
                }
                fields.update(changes)
                new = Task(**fields, status="pending")
                s.add(new)
                await s.flush()
                s.add(
                    Run(
                        task_id=new.id,
                        job_id=new.id,
                        organization_id=self.ids["alpha"],
                        status="pending",
                        input_blob_id=run.input_blob_id,
                    )
                )
                await s.commit()
                return int(new.id)
        finally:
            await engine.dispose()


@pytest.fixture
async def federation(tmp_path: Path) -> AsyncIterator[Federation]:
    server = Server(tmp_path / "server", mqtt_url=None)
    keys = await server.seed(ORGS)
    await server.start()
    rings = {org: Keyring.generate() for org in ORGS}
    fed = Federation(server, tmp_path, keys, rings)
    async with aiohttp.ClientSession() as http:
        fed.http = http
        headers = await fed.node_headers("alpha")
        async with http.get(f"{fed.api}/organizations", headers=headers) as r:
            fed.ids = {o["name"]: o["id"] for o in (await r.json())["data"]}
        async with http.get(f"{fed.api}/collaborations", headers=headers) as r:
            fed.collaboration = (await r.json())["data"][0]["id"]
        for org in ORGS:  # what each organization's node publishes at its first start
            await fed.publish_chain(org)
        try:
            yield fed
        finally:
            await server.stop()


def alpha_node(fed: Federation) -> Any:
    """Alpha's node: its own key file, every other organization pinned by fingerprint, one dataset."""
    data = fed.tmp / "alpha-data"
    data.mkdir()
    fed.rings["alpha"].save(data / "org-key.json")
    (data / "table.csv").write_text("x\n1\n2\n")
    trust = data / "trusted_orgs"
    trust.write_text(
        "".join(f"{fed.ids[o]} {fingerprint(fed.rings[o].keys[0].public)}\n" for o in ORGS if o != "alpha")
    )
    path = write_node_config(
        fed.tmp / "alpha.yaml",
        name=f"ms{secrets.token_hex(3)}",
        api_key=fed.api_keys["alpha"],
        server_url=fed.server.url,
        mqtt_url=None,
        data_dir=str(data),
        private_key=str(data / "org-key.json"),
        trust="pinned",
        trust_store=str(trust),
        poll_interval_s=0.3,
        datasets={"table": {"uri": str(data / "table.csv"), "type": "csv"}},
    )
    return load_settings(path)


def container_starts(client: docker.DockerClient, node: str, run_ids: list[int], since: float) -> list[int]:
    """Runs whose container the engine started since then."""
    names = {container_name(node, str(r)): r for r in run_ids}
    events = client.events(since=since, until=time.time(), filters={"type": "container"}, decode=True)
    return sorted(
        {
            names[e["Actor"]["Attributes"]["name"]]
            for e in events
            if e.get("Action") == "start" and e.get("Actor", {}).get("Attributes", {}).get("name") in names
        }
    )


async def only_run(client: AsyncClient, task_id: int) -> dict[str, Any]:
    (run,) = await wait_run_status(client, task_id, FINAL, timeout_s=90)
    return dict(run)


def forged_key_chain(org_id: int) -> list[SignedEntry]:
    """The server's own key, presented as the organization's first key."""
    return [genesis_record(org_id, OrgKey.generate())]


async def test_a_lying_server_is_caught_at_the_node(
    federation: Federation, docker_client: docker.DockerClient
) -> None:
    fed = federation
    ids = fed.ids
    alpha = ids["alpha"]
    # Researchers: alice with her own certified key, mallory certified then revoked, beta..epsilon's
    # researchers acting as their organizations (the older set-up, still accepted).
    alice_ring, mallory_ring = Keyring.generate(), Keyring.generate()
    users = {}
    for name in ("alpha", "beta"):
        async with AsyncClient(fed.server.url, trust_file=fed.tmp / "t0") as c:
            await c.login(f"res-{name}", PASSWORD)
            users[name] = c.user_id
    alice_cert = certify(
        fed.rings["alpha"].current, alpha, users["alpha"] or 0, "res-alpha", alice_ring.current.public
    )
    mallory_cert = certify(
        fed.rings["alpha"].current, alpha, users["alpha"] or 0, "res-alpha", mallory_ring.current.public
    )
    for cert in (alice_cert, mallory_cert):
        await fed.post(
            "alpha", f"/organizations/{alpha}/certificates", {"certificate": cert.model_dump(mode="json")}
        )

    cases: dict[str, tuple[int, str]] = {}  # name -> (task id, expected reason code)
    async with fed.researcher("alpha", fed.key_file("alice", alice_ring)) as alice:

        async def task(**kw: Any) -> int:
            created = await alice.create_task(
                fed.collaboration, PROBE_IMAGE, "echo", organizations=[alpha], **kw
            )
            return int(created["id"])

        honest = await task(args=[1])
        cases["image edited"] = (await task(args=[2]), "descriptor-mismatch")
        cases["datasets edited"] = (await task(args=[3]), "descriptor-mismatch")
        cases["initiator edited"] = (await task(args=[4]), "descriptor-mismatch")
        cases["input swapped"] = (await task(args=[5]), "descriptor-mismatch")
        cases["descriptor of another task"] = (await task(args=[6]), "descriptor-mismatch")
        swapped_parent_root = await task(args=[7])

    async with fed.researcher("alpha", fed.key_file("mallory", mallory_ring)) as mallory:
        created = await mallory.create_task(
            fed.collaboration, PROBE_IMAGE, "echo", organizations=[alpha], args=[8]
        )
        cases["revoked certificate"] = (int(created["id"]), "certificate-revoked")
    await fed.post(
        "alpha",
        f"/organizations/{alpha}/revocations",
        {
            "revocation": revoke(fed.rings["alpha"].current, alpha, mallory_cert, "left").model_dump(
                mode="json"
            )
        },
    )

    # Tasks initiated by the other organizations (signed with their organization keys).
    initiated: dict[str, int] = {}
    for org in ("beta", "gamma", "delta", "epsilon"):
        async with fed.researcher(org, fed.key_file(org, fed.rings[org])) as c:
            created = await c.create_task(
                fed.collaboration, PROBE_IMAGE, "echo", organizations=[alpha], args=[org]
            )
            initiated[org] = int(created["id"])
    cases["initiator's key swapped"] = (initiated["beta"], "untrusted-key")
    cases["rotation not signed by the previous key"] = (initiated["gamma"], "untrusted-key")
    cases["forked key chain"] = (initiated["delta"], "untrusted-key")

    # --- the operator's edits -------------------------------------------------------------------------
    rows = {name: await fed.task_row(task_id) for name, (task_id, _) in cases.items()}
    async with fed.researcher("alpha", fed.key_file("alice2", alice_ring)) as alice:
        honest_runs = await alice.runs(honest)
    await fed.tamper(
        update(Task).where(Task.id == rows["image edited"].id).values(image="vfed-test/node-probe-dp"),
        update(Task).where(Task.id == rows["datasets edited"].id).values(datasets=["table"]),
        update(Task)
        .where(Task.id == rows["initiator edited"].id)
        .values(initiator_organization_id=ids["epsilon"]),
        update(Run)
        .where(Run.task_id == rows["input swapped"].id)
        .values(input_blob_id=honest_runs[0]["input_blob_id"]),
        update(Task)
        .where(Task.id == rows["descriptor of another task"].id)
        .values(descriptor=rows["image edited"].descriptor),
    )
    # beta: the server serves its own key as beta's first key.
    from vfed.server.models import KeyRecord  # the server helper's model of the key_records table

    server_chain = forged_key_chain(ids["beta"])
    await fed.tamper(delete(KeyRecord).where(KeyRecord.organization_id == ids["beta"]))
    await _insert_records(fed, ids["beta"], server_chain)
    # gamma: a rotation to the server's key, signed by the server's key only.
    server_key = OrgKey.generate()
    forged_rotation = sign_entry(
        "key.rotation",
        {
            "org": ids["gamma"],
            "key": server_key.public.to_text(),
            "prev": fed.rings["gamma"].current.key_id,
            "created_at": int(time.time()),
        },
        [server_key],
    )
    await _insert_records(fed, ids["gamma"], [forged_rotation])
    # delta: two valid rotations from one key (a stolen key was used); the server shows both.
    delta = fed.rings["delta"].current
    await _insert_records(
        fed,
        ids["delta"],
        [
            rotation_record(ids["delta"], delta, OrgKey.generate()),
            rotation_record(ids["delta"], delta, OrgKey.generate()),
        ],
    )
    # A subtask at alpha whose root was forged: epsilon's genuine-looking subtask of alice's root, but
    # the server swapped the embedded parent for another of alice's tasks; and one whose whole chain the
    # server signed itself.
    root_doc = DescriptorDocument.parse((await fed.task_row(honest)).descriptor or "")
    other_root = DescriptorDocument.parse((await fed.task_row(swapped_parent_root)).descriptor or "")
    cases["subtask with a swapped root"] = (
        await fed.copy_task(
            honest, descriptor=_subtask(fed, root_doc, other_root, fed.rings["epsilon"].current).to_json()
        ),
        "bad-descriptor",
    )
    cases["subtask signed by the server"] = (
        await fed.copy_task(
            honest, descriptor=_subtask(fed, root_doc, root_doc, OrgKey.generate()).to_json()
        ),
        "bad-descriptor",
    )

    # --- the node runs, and refuses every lie ---------------------------------------------------------
    settings = alpha_node(fed)
    since = time.time()
    refused_runs: list[int] = []
    async with (
        running_agent(settings) as agent,
        fed.researcher("alpha", fed.key_file("alice3", alice_ring)) as alice,
    ):
        assert (await only_run(alice, honest))["status"] == "completed"
        for name, (task_id, code) in cases.items():
            run = await only_run(alice, task_id)
            assert run["status"] == "not-allowed", (name, run)
            assert str(run["reason"]).startswith(code + ":"), (name, code, run["reason"])
            refused_runs.append(int(run["id"]))
        # The server replays alice's executed descriptor and input under a new task.
        replay = await fed.copy_task(honest)
        run = await only_run(alice, replay)
        assert (run["status"], str(run["reason"]).split(":")[0]) == ("not-allowed", "descriptor-replayed")
        refused_runs.append(int(run["id"]))
        # The node kept serving: an honest task still completes, and its result reads back.
        after = await alice.create_task(
            fed.collaboration, PROBE_IMAGE, "echo", organizations=[alpha], args=[9]
        )
        assert (await only_run(alice, int(after["id"])))["status"] == "completed"
        assert len(await alice.results(after)) == 1
        # The server swaps the two honest tasks' results: the client refuses both.
        first, second = (await alice.runs(honest))[0], (await alice.runs(int(after["id"])))[0]
        await fed.tamper(
            update(Run).where(Run.id == first["id"]).values(result_blob_id=second["result_blob_id"]),
            update(Run).where(Run.id == second["id"]).values(result_blob_id=first["result_blob_id"]),
        )
        for task_id in (honest, int(after["id"])):
            with pytest.raises(ResultMismatch):
                await alice.results(task_id)
        counted = {
            code: agent.metrics.registry.get_sample_value("vfed_node_trust_refusals_total", {"reason": code})
            for code in {c for _, c in cases.values()} | {"descriptor-replayed"}
        }
    assert container_starts(docker_client, settings.name, refused_runs, since) == []
    expected = {code: float(sum(1 for _, c in cases.values() if c == code)) for code in counted}
    expected["descriptor-replayed"] = 1.0
    assert counted == expected


async def _insert_records(fed: Federation, org_id: int, records: list[SignedEntry]) -> None:
    from vfed.server.models import KeyRecord

    statements = []
    for entry in records:
        prev = entry.body.get("prev")
        key = str(entry.body["key"])
        from vfed.common.crypto import PublicKey

        statements.append(
            KeyRecord.__table__.insert().values(
                organization_id=org_id,
                kind=entry.kind,
                digest=entry.digest,
                key_id=PublicKey.from_text(key).key_id,
                prev_key_id=prev,
                entry=entry.to_json(),
            )
        )
    await fed.tamper(*statements)


def _subtask(
    fed: Federation, parent: DescriptorDocument, shown_parent: DescriptorDocument, signer: OrgKey
) -> DescriptorDocument:
    """A subtask at alpha in epsilon's name: it names `parent`, carries `shown_parent`, `signer` signs."""
    body = new_body(
        collaboration=fed.collaboration,
        initiator_org=fed.ids["epsilon"],
        initiator_user=None,
        signer=signer.public,
        signer_role="organization",
        image=PROBE_IMAGE,
        method="echo",
        targets=[Target(org=fed.ids["alpha"], input="0" * 64, key_id=fed.rings["alpha"].current.key_id)],
        parent=parent,
    )
    return sign_document(body, signer, None, shown_parent)


async def test_a_lying_server_is_caught_at_the_client(federation: Federation) -> None:
    """Keys swapped or forged on the server: the client refuses to seal to them; a result moved between two
    runs is refused when read."""
    fed = federation
    ids = fed.ids
    server_key = OrgKey.generate()
    forged = sign_entry(
        "key.rotation",
        {
            "org": ids["gamma"],
            "key": server_key.public.to_text(),
            "prev": fed.rings["gamma"].current.key_id,
            "created_at": 1,
        },
        [server_key],
    )
    await _insert_records(fed, ids["gamma"], [forged])
    from vfed.server.models import KeyRecord

    await fed.tamper(delete(KeyRecord).where(KeyRecord.organization_id == ids["beta"]))
    await _insert_records(fed, ids["beta"], forged_key_chain(ids["beta"]))
    async with fed.researcher("alpha", fed.key_file("alpha", fed.rings["alpha"])) as researcher:
        for org, words in (("beta", "does not match the pinned"), ("gamma", "previous and the new key")):
            with pytest.raises(TrustRefused, match=words) as caught:
                await researcher.create_task(fed.collaboration, PROBE_IMAGE, "echo", organizations=[ids[org]])
            assert caught.value.reason == "untrusted-key"
        listing = {o["id"]: o for o in await researcher.organizations_with_trust()}
        assert listing[ids["epsilon"]]["pinned"] == "yes", listing
        assert listing[ids["beta"]]["pinned"] == "MISMATCH", listing
