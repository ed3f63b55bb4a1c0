"""The node's image rules come before the engine: a name no rule admits is never looked up nor pulled (so a
task cannot make the node contact a registry its operator did not list), nothing is pulled unless
`pull_missing` is on, image rules can be limited to root initiating organizations, and a node that allows
every image says so.

The engine's side is observed for real: the node's runtime talks to Docker through a recording socket in front
of the engine (every API request the node makes, inspect and pull included), a loopback "registry" records
every connection the engine makes to it, and the engine's own image events are read for the refused name.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
from tests.node.node_harness import (
    PASSWORD,
    PROBE_DP_IMAGE,
    PROBE_IMAGE,
    ensure_probe_image,
    one_node,
    run_containers_gone,
    running_agent,
    server_sql,
    wait_run_status,
)
from tests.proxy.proxy_kit import World, call, signed

from vfed.client.client import AsyncClient
from vfed.node.agent import Agent
from vfed.node.config import NodeSettings, Policies, parse_settings
from vfed.node.policy import (
    ALLOWS_EVERY_IMAGE,
    IMAGE_REFUSED,
    check_run,
    image_gate,
    subtask_image_refusal,
)

__all__ = ["signed"]

FINAL = {"completed", "failed", "start-failed", "not-allowed", "killed", "crashed"}
ENGINE_SOCKET = "/var/run/docker.sock"
_REQUEST_LINE = re.compile(rb"(GET|POST|PUT|DELETE|HEAD) (\S+) HTTP/1\.[01]\r\n")


class EngineRecorder:
    """A Unix socket in front of the Docker engine that forwards every byte and keeps what clients sent, so
    the test can list every engine API request (`GET .../images/NAME/json` is an inspect, `POST
    .../images/create?fromImage=NAME` a pull)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sent: list[bytearray] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def requests(self) -> list[str]:
        """Every request as `METHOD /decoded/path?query`, in the order sent per connection."""
        return [
            f"{m.group(1).decode()} {unquote(m.group(2).decode())}"
            for sent in self._sent
            for m in _REQUEST_LINE.finditer(bytes(sent))
        ]

    async def __aenter__(self) -> EngineRecorder:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(ENGINE_SOCKET)
        self._writers += [writer, up_writer]
        sent = bytearray()
        self._sent.append(sent)
        await asyncio.gather(
            _pipe(reader, up_writer, sent), _pipe(up_reader, writer, None), return_exceptions=True
        )


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, keep: bytearray | None) -> None:
    try:
        while chunk := await source.read(65536):
            if keep is not None:
                keep += chunk
            sink.write(chunk)
            await sink.drain()
    finally:
        sink.close()


class LoopbackRegistry:
    """A TCP listener on the node's loopback where a task's image name points: counts every connection the
    engine opens to it (a pull would), answers nothing and hangs up."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> LoopbackRegistry:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()


@contextlib.asynccontextmanager
async def observed() -> AsyncIterator[tuple[EngineRecorder, LoopbackRegistry]]:
    folder = Path(tempfile.mkdtemp(prefix="vfed-eng-", dir="/tmp"))  # a short path: Unix sockets cap it
    try:
        async with EngineRecorder(folder / "engine.sock") as engine, LoopbackRegistry() as registry:
            yield engine, registry
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def probe_image() -> None:
    ensure_probe_image()


async def submit(researcher: AsyncClient, image: str) -> dict[str, Any]:
    collab = (await researcher.collaborations())[0]["id"]
    task = await researcher.create_task(collab, image, "echo", args=[1])
    (run,) = await wait_run_status(researcher, task["id"], FINAL, timeout_s=60)
    return dict(run)


def about(requests: list[str], name: str) -> list[str]:
    return [r for r in requests if name in r]


def image_events(docker_client: Any, name: str, since: float) -> list[dict[str, Any]]:
    """The engine's image events (pull, tag, delete, ...) that name this image, between since and now."""
    stream = docker_client.events(since=since, until=time.time() + 1, decode=True, filters={"type": "image"})
    return [e for e in stream if name in str(e.get("id", "")) + str(e.get("Actor", {}))]


