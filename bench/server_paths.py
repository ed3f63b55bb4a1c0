"""Server time per request on the paths one task takes, and the researcher client's own share (vfed only).

    python bench/server_paths.py [--json] [--tasks 200] [--nodes 3] [--database-url URL]
    (also: python bench/server.py --paths 200, which adds these keys to its own)

Each cycle is issue 5's trivial task on 3 organizations, on a kept-alive connection per caller, against a
real `vserver` process (SQLite by default):
- `create`: the researcher's multipart POST /tasks (task fields + a 1 KB envelope for 3 organizations);
- `claim`: each node's POST /runs/{id}/claim, asking for multipart/mixed (the task, run token and input);
- `patch_active`, `upload`, `patch_completed`: what a node sends while and after its container runs
  (a 1 KB sealed result, then PATCH completed with the result blob, exit code and log);
- `wake`: from the last PATCH completed leaving to the researcher's open `GET /tasks/{id}/wait` answering
  (`wake_after_patch_answer`: the same, counted from the PATCH's own answer);
- `runs`, `download`: the researcher's GET /runs?task_id= and each of the 3 result downloads.
Figures are client-side request latencies on loopback (the server's time plus aiohttp's client), p50/p99
in ms over all cycles; `cpu_ms_per_cycle` is the server process's CPU (user + sys) per cycle.

The client part runs the real `AsyncClient`: `client_create` is create_task from call to answer and
`client_create_before_post` the time until its POST /tasks goes out (key look-ups, encryption);
`client_results` is `results()` from call to the decrypted values, once `wait` has answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

INPUT_BYTES = 1024
RESULT_BYTES = 1024
ORGS = 3
WARMUP = 20
CLAIM_ACCEPT = "multipart/mixed, application/json"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class World:
    """Who takes part: the researcher, the 3 nodes (one per organization) and their keyrings."""

    http: Any
    user: dict[str, str]
    user_token: str
    collab: dict[str, Any]
    nodes: list[dict[str, str]]  # headers of n0, n1, n2 (organizations 0, 1, 2 of the collaboration)
    keyrings: list[Any]
    org_ids: list[int]
    sealed: list[bytes] = field(default_factory=list)  # each node's result, sealed for organization 0


async def _json(r: Any) -> Any:
    body = await r.read()
    assert r.status < 300, (r.status, body[:300])
    return json.loads(body)


async def setup(http: Any, keys: dict[str, str]) -> World:
    """Log everyone in, publish a public key per organization, seal each node's result once."""
    from vfed.common.crypto import Keyring, encrypt_bytes
    from vfed.common.payload import encode_result
    from vfed.common.trust import records_for_keys

    r = await http.post("/api/v1/token/user", json={"username": "res", "password": "bench password"})
    token = (await _json(r))["access_token"]
    user = {"Authorization": f"Bearer {token}"}
    collabs = (await _json(await http.get("/api/v1/collaborations", headers=user)))["data"]
    collab = next(c for c in collabs if c["name"] == "bench")
    nodes, keyrings, org_ids = [], [], []
    for i in range(ORGS):
        answer = await _json(await http.post("/api/v1/token/node", json={"api_key": keys[f"n{i}"]}))
        headers = {"Authorization": f"Bearer {answer['access_token']}"}
        ring = Keyring.generate()
        org_id = int(answer["organization_id"])
        path = f"/api/v1/organizations/{org_id}/key-records"  # what a node publishes at its first start
        body = {"records": [e.model_dump(mode="json") for e in records_for_keys(org_id, ring.keys)]}
        await _json(await http.post(path, json=body, headers=headers))
        org_ids.append(org_id)
        nodes.append(headers)
        keyrings.append(ring)
    world = World(http, user, token, collab, nodes, keyrings, org_ids)
    researcher = keyrings[0].current.public
    filler = os.urandom(RESULT_BYTES // 2).hex()
    for ring in keyrings:
        world.sealed.append(encrypt_bytes(encode_result({"x": filler}), ring.current, [researcher]))
    return world


async def _timed(times: dict[str, list[float]], name: str, call: Any) -> Any:
    t0 = time.perf_counter()
    r = await call
    body = await r.read()
    times[name].append((time.perf_counter() - t0) * 1000)
    assert r.status < 300, (name, r.status, body[:300])
    return r, body


async def _create(w: World, times: dict[str, list[float]]) -> dict[str, Any]:
    import aiohttp

    data = aiohttp.FormData()
    fields = {
        "collaboration_id": w.collab["id"],
        "image": "bench/algo:1",
        "organizations": [{"id": o} for o in w.collab["organization_ids"]],
    }
    data.add_field("task", json.dumps(fields), content_type="application/json")
    data.add_field("input", os.urandom(INPUT_BYTES), content_type="application/octet-stream", filename="in")
    _, body = await _timed(times, "create", w.http.post("/api/v1/tasks", data=data, headers=w.user))
    return dict(json.loads(body))


async def _node_runs(w: World, task_id: int) -> list[int]:
    """Run ids in node order (outside the clock: a node learns them from its doorbell)."""
    runs = (await _json(await w.http.get(f"/api/v1/runs?task_id={task_id}", headers=w.user)))["data"]
    by_org = {r["organization_id"]: r["id"] for r in runs}
    return [by_org[o] for o in sorted(by_org)]


async def _node_work(
    w: World, times: dict[str, list[float]], i: int, run_id: int, sealed: bytes | None = None
) -> float:
    """Claim, report active, upload the sealed result, report completed; returns when the last PATCH left."""
    h, run = w.nodes[i], f"/api/v1/runs/{run_id}"
    claim = w.http.post(f"{run}/claim", headers={**h, "Accept": CLAIM_ACCEPT})
    await _timed(times, "claim", claim)
    await _timed(times, "patch_active", w.http.patch(run, json={"status": "active"}, headers=h))
    result = w.sealed[i] if sealed is None else sealed
    _, body = await _timed(times, "upload", w.http.post("/api/v1/blobs", data=result, headers=h))
    blob_id = json.loads(body)["id"]
    done = {"status": "completed", "result_blob_id": blob_id, "exit_code": 0, "sealed_log": "b2sK"}
    sent = time.perf_counter()
    await _timed(times, "patch_completed", w.http.patch(run, json=done, headers=h))
    return sent


async def cycle(w: World, times: dict[str, list[float]]) -> None:
    """One task from creation to its 3 results downloaded."""
    task = await _create(w, times)
    run_ids = await _node_runs(w, task["id"])
    wait_url = f"/api/v1/tasks/{task['id']}/wait?timeout_s=30"
    waiting = asyncio.ensure_future(w.http.get(wait_url, headers=w.user))
    await asyncio.sleep(0)
    last_sent = 0.0
    for i, run_id in enumerate(run_ids):
        last_sent = await _node_work(w, times, i, run_id)
    patch_answered = time.perf_counter()
    r = await waiting
    state = json.loads(await r.read())
    answered = time.perf_counter()
    assert state["done"], state
    times["wake"].append((answered - last_sent) * 1000)
    times["wake_after_patch_answer"].append((answered - patch_answered) * 1000)
    _, body = await _timed(times, "runs", w.http.get(f"/api/v1/runs?task_id={task['id']}", headers=w.user))
    for run in json.loads(body)["data"]:
        await _timed(times, "download", w.http.get(f"/api/v1/blobs/{run['result_blob_id']}", headers=w.user))


async def _client_cycle(w: World, client: Any, times: dict[str, list[float]], starts: list[float]) -> None:
    """The real researcher client: create_task, the nodes' work, wait, results."""
    t0 = time.perf_counter()
    starts.clear()
    task = await client.create_task(w.collab["id"], "bench/algo:1", "m", args=[os.urandom(256).hex()])
    times["client_create"].append((time.perf_counter() - t0) * 1000)
    times["client_create_before_post"].append((starts[-1] - t0) * 1000)
    waiting = asyncio.ensure_future(client.wait(task, progress=False))
    run_ids = await _node_runs(w, task["id"])
    scratch: dict[str, list[float]] = defaultdict(list)
    for i, run_id in enumerate(run_ids):  # each result bound to its run, as a node seals it
        await _node_work(w, scratch, i, run_id, _bound_result(w, i, task["descriptor_digest"], run_id))
    await waiting
    t0 = time.perf_counter()
    values = await client.results(task)
    times["client_results"].append((time.perf_counter() - t0) * 1000)
    assert len(values) == ORGS, values


def _bound_result(w: World, i: int, digest: str, run_id: int) -> bytes:
    from vfed.common.crypto import encrypt_bytes
    from vfed.common.payload import encode_result
    from vfed.common.trust import result_context

    researcher = w.keyrings[0].current.public
    context = result_context(digest, w.org_ids[i], run_id)
    return encrypt_bytes(
        encode_result({"x": "r" * RESULT_BYTES}), w.keyrings[i].current, [researcher], context=context
    )


async def client_side(url: str, w: World, tasks: int) -> dict[str, list[float]]:
    """Time the researcher's AsyncClient; a trace notes when its POST /tasks leaves."""
    import aiohttp

    starts: list[float] = []

    async def on_start(_s: Any, _c: Any, params: Any) -> None:
        if params.method == "POST" and params.url.path.endswith("/tasks"):
            starts.append(time.perf_counter())

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    times: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="vfed-bench-trust-") as trust:
        await _client_cycles(url, w, trace, f"{trust}/trusted_orgs", tasks, times, starts)
    return times


