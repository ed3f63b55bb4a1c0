"""The proxy's test world: a real server app, two organizations with published key chains, a researcher's
task claimed by organization a's node, and that run's proxy on a real Unix socket."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.node.node_harness import PASSWORD, Server

from vfed.client.client import AsyncClient
from vfed.common.crypto import Keyring
from vfed.common.trust import (
    ChainResolver,
    DescriptorDocument,
    TrustMode,
    TrustStore,
    records_for_keys,
)
from vfed.node.server_api import NodeClient
from vfed.proxy.app import ProxyContext, RunInfo
from vfed.proxy.rest import RestClient
from vfed.proxy.server import ProxyServer


@dataclass
class World:
    server: Server
    session: aiohttp.ClientSession
    nodes: dict[str, NodeClient]
    keyrings: dict[str, Keyring]
    org_ids: dict[str, int]
    parent_run: int
    parent_task: int
    proxy_session: aiohttp.ClientSession
    ctx: ProxyContext


@contextlib.asynccontextmanager
async def _world(tmp_path: Path, *, signed: bool) -> AsyncIterator[World]:
    """Organizations a and b (key chains published), a's researcher's task claimed by a's node, and the
    proxy of that run: with the run's verified descriptor and pinned chains (signed) or without (legacy)."""
    server = Server(tmp_path / "server", mqtt_url=None)
    api_keys = await server.seed(["a", "b"])
    await server.start()
    session = aiohttp.ClientSession()
    nodes, keyrings, org_ids = {}, {}, {}
    for name, api_key in api_keys.items():
        node = NodeClient(session, server.url, api_key)
        identity = await node.login()
        keyrings[name] = Keyring.generate()
        org_id = identity.organization_id
        await node.post_key_records(org_id, records_for_keys(org_id, keyrings[name].keys))
        nodes[name], org_ids[name] = node, org_id
    key_file = tmp_path / "a-key.json"
    keyrings["a"].save(key_file)
    async with AsyncClient(server.url, key_file=key_file) as researcher:
        await researcher.login("res-a", PASSWORD)
        collab = (await researcher.collaborations())[0]["id"]
        task = await researcher.create_task(
            collab, "vfed-test/node-probe", "master", organizations=[org_ids["a"]]
        )
    (run,) = await nodes["a"].list_runs(task_id=task["id"])
    run = await nodes["a"].claim(run.id)
    token = await nodes["a"].run_token(run.id)
    info = RunInfo(run.id, run.task_id, run.job_id, run.organization_id, collab, "vfed-test/node-probe")
    store = TrustStore(None, TrustMode.PINNED)
    for name, org_id in org_ids.items():
        store.pin(org_id, keyrings[name].keys[0].key_id)
    trust: dict[str, Any] = {"chains": ChainResolver(store, nodes["a"].key_records, nodes["a"].revocations)}
    if signed:
        stored = await nodes["a"].get_task(task["id"])
        assert stored.descriptor is not None
        trust["descriptor"] = DescriptorDocument.parse(stored.descriptor)
    ctx = ProxyContext(
        run=info,
        rest=RestClient(session, server.url, token),
        org_key=keyrings["a"].current,
        keyring=keyrings["a"],
        max_request_bytes=64 * 1024,
        spool_dir=tmp_path / "spool",
        **trust,
    )
    socket_path = tmp_path / "sock" / "proxy.sock"
    async with ProxyServer(ctx, socket_path):
        connector = aiohttp.UnixConnector(path=str(socket_path))
        async with aiohttp.ClientSession(connector=connector, base_url="http://proxy") as proxy_session:
            yield World(server, session, nodes, keyrings, org_ids, run.id, task["id"], proxy_session, ctx)
    await session.close()
    await server.stop()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with _world(tmp_path, signed=False) as w:
        yield w


@pytest.fixture
async def signed(tmp_path: Path) -> AsyncIterator[World]:
    async with _world(tmp_path, signed=True) as w:
        yield w


async def call(world: World, method: str, path: str, **kwargs: object) -> tuple[int, object]:
    async with world.proxy_session.request(method, path, **kwargs) as response:  # type: ignore[arg-type]
        body = await response.read()
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, body