@pytest.mark.docker
@pytest.mark.usefixtures("probe_image")
async def test_a_refused_image_is_never_looked_up_nor_pulled(tmp_path: Path, docker_client: Any) -> None:
    """Even with pull_missing on, a name no rule admits costs no engine call; an admitted one is pulled (the
    control: the same observation sees the engine's lookup, its pull and its connection to the registry)."""
    async with observed() as (engine, registry):
        refused = f"127.0.0.1:{registry.port}/evil/probe:1"
        admitted = f"127.0.0.1:{registry.port}/admitted/probe:1"
        since = time.time() - 1
        async with (
            one_node(
                tmp_path,
                "ip",
                poll_interval_s=0.3,
                policies={"allowed_images": [PROBE_IMAGE, f"127.0.0.1:{registry.port}/admitted/*"]},
                runtime={"kind": "docker", "base_url": engine.url, "pull_missing": True},
            ) as (server, settings),
            running_agent(settings),
            AsyncClient(server.url, key_file=settings.key_path) as researcher,
        ):
            await researcher.login("res-alpha", PASSWORD)
            run = await submit(researcher, refused)
            assert run["status"] == "not-allowed", run
            assert run["reason"].startswith(f"{IMAGE_REFUSED}: image {refused} is not in this node's "), run
            assert "before any lookup or pull" in run["reason"]
            assert registry.connections == 0
            assert about(engine.requests(), "/evil/") == []
            assert image_events(docker_client, "/evil/", since) == []

            control = await submit(researcher, admitted)
            assert control["status"] == "start-failed" and "is not available" in control["reason"], control
            assert registry.connections > 0  # the engine went to the registry the name points at
            calls = about(engine.requests(), "/admitted/")
            assert any(c.startswith("GET ") and c.endswith("/json") for c in calls), calls  # the lookup
            assert any(c.startswith("POST ") and "/images/create?" in c for c in calls), calls  # the pull

            assert (await submit(researcher, PROBE_IMAGE))["status"] == "completed"
            await run_containers_gone(settings.name)
    assert about(engine.requests(), "/evil/") == []


@pytest.mark.docker
@pytest.mark.usefixtures("probe_image")
async def test_nothing_is_pulled_by_default(tmp_path: Path) -> None:
    """`pull_missing` is off unless set: an admitted image that is not here is looked up, never pulled."""
    async with observed() as (engine, registry):
        admitted = f"127.0.0.1:{registry.port}/admitted/probe:1"
        async with (
            one_node(
                tmp_path,
                "iq",
                poll_interval_s=0.3,
                policies={"allowed_images": [f"127.0.0.1:{registry.port}/admitted/*"]},
                runtime={"kind": "docker", "base_url": engine.url},
            ) as (server, settings),
            running_agent(settings),
            AsyncClient(server.url, key_file=settings.key_path) as researcher,
        ):
            await researcher.login("res-alpha", PASSWORD)
            run = await submit(researcher, admitted)
        assert run["status"] == "start-failed" and "is not available" in run["reason"], run
        calls = about(engine.requests(), "/admitted/")
        assert any(c.startswith("GET ") and c.endswith("/json") for c in calls), calls
        assert not any("/images/create" in c for c in calls), calls
        assert registry.connections == 0


@pytest.mark.docker
@pytest.mark.usefixtures("probe_image")
async def test_an_image_rule_for_other_organizations_refuses_the_run(tmp_path: Path) -> None:
    """A rule naming root initiating organizations admits the image only for their tasks."""
    async with one_node(tmp_path, "io", poll_interval_s=0.3) as (server, settings):
        ((org,),) = await server_sql(server, "SELECT id FROM organizations")
        rules = [{"image": PROBE_IMAGE, "organizations": [org + 1]}, {"image": PROBE_DP_IMAGE}]
        limited = settings.model_copy(update={"policies": Policies.model_validate({"allowed_images": rules})})
        async with (
            running_agent(limited),
            AsyncClient(server.url, key_file=settings.key_path) as researcher,
        ):
            await researcher.login("res-alpha", PASSWORD)
            refused = await submit(researcher, PROBE_IMAGE)
            allowed = await submit(researcher, PROBE_DP_IMAGE)
            await run_containers_gone(settings.name)
    assert refused["status"] == "not-allowed", refused
    assert refused["reason"].startswith(f"{IMAGE_REFUSED}: ") and f"organization {org}" in refused["reason"]
    assert allowed["status"] == "completed", allowed


