"""What a node checks before a run starts, with the server as the adversary: a real server app whose database
the test edits the way an attacker with the server's disk would, real Docker, real crypto.

Every refusal ends the run `not-allowed` with `<code>: <message>`, starts no container, is counted in
`vfed_node_trust_refusals_total{reason}`, and the node keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
from tests.node.node_harness import (
    PASSWORD,
    PROBE_DP_IMAGE,
    PROBE_IMAGE,
    Server,
    ensure_probe_image,
    one_node,
    post_signed_task,
    running_agent,
    server_sql,
    wait_run_status,
    write_node_config,
)

from vfed.client.client import AsyncClient
from vfed.common.crypto import Keyring
from vfed.common.trust import TrustStore, certify, fingerprint, records_for_keys, revoke
from vfed.node.agent import Agent
from vfed.node.config import NodeSettings, load_settings
from vfed.node.runtime.base import LABEL_NODE, LABEL_RUN_ID, RunSpec

pytestmark = [pytest.mark.docker]

FINAL = {"completed", "failed", "start-failed", "not-allowed", "killed", "crashed"}


@pytest.fixture(scope="module", autouse=True)
def probe_image() -> None:
    ensure_probe_image()


def refusals(agent: Agent, reason: str) -> float:
    value = agent.metrics.registry.get_sample_value("vfed_node_trust_refusals_total", {"reason": reason})
    return value or 0.0


@dataclass
class Started:
    """The run ids the runtime was asked to start (a refused run must never be among them)."""

    run_ids: list[str]


def watch_starts(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> Started:
    assert agent.services is not None
    runtime = agent.services.runtime
    seen = Started([])
    start, start_created = runtime.start, runtime.start_created

    async def recorded_start(spec: RunSpec) -> str:
        seen.run_ids.append(spec.run_id)
        return await start(spec)

    async def recorded_start_created(handle: str, spec: RunSpec) -> None:
        seen.run_ids.append(spec.run_id)
        await start_created(handle, spec)

    monkeypatch.setattr(runtime, "start", recorded_start)
    monkeypatch.setattr(runtime, "start_created", recorded_start_created)
    return seen


def no_container_for(client: docker.DockerClient, node: OneOrg, run_id: int) -> bool:
    """No container of this node for the run (created and removed ahead is fine; started is not)."""
    labels = [f"{LABEL_RUN_ID}={run_id}", f"{LABEL_NODE}={node.settings.name}"]
    return not client.containers.list(all=True, filters={"label": labels})


async def descriptor_of(server: Server, task_id: int) -> str:
    (row,) = await server_sql(server, "SELECT descriptor FROM tasks WHERE id = :id", id=task_id)
    return str(row[0])


async def only_run(researcher: AsyncClient, task: dict[str, Any]) -> dict[str, Any]:
    (run,) = await wait_run_status(researcher, int(task["id"]), FINAL, timeout_s=60)
    return dict(run)


@dataclass
class OneOrg:
    server: Server
    settings: NodeSettings
    agent: Agent
    researcher: AsyncClient
    collaboration: int

    @property
    def org(self) -> int:
        assert self.researcher.organization_id is not None
        return self.researcher.organization_id

    def keyring(self) -> Keyring:
        return Keyring.load(self.settings.key_path)


@pytest.fixture
async def alpha(tmp_path: Path) -> AsyncIterator[OneOrg]:
    """One organization, its agent set up (key chain published) but its loop not running: each test runs it
    in burst mode once the server's rows are as it wants them."""
    async with (
        one_node(tmp_path, "nt") as (server, settings),
        Agent(settings) as agent,
        AsyncClient(server.url, key_file=settings.key_path) as researcher,
    ):
        await researcher.login("res-alpha", PASSWORD)
        collaboration = int((await researcher.collaborations())[0]["id"])
        yield OneOrg(server, settings, agent, researcher, collaboration)