async def _client_cycles(
    url: str,
    w: World,
    trace: Any,
    trust_file: str,
    tasks: int,
    times: dict[str, list[float]],
    starts: list[float],
) -> None:
    import aiohttp

    from vfed.client.client import AsyncClient

    async with AsyncClient(url, token=w.user_token, trust_file=trust_file, trust="tofu") as client:
        client.use_keyring(w.keyrings[0])
        client.api._session = aiohttp.ClientSession(trace_configs=[trace])
        for n in range(WARMUP + tasks):
            if n == WARMUP:
                times.clear()
            await _client_cycle(w, client, times, starts)


async def measure(url: str, keys: dict[str, str], args: Any, pid: int) -> dict[str, float]:
    """p50 and p99 per path over `args.paths` cycles (after a warm-up), and server CPU per cycle."""
    import aiohttp
    import psutil  # type: ignore[import-untyped]

    proc = psutil.Process(pid)
    async with aiohttp.ClientSession(url) as http:
        w = await setup(http, keys)
        for _ in range(WARMUP):
            await cycle(w, defaultdict(list))
        times: dict[str, list[float]] = defaultdict(list)
        cpu0 = proc.cpu_times()
        for _ in range(args.paths):
            await cycle(w, times)
        cpu1 = proc.cpu_times()
        times.update(await client_side(url, w, max(args.paths // 4, 10)))
    cpu_ms = (cpu1.user - cpu0.user + cpu1.system - cpu0.system) * 1000 / args.paths
    out: dict[str, float] = {"path_cpu_ms_per_cycle": cpu_ms}
    for name, values in times.items():
        out[f"path_{name}_p50_ms"] = statistics.median(values)
        out[f"path_{name}_p99_ms"] = pct(values, 0.99)
    return out


def main() -> None:
    import argparse

    import server

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--paths", "--tasks", dest="paths", type=int, default=200, help="cycles to time")
    parser.add_argument("--nodes", type=int, default=ORGS)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    results: dict[str, Any] = server.run_vfed(args, measure)
    results["loadavg_1min_start"], results["loadavg_1min_end"] = load_start, os.getloadavg()[0]
    if args.json:
        print(json.dumps(results))
        return
    for key, value in results.items():
        print(f"{key:40s} {value:10.2f}")


if __name__ == "__main__":
    main()
