"""Simulated nodes for the fan-out benchmark and test: a real `vserver start` on PostgreSQL and Mosquitto, and
many nodes in one asyncio process that do what the agent does on a doorbell, minus the containers.

Each simulated node logs in to the API, subscribes to its doorbell topic on the broker, and on a `run-created`
ring waits the ring's spread (`vfed.node.doorbell.claim_delay_s`, the agent's own rule), claims the run,
uploads a tiny result and sets the run `completed`. A `poll` ring (the server's queue was full) lists the
node's pending runs and does the same for each. There is no periodic poll: what completes came through the
doorbell, so a lost message shows as a run that never completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import yaml
from tests import infra

from vfed.node.doorbell import Ring, claim_delay_s, parse, topic_for

VSERVER = [sys.executable, "-m", "vfed.server.cli", "--log-level", "WARNING"]
RESULT = b"\x00" * 64  # a tiny result: what is measured is the path, not the bytes
BENCH_TOPIC = "vfed/bench/fanout"
PASSWORD = "fanout bench password"


@dataclass(frozen=True)
class Federation:
    """A server configuration and the node API keys of one collaboration of `orgs` organizations."""

    config: Path
    url: str
    metrics_url: str
    keys: dict[str, str]


def federation(tmp: Path, orgs: int, database_url: str, mqtt_url: str, **mqtt: Any) -> Federation:
    """Config and `vserver import` of `orgs` organizations, each with one node, all in one collaboration, and
    a researcher. The server manages no broker accounts (the broker takes anonymous clients)."""
    port, metrics_port = infra.free_port(), infra.free_port()
    cfg = tmp / "vserver.yaml"
    settings = {
        "port": port,
        "data_dir": str(tmp / "data"),
        "jwt_secret": "fanout-secret-long-enough-for-hs256-signing",
        "database_url": database_url,
        "mqtt": {"url": mqtt_url, **mqtt},
        "metrics": {"port": metrics_port},
    }
    cfg.write_text(yaml.safe_dump(settings))
    names = [f"org{i}" for i in range(orgs)]
    spec = {
        "organizations": [{"name": o} for o in names],
        "collaborations": [{"name": "fanout", "organizations": names}],
        "users": [{"username": "res", "password": PASSWORD, "organization": "org0", "roles": ["researcher"]}],
        "nodes": [
            {"name": f"n{i}", "organization": o, "collaboration": "fanout"} for i, o in enumerate(names)
        ],
    }
    imp = tmp / "import.yaml"
    imp.write_text(yaml.safe_dump(spec))
    out = subprocess.run(
        [*VSERVER, "import", str(imp), "--config", str(cfg)], capture_output=True, text=True, check=True
    )
    keys = {}
    for line in out.stdout.splitlines():
        if "API key" in line:
            keys[line.split()[1].rstrip(":")] = line.rsplit(" ", 1)[1]
    if len(keys) != orgs:
        raise RuntimeError(
            f"vserver import printed {len(keys)} node keys, expected {orgs}:\n{out.stdout[-2000:]}"
        )
    return Federation(cfg, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", keys)


@contextlib.contextmanager
def server(fed: Federation, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`vserver start` in a process group of its own, killed as a group afterwards (nothing outlives it)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*VSERVER, "start", "--config", str(fed.config)], stdout=out, stderr=out, start_new_session=True
        )
        try:
            port = int(fed.url.rsplit(":", 1)[1])
            infra.wait_for_port(port, 60, lambda: proc.poll() is None)
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@dataclass
class Tally:
    """What the simulated nodes saw and did, with times (time.monotonic) for the measurements."""

    rings: dict[tuple[int, str], list[tuple[float, Ring]]] = field(default_factory=lambda: defaultdict(list))
    """(node id, event) -> every ring of that event the node heard, with when."""
    bench_heard: dict[int, float] = field(default_factory=dict)
    """node id -> when it heard the broker-only fan-out message."""
    claims: Counter[int] = field(default_factory=Counter)
    """run id -> successful claims."""
    conflicts: int = 0
    claimed_orgs: dict[int, list[int]] = field(default_factory=dict)
    """run id -> the task's target organizations as the claim's answer named them."""
    completed: dict[int, float] = field(default_factory=dict)
    """run id -> when its PATCH completed answered."""
    errors: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set whenever a run completes or a node hears the broker-only message."""

    async def until(self, done: Callable[[], bool], timeout_s: float) -> None:
        """Wait until `done()` holds, looked at again after every change; TimeoutError after `timeout_s`."""
        async with asyncio.timeout(timeout_s):
            while not done():
                self.changed.clear()
                await self.changed.wait()