@pytest.mark.docker
async def test_a_node_allowing_every_image_warns_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vfed.node.agent")
    async with one_node(tmp_path, "iw") as (_, settings):
        async with Agent(settings):
            pass
        assert ALLOWS_EVERY_IMAGE in caplog.text
        caplog.clear()
        listed = settings.model_copy(
            update={"policies": Policies.model_validate({"allowed_images": ["x/*"]})}
        )
        async with Agent(listed):
            pass
        assert ALLOWS_EVERY_IMAGE not in caplog.text


def settings_with(policies: dict[str, Any]) -> NodeSettings:
    return parse_settings({"api_key": "a.b", "data_dir": "/nonexistent", "policies": policies})


DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("policies", "image", "lookup", "pull"),
    [
        ({}, "anything/at:all", True, True),  # no rules: the old behaviour (warned about at start)
        ({"allowed_images": []}, "vfed/x", False, False),  # what `vnode new` writes: nothing
        ({"allowed_images": ["vfed/*"]}, "vfed/x", True, True),
        ({"allowed_images": ["vfed/*"]}, "127.0.0.1:5000/vfed/x", False, False),
        ({"allowed_images": [DIGEST]}, f"any/name@{DIGEST}", True, True),  # the name pins the digest
        ({"allowed_images": [DIGEST]}, DIGEST, True, True),  # the image ID itself
        ({"allowed_images": [DIGEST]}, "any/tag:1", True, False),  # only its local ID can tell: no pull
        ({"allowed_images": [{"image": "vfed/*", "organizations": [2]}]}, "vfed/x", True, True),
    ],
)
def test_the_gate_decides_from_the_name(
    policies: dict[str, Any], image: str, lookup: bool, pull: bool
) -> None:
    gate = image_gate(settings_with(policies), image)
    assert (gate.lookup, gate.pull) == (lookup, pull)
    assert (gate.reason == "") is lookup


def test_image_rules_for_root_organizations() -> None:
    """The root initiator (last in the chain) decides; a subtask's own initiator does not."""
    settings = settings_with({"allowed_images": [{"image": "vfed/*", "organizations": [1]}, "open/*"]})
    assert check_run(settings, image="vfed/x", digest=None, initiators=[(1, 7)]).allowed
    assert check_run(settings, image="vfed/x", digest=None, initiators=[(2, None), (1, 7)]).allowed
    refused = check_run(settings, image="vfed/x", digest=None, initiators=[(1, None), (2, 7)])
    assert (
        not refused.allowed
        and refused.reason.startswith(IMAGE_REFUSED)
        and "organization 2" in refused.reason
    )
    assert check_run(settings, image="open/x", digest=None, initiators=[(2, 7)]).allowed
    assert subtask_image_refusal(settings, "vfed/x", 1) is None
    assert "organization 2" in str(subtask_image_refusal(settings, "vfed/x", 2))
    assert subtask_image_refusal(settings, "elsewhere/x", 1) is not None
    assert subtask_image_refusal(settings_with({}), "elsewhere/x", 1) is None


async def test_the_proxy_refuses_a_subtask_image_the_policy_refuses_its_root(signed: World) -> None:
    """An algorithm asks its proxy for a subtask in another image: refused (403, JSON) unless the node's rules
    allow that image for the organization at the root of the run's chain; nothing reaches the server."""
    world = signed
    a, b = world.org_ids["a"], world.org_ids["b"]
    new = {"name": "s", "image": PROBE_DP_IMAGE, "input": {"method": "echo"}, "organizations": [b]}
    rules = [{"image": "vfed-test/*", "organizations": [b]}]
    world.ctx.image_refusal = functools.partial(
        subtask_image_refusal, settings_with({"allowed_images": rules})
    )
    tasks_before = await server_sql(world.server, "SELECT id FROM tasks")

    status, body = await call(world, "POST", "/tasks", json=new)

    assert status == 403 and isinstance(body, dict) and body["error"] == "image-not-allowed", body
    assert PROBE_DP_IMAGE in body["detail"] and f"organization {a}" in body["detail"]
    assert await server_sql(world.server, "SELECT id FROM tasks") == tasks_before
    assert world.ctx.created == 0  # a refusal takes no subtask slot
    own = {"name": "s", "input": {"method": "echo"}, "organizations": [b]}  # the run's own image
    status, body = await call(world, "POST", "/tasks", json=own)
    assert status == 201, body
    rules = [{"image": "vfed-test/*", "organizations": [a]}]
    world.ctx.image_refusal = functools.partial(
        subtask_image_refusal, settings_with({"allowed_images": rules})
    )
    status, body = await call(world, "POST", "/tasks", json=new)
    assert status == 201, body


