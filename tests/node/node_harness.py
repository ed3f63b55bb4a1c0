"""A real federation for the node and proxy tests: the server app on a loopback port, seeded through the
server's own importer, node configs, agent subprocesses (`vnode run`) and a researcher client."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from sqlalchemy import func, select, text
from tests import imagebuild, infra

from vfed.common.crypto import OrgKey, PublicKey, encrypt_bytes
from vfed.common.payload import TaskInput
from vfed.common.trust import Target, input_context, new_body, sign_document
from vfed.node.agent import Agent
from vfed.node.config import NodeSettings, load_settings
from vfed.server import db
from vfed.server.app import create_app
from vfed.server.config import MqttSettings, Settings
from vfed.server.importer import ImportFile, run_import
from vfed.server.models import Blob

PROBE_IMAGE = "vfed-test/node-probe"
PASSWORD = "correct-horse-battery"
ROOT = Path(__file__).resolve().parents[2]
VNODE = str(Path(sys.executable).parent / "vnode")


PROBE_DP_IMAGE = "vfed-test/node-probe-dp"
DP_MANIFEST = '{"version": 1, "functions": {"echo": {"kind": "federated", "epsilon_kwarg": "epsilon"}}}'


def ensure_probe_image() -> None:
    """Build the probe image (quick when cached) so the tests do not depend on build-images.sh order;
    a second tag carries a manifest label declaring `echo` as spending `epsilon`."""
    imagebuild.ensure("node-probe", PROBE_IMAGE)
    imagebuild.ensure("node-probe", PROBE_DP_IMAGE, {"vfed.manifest": DP_MANIFEST})


@dataclass
class Server:
    """The server app served on a fixed loopback port, so it can be stopped and started again."""

    data_dir: Path
    mqtt_url: str | None
    port: int = field(default_factory=infra.free_port)
    runner: web.AppRunner | None = None
    database_url: str | None = None
    """None: SQLite in the data folder (the server's default); else a SQLAlchemy async URL (PostgreSQL)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def settings(self) -> Settings:
        return Settings(
            host="127.0.0.1",
            port=self.port,
            data_dir=self.data_dir,
            jwt_secret="node-tests-secret-0123456789abcdefghij",
            mqtt=MqttSettings(url=self.mqtt_url),
            database_url=self.database_url,
        )

    async def start(self) -> None:
        self.runner = web.AppRunner(create_app(self.settings()), access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def seed(self, orgs: list[str], collaboration: str = "collab") -> dict[str, str]:
        """Organizations, one collaboration, a researcher and a node per organization; node API keys."""
        return await self.import_spec(
            {
                "organizations": [{"name": o} for o in orgs],
                "collaborations": [{"name": collaboration, "organizations": orgs}],
                "users": [{"username": f"res-{o}", "password": PASSWORD, "organization": o} for o in orgs],
                "nodes": [
                    {"name": f"node-{o}", "organization": o, "collaboration": collaboration} for o in orgs
                ],
            }
        )

    async def import_spec(self, raw: dict[str, Any]) -> dict[str, str]:
        """`vserver import` of a federation document into the server's database; node API keys by the
        organization part of each node's name (`node-<org>`)."""
        spec = ImportFile.model_validate(raw)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        engine = db.make_engine(self.settings().db_url())
        try:
            await db.upgrade(engine)
            async with db.make_sessionmaker(engine)() as s:
                lines = await run_import(s, spec)
        finally:
            await engine.dispose()
        keys = {}
        for line in lines:
            found = re.match(r"node node-(\S+): created; API key \(shown once\): (\S+)", line)
            if found:
                keys[found.group(1)] = found.group(2)
        return keys


def write_node_config(
    path: Path, *, name: str, api_key: str, server_url: str, mqtt_url: str | None, **extra: Any
) -> Path:
    """A node YAML file with test-friendly defaults (short poll, small limits). The test images write plain
    JSON, which disclosure control does not check: their policy says `unchecked_outputs: allow` unless the
    test's own `policies` say otherwise."""
    config: dict[str, Any] = {
        "name": name,
        "server_url": server_url,
        "api_key": api_key,
        "data_dir": str(path.parent / f"{name}-data"),
        "poll_interval_s": 1.0,
        "kill_grace_s": 1.0,
        "max_concurrent_runs": 4,
        "runtime": {"kind": "docker", "memory_bytes": 256 * 1024 * 1024},
    }
    if mqtt_url:
        config["mqtt_url"] = mqtt_url
    config["policies"] = {"unchecked_outputs": "allow", **(extra.pop("policies", None) or {})}
    config.update(extra)
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.asynccontextmanager
async def one_node(
    tmp_path: Path, prefix: str, org: str = "alpha", **config: Any
) -> AsyncIterator[tuple[Server, NodeSettings]]:
    """A started server with one seeded organization (researcher `res-<org>`) and its node's settings
    (from `<org>.yaml`, named `<prefix><6 hex>` so parallel tests never share container names), no broker."""
    server = Server(tmp_path / "server", mqtt_url=None)
    keys = await server.seed([org])
    await server.start()
    try:
        path = write_node_config(
            tmp_path / f"{org}.yaml",
            name=f"{prefix}{secrets.token_hex(3)}",
            api_key=keys[org],
            server_url=server.url,
            mqtt_url=None,
            **config,
        )
        yield server, load_settings(path)
    finally:
        await server.stop()


@dataclass
class AgentProcess:
    """`vnode run --config FILE` as a child process, logging to a file."""

    config: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [VNODE, "run", "--config", str(self.config), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def wait_for_log(self, text: str, timeout_s: float = 30.0) -> None:
        for _ in range(int(timeout_s * 10)):
            if text in self.log():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            await asyncio.sleep(0.1)
        raise AssertionError(f"{text!r} not in the agent log after {timeout_s} s:\n{self.log()[-3000:]}")


async def run_containers_gone(node_name: str, timeout_s: float = 30.0) -> None:
    """Wait until the node's agent removed its run containers: it reports a run's end first and removes the
    container right after, so a test that stops its agent at once would leave one behind."""
    import docker

    engine = docker.from_env(timeout=60)
    try:
        for _ in range(int(timeout_s * 10)):
            if not engine.containers.list(all=True, sparse=True, filters={"label": f"vfed.node={node_name}"}):
                return
            await asyncio.sleep(0.1)
    finally:
        engine.close()
    raise AssertionError(f"node {node_name}'s run containers are still there after {timeout_s} s")


async def run_containers_cleared(node_names: list[str]) -> None:
    """While the nodes' agents still serve (an agent removes a run's container right after reporting its end):
    wait until each node's run containers are gone; remove those still there after the wait, then fail naming
    their nodes (a container left would hold the job volume of the next agent with the same name)."""
    left = []
    for name in node_names:
        try:
            await run_containers_gone(name)
        except AssertionError:
            left.append(name)
            await asyncio.to_thread(remove_run_containers, name)
    assert not left, f"run containers of {left} were still there 30 s after the test"


def remove_run_containers(node_name: str) -> None:
    """Remove whatever run containers a failed test's node left (its job volumes go with the test's own
    clean-up, conftest._job_volumes_removed)."""
    import docker

    engine = docker.from_env(timeout=60)
    try:
        for found in engine.containers.list(all=True, filters={"label": f"vfed.node={node_name}"}):
            found.remove(force=True)
    finally:
        engine.close()


async def run_statuses(client: Any, task_id: int) -> list[tuple[int, str, str | None]]:
    """(organization, status, reason) of each run of a task."""
    return [(r["organization_id"], r["status"], r.get("reason")) for r in await client.runs(task_id)]


@contextlib.asynccontextmanager
async def running_agent(settings: NodeSettings, **kwargs: Any) -> AsyncIterator[Agent]:
    """An agent of this process serving in the background (the real loop, not burst mode)."""
    async with Agent(settings, **kwargs) as agent:
        loop = asyncio.create_task(agent.run())
        try:
            yield agent
        finally:
            agent.stop()
            await asyncio.wait_for(loop, 30)


@contextlib.asynccontextmanager
async def csv_nodes(
    tmp_path: Path, server: Server, keys: dict[str, str], data: dict[str, Path], prefix: str
) -> AsyncIterator[dict[str, NodeSettings]]:
    """A running node per organization of `data`, each offering its CSV file as the dataset `default` (named
    `<prefix><org's first letter><6 hex>`, polling fast, pinning at first use); their settings by
    organization. The runs' containers are gone when it ends (after a clean exit, checked before the agents
    stop; removed anyway)."""
    settings: dict[str, NodeSettings] = {}
    try:
        for org, csv in data.items():
            path = write_node_config(
                tmp_path / f"{org}.yaml",
                name=f"{prefix}{org[0]}{secrets.token_hex(3)}",
                api_key=keys[org],
                server_url=server.url,
                mqtt_url=None,
                poll_interval_s=0.3,
                datasets={"default": {"uri": str(csv), "type": "csv"}},
                trust="tofu",
            )
            settings[org] = load_settings(path)
        async with contextlib.AsyncExitStack() as agents:
            for node in settings.values():
                await agents.enter_async_context(running_agent(node))
            yield settings
            await run_containers_cleared([node.name for node in settings.values()])
    finally:
        for node in settings.values():
            await asyncio.to_thread(remove_run_containers, node.name)


@contextlib.asynccontextmanager
async def running_pair(tmp_path: Path, prefix: str) -> AsyncIterator[tuple[Server, dict[str, NodeSettings]]]:
    """A started server with organizations alpha and beta and a running node each (named `<prefix><a|b><6
    hex>`, polling fast, pinning at first use); their settings by organization. The runs' containers are
    gone when it ends (checked after a clean exit, removed in any case)."""
    server = Server(tmp_path / "server", mqtt_url=None)
    keys = await server.seed(["alpha", "beta"])
    await server.start()
    settings: dict[str, NodeSettings] = {}
    try:
        for org in ("alpha", "beta"):
            path = write_node_config(
                tmp_path / f"{org}.yaml",
                name=f"{prefix}{org[0]}{secrets.token_hex(3)}",
                api_key=keys[org],
                server_url=server.url,
                mqtt_url=None,
                poll_interval_s=0.3,
                trust="tofu",
            )
            settings[org] = load_settings(path)
        async with running_agent(settings["alpha"]), running_agent(settings["beta"]):
            yield server, settings
            for node in settings.values():
                await run_containers_gone(node.name)
    finally:
        for node in settings.values():
            await asyncio.to_thread(remove_run_containers, node.name)
        await server.stop()


async def wait_run_status(
    client: Any, task_id: int, statuses: set[str], timeout_s: float = 30.0
) -> list[dict[str, Any]]:
    """Poll the server until every run of the task has one of these statuses; answer the runs."""
    runs: list[dict[str, Any]] = []
    for _ in range(int(timeout_s * 10)):
        runs = await client.runs(task_id)
        if runs and all(r["status"] in statuses for r in runs):
            return runs
        await asyncio.sleep(0.1)
    raise AssertionError(f"runs of task {task_id} not in {statuses} after {timeout_s} s: {runs}")


async def stored_blobs(server: Server) -> int:
    """How many blobs the server holds (a row each; small ones keep their bytes in it, large ones on disk)."""
    engine = db.make_engine(server.settings().db_url())
    try:
        async with engine.connect() as connection:
            return int((await connection.execute(select(func.count()).select_from(Blob))).scalar_one())
    finally:
        await engine.dispose()


async def blob_size(server: Server, blob_id: str) -> int:
    """The size the server recorded for a blob."""
    engine = db.make_engine(server.settings().db_url())
    try:
        async with engine.connect() as connection:
            return int((await connection.execute(select(Blob.size).where(Blob.id == blob_id))).scalar_one())
    finally:
        await engine.dispose()


async def server_sql(server: Server, statement: str, **params: Any) -> list[Any]:
    """Run SQL on the server's database as an attacker with the server's disk would (rows of a SELECT)."""
    engine = db.make_engine(server.settings().db_url())
    try:
        async with engine.begin() as connection:
            result = await connection.execute(text(statement), params)
            return list(result.fetchall()) if result.returns_rows else []
    finally:
        await engine.dispose()


async def post_signed_task(
    researcher: Any,
    signer: OrgKey,
    *,
    collaboration: int,
    targets: dict[int, PublicKey],
    image: str,
    method: str = "echo",
    args: list[Any] | None = None,
    datasets: list[str] | None = None,
    signed: bool = True,
    ledger: tuple[int, str] | None = None,
) -> dict[str, Any]:
    """A task made by hand the way the client makes one (input sealed to `targets` and bound to the
    descriptor's nonce, descriptor signed by `signer` as the researcher's organization), or unsigned;
    `ledger`: the ledger head the descriptor says its signer verified."""
    nonce = secrets.token_hex(16)
    plaintext = TaskInput(method=method, args=args or []).to_json()
    envelope = encrypt_bytes(plaintext, signer, list(targets.values()), context=input_context(nonce))
    blob_id = (await researcher.api.upload_blob(envelope)).id
    digest = hashlib.sha256(envelope).hexdigest()
    body = new_body(
        collaboration=collaboration,
        initiator_org=researcher.organization_id,
        initiator_user=researcher.user_id,
        signer=signer.public,
        signer_role="organization",
        image=image,
        method=method,
        targets=[
            Target(org=org, datasets=datasets or [], input=digest, key_id=key.key_id)
            for org, key in targets.items()
        ],
        nonce=nonce,
        ledger=ledger,
    )
    fields: dict[str, Any] = {
        "collaboration_id": collaboration,
        "name": "by hand",
        "description": "",
        "image": image,
        "datasets": datasets or [],
        "organizations": [{"id": org, "input_blob_id": blob_id} for org in targets],
    }
    if signed:
        fields["descriptor"] = sign_document(body, signer).to_json()
    task: dict[str, Any] = await researcher.api.request("POST", "/tasks", json=fields)
    return task