class Simulator:
    """`nodes` simulated nodes sharing one HTTP connection pool of `http_limit` connections."""

    def __init__(self, fed: Federation, broker: infra.Broker, http_limit: int = 64) -> None:
        self.fed, self.broker = fed, broker
        self.tally = Tally()
        self._http_limit = http_limit
        self._http: aiohttp.ClientSession | None = None
        self._tokens: dict[int, dict[str, str]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._work: set[asyncio.Task[None]] = set()
        self._subscribed = 0
        self._all_subscribed = asyncio.Event()

    async def __aenter__(self) -> Simulator:
        connector = aiohttp.TCPConnector(limit=self._http_limit)
        self._http = aiohttp.ClientSession(self.fed.url, connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in [*self._tasks, *self._work]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._work, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None
        return self._http

    @property
    def node_ids(self) -> list[int]:
        return sorted(self._tokens)

    async def start(self, timeout_s: float = 120) -> None:
        """Log every node in (a few at a time, as nodes come up), then subscribe them all."""
        logins = asyncio.Semaphore(8)

        async def login(api_key: str) -> tuple[int, dict[str, str]]:
            async with logins:
                r = await self.http.post("/api/v1/token/node", json={"api_key": api_key})
                doc = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"node login: {r.status} {doc}")
                return int(doc["node_id"]), {"Authorization": f"Bearer {doc['access_token']}"}

        self._tokens = dict(await asyncio.gather(*(login(k) for k in self.fed.keys.values())))
        connects = asyncio.Semaphore(32)
        for node_id in self._tokens:
            self._tasks.append(asyncio.create_task(self._listen(node_id, connects), name=f"node-{node_id}"))
        async with asyncio.timeout(timeout_s):
            await self._all_subscribed.wait()
        if self.tally.errors:
            raise RuntimeError("simulated nodes could not subscribe: " + "; ".join(self.tally.errors[:5]))

    async def _listen(self, node_id: int, connects: asyncio.Semaphore) -> None:
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with connects:
                    client = aiomqtt.Client(self.broker.host, self.broker.port, keepalive=120, timeout=60)
                    await stack.enter_async_context(client)
                    await client.subscribe(topic_for(node_id), qos=1)
                    await client.subscribe(BENCH_TOPIC, qos=0)
                self._subscribed += 1
                if self._subscribed == len(self._tokens):
                    self._all_subscribed.set()
                async for msg in client.messages:
                    self._heard(node_id, msg)
        except aiomqtt.MqttError as exc:
            self.tally.errors.append(f"node {node_id}: broker: {exc}")
            self._all_subscribed.set()  # `start` fails at once instead of waiting out its timeout

    def _heard(self, node_id: int, msg: aiomqtt.Message) -> None:
        now = time.monotonic()
        if str(msg.topic) == BENCH_TOPIC:
            self.tally.bench_heard[node_id] = now
            self.tally.changed.set()
            return
        ring = parse(msg.payload)
        if ring is None:
            self.tally.errors.append(f"node {node_id}: not a doorbell message: {msg.payload!r}")
            return
        self.tally.rings[(node_id, ring.event)].append((now, ring))
        self._spawn(self._on_ring(node_id, ring))

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    async def _on_ring(self, node_id: int, ring: Ring) -> None:
        try:
            if ring.event == "run-created" and ring.run_id is not None:
                await asyncio.sleep(claim_delay_s(ring))
                await self._claim_and_complete(node_id, ring.run_id)
            elif ring.event == "poll":
                r = await self.http.get("/api/v1/runs?status=pending", headers=self._tokens[node_id])
                runs = (await r.json())["data"]
                for run in runs:
                    await self._claim_and_complete(node_id, int(run["id"]))
        except (aiohttp.ClientError, RuntimeError, KeyError) as exc:
            self.tally.errors.append(f"node {node_id}: {ring.event} {ring.run_id}: {exc!r}")

    async def _claim_and_complete(self, node_id: int, run_id: int) -> None:
        auth = self._tokens[node_id]
        r = await self.http.post(f"/api/v1/runs/{run_id}/claim", headers=auth)
        if r.status == 409:
            await r.read()
            self.tally.conflicts += 1
            return
        if r.status != 200:
            raise RuntimeError(f"claim {run_id}: {r.status} {await r.text()}")
        claimed = await r.json()
        self.tally.claims[run_id] += 1
        self.tally.claimed_orgs[run_id] = list(claimed["task"]["organization_ids"])
        r = await self.http.post("/api/v1/blobs", data=RESULT, headers=auth)
        if r.status != 201:
            raise RuntimeError(f"result upload for {run_id}: {r.status} {await r.text()}")
        blob = (await r.json())["id"]
        r = await self.http.patch(
            f"/api/v1/runs/{run_id}", json={"status": "completed", "result_blob_id": blob}, headers=auth
        )
        if r.status != 200:
            raise RuntimeError(f"completing {run_id}: {r.status} {await r.text()}")
        await r.read()
        self.tally.completed[run_id] = time.monotonic()
        self.tally.changed.set()

    async def researcher(self) -> dict[str, str]:
        r = await self.http.post("/api/v1/token/user", json={"username": "res", "password": PASSWORD})
        return {"Authorization": f"Bearer {(await r.json())['access_token']}"}

    async def create_task(self, user: dict[str, str]) -> tuple[dict[str, Any], float]:
        """One task to every organization of the collaboration; returns it and when its request was sent."""
        collab = (await (await self.http.get("/api/v1/collaborations", headers=user)).json())["data"][0]
        body = {
            "collaboration_id": collab["id"],
            "image": "bench/fanout:1",
            "organizations": [{"id": o} for o in collab["organization_ids"]],
        }
        data = aiohttp.FormData()
        data.add_field("task", json.dumps(body), content_type="application/json")
        data.add_field("input", os.urandom(256), content_type="application/octet-stream", filename="input")
        sent = time.monotonic()
        r = await self.http.post("/api/v1/tasks", data=data, headers=user)
        if r.status != 201:
            raise RuntimeError(f"task creation: {r.status} {await r.text()}")
        return dict(await r.json()), sent

    async def runs_of(self, user: dict[str, str], task_id: int) -> list[dict[str, Any]]:
        """All runs of a task as the server shows them (paged)."""
        runs: list[dict[str, Any]] = []
        page = 1
        while True:
            r = await self.http.get(f"/api/v1/runs?task_id={task_id}&per_page=500&page={page}", headers=user)
            data = (await r.json())["data"]
            runs.extend(data)
            if len(data) < 500:
                return runs
            page += 1

    async def wait_completed(self, run_ids: set[int], timeout_s: float) -> None:
        """Until every one of these runs completed (as the simulated nodes saw it), or TimeoutError."""
        await self.tally.until(lambda: run_ids <= self.tally.completed.keys(), timeout_s)

    async def broker_fanout(self, timeout_s: float = 30) -> list[float]:
        """The broker alone: one message to the topic every simulated node subscribed to; seconds until each
        node heard it."""
        self.tally.bench_heard.clear()
        async with aiomqtt.Client(self.broker.host, self.broker.port) as pub:
            sent = time.monotonic()
            await pub.publish(BENCH_TOPIC, b"{}", qos=0)
            await self.tally.until(lambda: len(self.tally.bench_heard) >= len(self._tokens), timeout_s)
        return [t - sent for t in self.tally.bench_heard.values()]


async def metric(http: aiohttp.ClientSession, url: str, name: str, labels: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    text = await (await http.get(url)).text()
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