@pytest.mark.docker
@pytest.mark.usefixtures("probe_image")
async def test_every_node_refuses_a_subtask_image_its_policy_refuses_the_root(
    signed: World, tmp_path: Path
) -> None:
    """Allowed at the proxy's node, the subtask still meets the target node's own rules: organization b runs
    the image only for tasks b's own researchers started, so a's chain is refused there."""
    world = signed
    a, b = world.org_ids["a"], world.org_ids["b"]
    new = {"name": "s", "image": PROBE_DP_IMAGE, "input": {"method": "echo"}, "organizations": [b]}
    status, body = await call(world, "POST", "/tasks", json=new)
    assert status == 201 and isinstance(body, dict), body
    key_file = tmp_path / "b-key.json"
    world.keyrings["b"].save(key_file)
    settings = parse_settings(
        {
            "name": f"is{secrets.token_hex(3)}",
            "server_url": world.server.url,
            "api_key": world.nodes["b"]._api_key,
            "data_dir": str(tmp_path / "b-data"),
            "private_key": str(key_file),
            "trust": "tofu",
            "policies": {"allowed_images": [{"image": "vfed-test/*", "organizations": [b]}]},
        }
    )
    async with Agent(settings) as agent:
        await agent.run(burst=True)
    (run,) = await world.nodes["b"].list_runs(task_id=body["task_id"])
    assert run.status == "not-allowed", run
    assert run.reason is not None and run.reason.startswith(f"{IMAGE_REFUSED}: image {PROBE_DP_IMAGE}")
    assert f"organization {a}" in run.reason


@pytest.mark.docker
@pytest.mark.usefixtures("probe_image")
async def test_a_running_algorithm_cannot_create_a_subtask_in_an_image_its_node_refuses(
    tmp_path: Path,
) -> None:
    """The node's own proxy for a live run (the socket its container talks to) applies the node's rules for
    the run's root initiator: a subtask in an image allowed only for another organization is refused."""
    async with one_node(tmp_path, "ir", poll_interval_s=0.3) as (server, settings):
        ((org,),) = await server_sql(server, "SELECT id FROM organizations")
        rules = [{"image": PROBE_IMAGE}, {"image": PROBE_DP_IMAGE, "organizations": [org + 1]}]
        limited = settings.model_copy(update={"policies": Policies.model_validate({"allowed_images": rules})})
        async with (
            running_agent(limited) as agent,
            AsyncClient(server.url, key_file=settings.key_path) as researcher,
        ):
            await researcher.login("res-alpha", PASSWORD)
            collab = (await researcher.collaborations())[0]["id"]
            task = await researcher.create_task(collab, PROBE_IMAGE, "sleep", args=[60])
            (run,) = await wait_run_status(researcher, task["id"], {"active"})
            assert agent.runner is not None
            socket = agent.runner.socket_path(run["id"])
            new = {"name": "s", "image": PROBE_DP_IMAGE, "input": {"method": "echo"}, "organizations": [org]}
            connector = aiohttp.UnixConnector(path=str(socket))
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.post("http://proxy/tasks", json=new) as answer,
            ):
                status, body = answer.status, await answer.json()
            await researcher.kill(task)
            await wait_run_status(researcher, task["id"], {"killed"})
            await run_containers_gone(settings.name)
            assert len(await researcher.tasks()) == 1  # the subtask was not created
    assert status == 403 and body["error"] == "image-not-allowed", body
    assert PROBE_DP_IMAGE in body["detail"] and f"organization {org}" in body["detail"]