async def test_a_task_without_descriptor_is_refused_and_no_container_starts(
    alpha: OneOrg, docker_client: docker.DockerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    starts = watch_starts(alpha.agent, monkeypatch)
    key = alpha.keyring()
    unsigned = await post_signed_task(
        alpha.researcher,
        key.current,
        collaboration=alpha.collaboration,
        targets={alpha.org: key.current.public},
        image=PROBE_IMAGE,
        signed=False,
    )
    await alpha.agent.run(burst=True)
    run = await only_run(alpha.researcher, unsigned)
    assert run["status"] == "not-allowed", run
    assert run["reason"].startswith("unsigned-task: "), run
    assert str(run["id"]) not in starts.run_ids and no_container_for(docker_client, alpha, run["id"])
    assert refusals(alpha.agent, "unsigned-task") == 1
    # The node keeps serving: a signed task right after completes.
    good = await alpha.researcher.create_task(alpha.collaboration, PROBE_IMAGE, "echo", args=[1])
    await alpha.agent.run(burst=True)
    assert (await only_run(alpha.researcher, good))["status"] == "completed"


async def test_server_edits_of_task_rows_and_descriptors_are_refused(
    alpha: OneOrg, docker_client: docker.DockerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Image, datasets, initiator and descriptor changed in the server's database after the task was made."""
    starts = watch_starts(alpha.agent, monkeypatch)
    r = alpha.researcher
    tasks = {
        name: await r.create_task(alpha.collaboration, PROBE_IMAGE, "echo", args=[1])
        for name in ("image", "datasets", "initiator", "input", "descriptor", "honest")
    }
    await server_sql(
        alpha.server,
        "INSERT INTO organizations (name, created_at) VALUES ('mallory', CURRENT_TIMESTAMP)",
    )
    (mallory,) = (await server_sql(alpha.server, "SELECT id FROM organizations WHERE name = 'mallory'"))[0]
    edits = {
        "image": ("UPDATE tasks SET image = :v WHERE id = :id", PROBE_DP_IMAGE),
        "datasets": ("UPDATE tasks SET datasets = :v WHERE id = :id", json.dumps(["patients"])),
        "initiator": ("UPDATE tasks SET initiator_organization_id = :v WHERE id = :id", mallory),
    }
    for name, (statement, value) in edits.items():
        await server_sql(alpha.server, statement, v=value, id=tasks[name]["id"])
    await server_sql(  # another task's input (a valid envelope from the same researcher) for this run
        alpha.server,
        "UPDATE runs SET input_blob_id = (SELECT input_blob_id FROM runs WHERE task_id = :honest)"
        " WHERE task_id = :id",
        honest=tasks["honest"]["id"],
        id=tasks["input"]["id"],
    )
    text = await descriptor_of(alpha.server, tasks["descriptor"]["id"])
    forged = json.loads(text)
    forged["descriptor"]["body"]["image"] = PROBE_DP_IMAGE  # a signed field, changed after signing
    await server_sql(
        alpha.server,
        "UPDATE tasks SET descriptor = :v, image = :image WHERE id = :id",
        v=json.dumps(forged),
        image=PROBE_DP_IMAGE,
        id=tasks["descriptor"]["id"],
    )
    await alpha.agent.run(burst=True)
    runs = {name: await only_run(r, task) for name, task in tasks.items()}
    expected = {
        "image": "descriptor-mismatch: ",
        "datasets": "descriptor-mismatch: ",
        "initiator": "descriptor-mismatch: ",
        "input": "descriptor-mismatch: ",
        "descriptor": "bad-descriptor: ",
    }
    for name, prefix in expected.items():
        assert runs[name]["status"] == "not-allowed", (name, runs[name])
        assert runs[name]["reason"].startswith(prefix), (name, runs[name])
        assert str(runs[name]["id"]) not in starts.run_ids
        assert no_container_for(docker_client, alpha, runs[name]["id"])
    assert "image" in runs["image"]["reason"] and "datasets" in runs["datasets"]["reason"]
    assert "hash differs" in runs["input"]["reason"]
    assert runs["honest"]["status"] == "completed", runs["honest"]
    assert refusals(alpha.agent, "descriptor-mismatch") == 4
    assert refusals(alpha.agent, "bad-descriptor") == 1


async def test_a_replayed_descriptor_is_refused(alpha: OneOrg, docker_client: docker.DockerClient) -> None:
    """The server makes a second task of a descriptor (and input) this node already executed."""
    r = alpha.researcher
    first = await r.create_task(alpha.collaboration, PROBE_IMAGE, "echo", args=[2])
    await alpha.agent.run(burst=True)
    done = await only_run(r, first)
    assert done["status"] == "completed"
    descriptor = await descriptor_of(alpha.server, first["id"])
    again = await r.api.request(
        "POST",
        "/tasks",
        json={
            "collaboration_id": alpha.collaboration,
            "name": "replay",
            "image": PROBE_IMAGE,
            "organizations": [{"id": alpha.org, "input_blob_id": done["input_blob_id"]}],
            "descriptor": descriptor,
        },
    )
    await alpha.agent.run(burst=True)
    replayed = await only_run(r, again)
    assert replayed["status"] == "not-allowed", replayed
    assert replayed["reason"].startswith("descriptor-replayed: "), replayed
    assert f"run {done['id']}" in replayed["reason"]
    assert no_container_for(docker_client, alpha, replayed["id"])
    assert refusals(alpha.agent, "descriptor-replayed") == 1


async def test_a_swapped_key_chain_on_the_server_is_refused(alpha: OneOrg) -> None:
    """The server replaces our organization's first key record with its own key and signs a descriptor with
    it: the node pins its own organization by its key file, so the chain does not verify."""
    r = alpha.researcher
    mallory = Keyring.generate()
    await server_sql(alpha.server, "DELETE FROM key_records WHERE organization_id = :org", org=alpha.org)
    (genesis,) = records_for_keys(alpha.org, mallory.keys)
    await server_sql(
        alpha.server,
        "INSERT INTO key_records (organization_id, kind, digest, key_id, prev_key_id, entry, created_at)"
        " VALUES (:org, :kind, :digest, :key_id, NULL, :entry, CURRENT_TIMESTAMP)",
        org=alpha.org,
        kind=genesis.kind,
        digest=genesis.digest,
        key_id=mallory.current.key_id,
        entry=genesis.to_json(),
    )
    forged = await post_signed_task(
        r,
        mallory.current,
        collaboration=alpha.collaboration,
        targets={alpha.org: alpha.keyring().current.public},
        image=PROBE_IMAGE,
    )
    await alpha.agent.run(burst=True)
    run = await only_run(r, forged)
    assert run["status"] == "not-allowed", run
    assert run["reason"].startswith("untrusted-key: "), run
    ours = fingerprint(alpha.keyring().keys[0].public)
    assert ours in run["reason"] and fingerprint(mallory.current.public) in run["reason"], run
    assert refusals(alpha.agent, "untrusted-key") == 1


async def test_an_input_sealed_to_a_long_replaced_key_is_refused(alpha: OneOrg) -> None:
    """Our key was replaced longer ago than key_grace_s (7 days): an input still sealed to it is refused."""
    keyring = alpha.keyring()
    old = keyring.current
    new = keyring.rotate()
    new.created_s = int(time.time()) - 10 * 86400  # the rotation record says: replaced 10 days ago
    keyring.save(alpha.settings.key_path)
    assert await alpha.agent.check_key_file()  # what the agent's watcher does within ~2 s
    stale = await post_signed_task(
        alpha.researcher,
        new,  # a usable signer; only the input's recipient key is stale
        collaboration=alpha.collaboration,
        targets={alpha.org: old.public},
        image=PROBE_IMAGE,
    )
    await alpha.agent.run(burst=True)
    run = await only_run(alpha.researcher, stale)
    assert run["status"] == "not-allowed", run
    assert run["reason"].startswith(f"stale-key: the input is sealed to key {old.key_id}"), run
    assert refusals(alpha.agent, "stale-key") == 1


async def test_an_unpinned_organization_is_refused_until_pinned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Node beta (trust: pinned) refuses alpha's task, names both fingerprints, counts it, keeps serving;
    once the admin pins alpha (the trust store file), the running agent runs alpha's next task."""
    server = Server(tmp_path / "server", mqtt_url=None)
    api_keys = await server.seed(["alpha", "beta"])
    await server.start()
    try:
        config = {
            name: load_settings(
                write_node_config(
                    tmp_path / f"{name}.yaml",
                    name=f"nt{name[0]}{tmp_path.name[-6:].lower().replace('_', '')}",
                    api_key=api_keys[name],
                    server_url=server.url,
                    mqtt_url=None,
                    poll_interval_s=0.3,
                )
            )
            for name in ("alpha", "beta")
        }
        async with Agent(config["alpha"]):
            pass  # publishes alpha's key chain
        alpha_root = Keyring.load(config["alpha"].key_path).keys[0].public
        caplog.set_level(logging.INFO, logger="vfed")
        async with (
            running_agent(config["beta"]) as beta,
            AsyncClient(server.url, key_file=config["alpha"].key_path) as researcher,
        ):
            await researcher.login("res-alpha", PASSWORD)
            collaboration = int((await researcher.collaborations())[0]["id"])
            assert beta.services is not None
            beta_org = beta.services.organization_id
            alpha_org = researcher.organization_id
            assert alpha_org is not None
            task = await researcher.create_task(collaboration, PROBE_IMAGE, "echo", organizations=[beta_org])
            run = await only_run(researcher, task)
            assert run["status"] == "not-allowed", run
            assert run["reason"].startswith(f"untrusted-key: organization {alpha_org} is not pinned"), run
            assert fingerprint(alpha_root) in run["reason"] and "pinned none" in run["reason"], run
            assert refusals(beta, "untrusted-key") == 1
            logged = [rec.getMessage() for rec in caplog.records if "is not trusted" in rec.getMessage()]
            assert any(f"organization {alpha_org}" in m and fingerprint(alpha_root) in m for m in logged)

            TrustStore(config["beta"].trust_store_path).pin(alpha_org, fingerprint(alpha_root))
            again = await researcher.create_task(collaboration, PROBE_IMAGE, "echo", organizations=[beta_org])
            done = await only_run(researcher, again)
            assert done["status"] == "completed", done
            (result,) = await researcher.results(again)
            assert result["organization_id"] == beta_org
    finally:
        await server.stop()


async def test_a_rotated_key_file_is_picked_up_by_the_running_agent(tmp_path: Path) -> None:
    """`vnode keys rotate` on the key file of a running agent: it publishes the rotation and the next task,
    sealed to the new key, runs; what was sealed to the old key still opens."""
    async with (
        one_node(tmp_path, "nk", poll_interval_s=0.3) as (server, settings),
        running_agent(settings) as agent,
        AsyncClient(server.url, key_file=settings.key_path) as researcher,
    ):
        assert agent.services is not None
        await researcher.login("res-alpha", PASSWORD)
        collaboration = int((await researcher.collaborations())[0]["id"])
        before = await researcher.create_task(collaboration, PROBE_IMAGE, "echo", args=[1])
        assert (await only_run(researcher, before))["status"] == "completed"
        keyring = Keyring.load(settings.key_path)
        old = keyring.current.key_id
        new = keyring.rotate().key_id
        keyring.save(settings.key_path)
        for _ in range(100):
            if agent.services.keyring.current.key_id == new:
                break
            await asyncio.sleep(0.1)
        assert agent.services.keyring.current.key_id == new
        assert [k.key_id for k in agent.services.keyring.keys] == [old, new]
        for _ in range(50):  # the agent publishes the rotation record
            org = await researcher.api.request("GET", f"/organizations/{researcher.organization_id}")
            if org["key_id"] == new:
                break
            await asyncio.sleep(0.1)
        assert org["key_id"] == new
        after = await researcher.create_task(collaboration, PROBE_IMAGE, "echo", args=[2])
        assert (await only_run(researcher, after))["status"] == "completed"
        descriptor = await descriptor_of(server, after["id"])
        assert json.loads(descriptor)["descriptor"]["body"]["targets"][0]["key_id"] == new
        assert [r["value"] for r in await researcher.results(before)] == [researcher.organization_id]
        assert agent.metrics.registry.get_sample_value("vnode_key_reloads_total") == 1


async def test_require_researcher_keys_runs_certified_researchers_only(tmp_path: Path) -> None:
    """With require_researcher_keys a task signed with the organization's key is refused; one signed with a
    researcher's own certified key runs and its result is sealed to that key; once the certificate is
    revoked (by the organization's key), the researcher's next task is refused."""
    async with (
        one_node(tmp_path, "nr", require_researcher_keys=True) as (server, settings),
        Agent(settings) as agent,
        AsyncClient(server.url, key_file=settings.key_path) as with_org_key,
    ):
        assert agent.services is not None
        client = agent.services.client
        await with_org_key.login("res-alpha", PASSWORD)
        org, user = with_org_key.organization_id, with_org_key.user_id
        assert org is not None and user is not None
        collaboration = int((await with_org_key.collaborations())[0]["id"])
        refused = await with_org_key.create_task(collaboration, PROBE_IMAGE, "echo", args=[1])

        own = Keyring.generate()
        own_file = tmp_path / "researcher-key.json"
        own.save(own_file)
        org_key = Keyring.load(settings.key_path).current
        certificate = certify(org_key, org, user, "res-alpha", own.current.public)
        body = {"certificate": certificate.model_dump(mode="json")}
        await client.request("POST", f"/organizations/{org}/certificates", json=body)
        async with AsyncClient(server.url, key_file=own_file) as researcher:
            await researcher.login("res-alpha", PASSWORD)
            runs = await researcher.create_task(collaboration, PROBE_IMAGE, "echo", args=[2])
            await agent.run(burst=True)
            first = await only_run(researcher, refused)
            assert first["status"] == "not-allowed", first
            assert first["reason"].startswith("researcher-key-required: "), first
            assert (await only_run(researcher, runs))["status"] == "completed"
            assert [r["value"] for r in await researcher.results(runs)] == [2 * org]
            later = await researcher.create_task(collaboration, PROBE_IMAGE, "echo", args=[3])
            revocation = revoke(org_key, org, certificate, "left the project")
            body = {"revocation": revocation.model_dump(mode="json")}
            await client.request("POST", f"/organizations/{org}/revocations", json=body)
            await agent.run(burst=True)
            revoked = await only_run(researcher, later)
        assert revoked["status"] == "not-allowed", revoked
        assert revoked["reason"].startswith("certificate-revoked: "), revoked
        assert refusals(agent, "researcher-key-required") == 1
        assert refusals(agent, "certificate-revoked") == 1
