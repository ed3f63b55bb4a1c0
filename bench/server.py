"""Server benchmark: vfed `vserver` side by side with vantage6-server 4.15.2.

    python bench/server.py [--json] [--tasks 300] [--nodes 1000] [--cpu-tasks 1000] [--v6-python PATH]

What is measured (each server in its own process, SQLite, on this machine):
- task creation for 3 organizations with 1 KB encrypted inputs: tasks/s, p50, p99 (one client, sequential).
  vfed: what the researcher client sends, one multipart POST /tasks with the task fields and the 1 KB envelope
  (sealed for all three), on a kept-alive connection; `tasks_per_s_two_step` is the older blob + task form.
  `--cpu-tasks N` adds the server's CPU per task (psutil, user + sys; the embedded broker apart), per form.
  vantage6: one POST /api/task with three pre-encrypted base64 inputs, a new connection per request (its own
  clients do that; on a kept-alive connection its dev server adds ~40 ms delayed-ACK stalls).
- node authentication with 1,000 nodes registered: p99 of POST /token/node for random nodes (vfed only:
  vantage6 checks bcrypt against every node in turn, ~0.2 s per node ahead; it is measured with a few
  nodes and reported per position).
- a 50 MiB result uploaded by a node and downloaded by the researcher, wall time.
- `--paths N`: per-request latency of every step of N task cycles, and the researcher client's own share
  (bench/server_paths.py says what each `path_*` key is).
- `--database postgresql`: vfed on a PostgreSQL of its own (started like the tests' one, unless
  `--database-url` names one), and beside the other figures `tasks_per_s_workers_1` and
  `tasks_per_s_workers_2`: task creation by WORKER_CLIENTS concurrent clients against `vserver start
  --workers 1` and `--workers 2`, each on a fresh database (the clients, PostgreSQL and the workers share
  this machine's cores: the ratio says what a second process buys here, not on a bigger machine).

vantage6 is measured by bench/server_v6.py under its own Python 3.10, which imports this file's helpers: so
this file imports aiohttp and vfed only inside the vfed functions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report import emit

MIB = 1024 * 1024
INPUT_BYTES = 1024
RESULT_BYTES = 50 * MIB
ORGS = 3
CLIENTS = 4
WORKER_CLIENTS = 8  # concurrent clients for the --workers figures, each on connections of its own
FORM = "one-request"  # how the researcher client creates a task (multipart: task fields + input)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- vfed ------------------------------------------------------------------------------------------------
def vfed_setup(tmp: Path, nodes: int, database_url: str | None) -> tuple[Path, dict[str, str]]:
    """Config + import file with 3 orgs, one collaboration, a researcher and `nodes` nodes."""
    import yaml

    port = free_port()
    cfg = tmp / "vserver.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "port": port,
                "data_dir": str(tmp / "data"),
                "jwt_secret": "bench-secret-long-enough-for-hs256-signing",
                "mqtt": {"embedded_port": free_port()},
                **({"database_url": database_url} if database_url else {}),
            }
        )
    )
    orgs = [f"org{i}" for i in range(ORGS)]
    spec = {
        "organizations": [{"name": o} for o in orgs],
        # the task collaboration has one node per organization; the other nodes sit in another collaboration
        # (1,000 nodes in one collaboration would make every task ring 1,000 doorbells)
        "collaborations": [
            {"name": "bench", "organizations": orgs},
            {"name": "filler", "organizations": orgs},
        ],
        "users": [
            {"username": "res", "password": "bench password", "organization": "org0", "roles": ["researcher"]}
        ],
        "nodes": [
            {
                "name": f"n{i}",
                "organization": orgs[i % ORGS],
                "collaboration": "bench" if i < ORGS else "filler",
            }
            for i in range(nodes)
        ],
    }
    imp = tmp / "import.yaml"
    imp.write_text(yaml.safe_dump(spec))
    cli = [sys.executable, "-m", "vfed.server.cli", "--log-level", "WARNING"]
    out = subprocess.run(
        [*cli, "import", str(imp), "--config", str(cfg)], capture_output=True, text=True, check=True
    )
    keys = {}
    for line in out.stdout.splitlines():
        if "API key" in line:
            keys[line.split()[1].rstrip(":")] = line.rsplit(" ", 1)[1]
    return cfg, keys


async def vfed_measure(
    url: str, keys: dict[str, str], args: argparse.Namespace, pid: int
) -> dict[str, float]:
    import aiohttp

    async with aiohttp.ClientSession(url) as http:
        r = await http.post("/api/v1/token/user", json={"username": "res", "password": "bench password"})
        user = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
        collabs = (await (await http.get("/api/v1/collaborations", headers=user)).json())["data"]
        collab = next(c for c in collabs if c["name"] == "bench")
        results: dict[str, float] = {}
        if args.cpu_tasks:
            for form in args.forms:
                results.update(await vfed_cpu_per_task(http, user, collab, pid, args.cpu_tasks, form))
        form = args.forms[0]
        await vfed_tasks(http, user, collab, 20, 1, form)  # warm-up
        latencies, elapsed, task = await vfed_tasks(http, user, collab, args.tasks, 1, form)
        _, elapsed4, _ = await vfed_tasks(http, user, collab, args.tasks, CLIENTS, form)
        if "two-step" in args.forms[1:]:
            _, elapsed2, _ = await vfed_tasks(http, user, collab, args.tasks, 1, "two-step")
            results["tasks_per_s_two_step"] = args.tasks / elapsed2

        names = sorted(keys)
        auth_ms = []
        for name in random.sample(names, min(args.auth_samples, len(names))):
            t0 = time.perf_counter()
            r = await http.post("/api/v1/token/node", json={"api_key": keys[name]})
            await r.read()
            auth_ms.append((time.perf_counter() - t0) * 1000)
            assert r.status == 200

        roundtrip_s = await vfed_result_roundtrip(http, keys["n0"], task["id"], user)
    return {
        "tasks_per_s": args.tasks / elapsed,
        f"tasks_per_s_{CLIENTS}_clients": args.tasks / elapsed4,
        "task_create_p50_ms": statistics.median(latencies) * 1000,
        "task_create_p99_ms": pct(latencies, 0.99) * 1000,
        "node_auth_p50_ms_1000": statistics.median(auth_ms),
        "node_auth_p99_ms_1000": pct(auth_ms, 0.99),
        "result_50mib_roundtrip_s": roundtrip_s,
        **results,
    }


def task_body(collab: dict[str, Any], blob: str | None) -> dict[str, Any]:
    """The task fields; `blob` names an uploaded input (two-step form), None: the input comes along."""
    orgs = collab["organization_ids"]
    return {
        "collaboration_id": collab["id"],
        "image": "bench/algo:1",
        "organizations": [{"id": o, **({"input_blob_id": blob} if blob else {})} for o in orgs],
    }


async def create_one(http: Any, user: dict[str, str], collab: dict[str, Any], form: str) -> dict[str, Any]:
    """One task as a researcher's client creates it: `one-request` (multipart) or `two-step` (blob, task)."""
    import aiohttp

    envelope = os.urandom(INPUT_BYTES)
    if form == "one-request":
        data = aiohttp.FormData()
        data.add_field("task", json.dumps(task_body(collab, None)), content_type="application/json")
        data.add_field("input", envelope, content_type="application/octet-stream", filename="input")
        r = await http.post("/api/v1/tasks", data=data, headers=user)
    else:
        r = await http.post("/api/v1/blobs", data=envelope, headers=user)
        blob = (await r.json())["id"]
        r = await http.post("/api/v1/tasks", json=task_body(collab, blob), headers=user)
    assert r.status == 201, await r.text()
    return dict(await r.json())


async def vfed_tasks(
    http: Any, user: dict[str, str], collab: dict[str, Any], tasks: int, clients: int, form: str = FORM
) -> tuple[list[float], float, dict[str, Any]]:
    """Create `tasks` tasks from `clients` concurrent clients, each the way `form` says."""
    latencies: list[float] = []
    last: dict[str, Any] = {}

    async def client(n: int) -> None:
        nonlocal last
        for _ in range(n):
            t0 = time.perf_counter()
            last = await create_one(http, user, collab, form)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(client(tasks // clients) for _ in range(clients)))
    return latencies, time.perf_counter() - started, last


async def vfed_cpu_per_task(
    http: Any, user: dict[str, str], collab: dict[str, Any], pid: int, tasks: int, form: str
) -> dict[str, float]:
    """Server CPU (user, sys) per task over `tasks` tasks, in ms; the embedded broker child on its own."""
    import psutil  # type: ignore[import-untyped]

    proc = psutil.Process(pid)

    def cpu() -> tuple[float, float, float]:
        own = proc.cpu_times()
        broker = sum(sum(c.cpu_times()[:2]) for c in proc.children(recursive=True))
        return own.user, own.system, broker

    await vfed_tasks(http, user, collab, 50, 1, form)  # warm caches and pools
    u0, s0, b0 = cpu()
    await vfed_tasks(http, user, collab, tasks, 1, form)
    u1, s1, b1 = cpu()
    key = form.replace("-", "_")
    return {
        f"cpu_ms_per_task_{key}": (u1 - u0 + s1 - s0) * 1000 / tasks,
        f"cpu_user_ms_per_task_{key}": (u1 - u0) * 1000 / tasks,
        f"cpu_sys_ms_per_task_{key}": (s1 - s0) * 1000 / tasks,
        f"cpu_broker_ms_per_task_{key}": (b1 - b0) * 1000 / tasks,
    }


async def vfed_result_roundtrip(http: Any, api_key: str, task_id: int, user: dict[str, str]) -> float:
    """Node: claim, upload 50 MiB, attach; researcher: download. Timed from upload start to last byte."""
    from vfed.common.chunks import byte_chunks

    r = await http.post("/api/v1/token/node", json={"api_key": api_key})
    node = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
    runs = (await (await http.get(f"/api/v1/runs?task_id={task_id}", headers=node)).json())["data"]
    run_id = runs[0]["id"]
    await http.post(f"/api/v1/runs/{run_id}/claim", headers=node)
    payload = os.urandom(RESULT_BYTES)
    t0 = time.perf_counter()
    # as the node uploads (a sealed file in 1 MiB chunks), with the length said up front
    sized = {**node, "Content-Length": str(len(payload))}
    r = await http.post("/api/v1/blobs", data=byte_chunks(payload), headers=sized)
    blob = (await r.json())["id"]
    r = await http.patch(
        f"/api/v1/runs/{run_id}", json={"status": "completed", "result_blob_id": blob}, headers=node
    )
    assert r.status == 200, await r.text()
    r = await http.get(f"/api/v1/blobs/{blob}", headers=user)
    got = await r.read()
    elapsed = time.perf_counter() - t0
    assert got == payload
    return elapsed


def run_vfed(
    args: argparse.Namespace, measure: Any = None, *, workers: int = 1, nodes: int | None = None
) -> dict[str, float]:
    """Start a vserver on a fresh data folder (and a fresh database) and run `measure` (default:
    vfed_measure) against it."""
    with tempfile.TemporaryDirectory(prefix="vfed-bench-") as d:
        tmp = Path(d)
        cfg, keys = vfed_setup(tmp, args.nodes if nodes is None else nodes, fresh_database(args))
        import yaml

        port = yaml.safe_load(cfg.read_text())["port"]
        log_path = tmp / "server.log"
        log = log_path.open("wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vfed.server.cli",
                "--log-level",
                "INFO" if workers > 1 else "WARNING",
                "start",
                "--config",
                str(cfg),
                "--workers",
                str(workers),
            ],
            stdout=log,
            stderr=log,
        )
        try:
            wait_port(port, proc)
            deadline = time.monotonic() + 120
            while workers > 1 and f"with {workers} workers" not in log_path.read_text():  # all listen
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"vserver --workers {workers} did not start:\n{log_path.read_text()}")
                time.sleep(0.05)
            measure = measure or vfed_measure
            return dict(asyncio.run(measure(f"http://127.0.0.1:{port}", keys, args, proc.pid)))
        finally:
            stop(proc)


def fresh_database(args: argparse.Namespace) -> str | None:
    """The database URL of the next run: None (SQLite in the data folder), the given one, or a new database
    on the benchmark's own PostgreSQL."""
    postgres = getattr(args, "postgres", None)  # tests.infra.Postgres: --database postgresql of our own
    if args.database_url or postgres is None:
        return args.database_url  # type: ignore[no-any-return]
    from tests import infra

    return str(postgres.url(infra.create_database(postgres)))


async def workers_measure(url: str, _keys: dict[str, str], args: argparse.Namespace, _pid: int) -> float:
    """Tasks/s of WORKER_CLIENTS concurrent clients, each with a connection pool of its own (so the kernel
    hands their connections to different workers)."""
    import aiohttp

    async def session() -> tuple[Any, dict[str, str], dict[str, Any]]:
        http = aiohttp.ClientSession(url)
        r = await http.post("/api/v1/token/user", json={"username": "res", "password": "bench password"})
        user = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
        collabs = (await (await http.get("/api/v1/collaborations", headers=user)).json())["data"]
        return http, user, next(c for c in collabs if c["name"] == "bench")

    clients = [await session() for _ in range(WORKER_CLIENTS)]
    try:
        per_client = max(1, args.tasks // WORKER_CLIENTS)

        async def client(http: Any, user: dict[str, str], collab: dict[str, Any], n: int) -> None:
            for _ in range(n):
                await create_one(http, user, collab, args.forms[0])

        await asyncio.gather(*(client(*c, 5) for c in clients))  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client(*c, per_client) for c in clients))
        return per_client * WORKER_CLIENTS / (time.perf_counter() - started)
    finally:
        for http, _, _ in clients:
            await http.close()


def run_workers_scaling(args: argparse.Namespace) -> dict[str, float]:
    """tasks_per_s_workers_1 and _2, each on a fresh server and database."""
    out: dict[str, float] = {}
    for workers in (1, 2):
        measured = run_vfed(args, _as_dict(workers_measure), workers=workers, nodes=ORGS)
        out[f"tasks_per_s_workers_{workers}"] = measured["tasks_per_s"]
    out["ratio_workers_2_vs_1"] = out["tasks_per_s_workers_2"] / out["tasks_per_s_workers_1"]
    return out


def _as_dict(measure: Any) -> Any:
    async def wrapped(*a: Any) -> dict[str, float]:
        return {"tasks_per_s": await measure(*a)}

    return wrapped


def run_v6(python: str, tasks: int) -> dict[str, float] | None:
    if not Path(python).exists():
        print(f"vantage6: {python} not found; skipped", file=sys.stderr)
        return None
    out = subprocess.run(
        [python, str(Path(__file__).with_name("server_v6.py")), "--tasks", str(tasks)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        print(f"vantage6 run failed:\n{out.stderr[-3000:]}", file=sys.stderr)
        return None
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# --- main ---------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--v6-tasks", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--auth-samples", type=int, default=1000)
    parser.add_argument("--v6-python", default=os.environ.get("V6_PYTHON", "/tmp/v6srv/bin/python"))
    parser.add_argument("--database-url", help="vfed on this database (an empty one) instead of SQLite")
    parser.add_argument(
        "--database",
        choices=["sqlite", "postgresql"],
        default="sqlite",
        help="postgresql: a PostgreSQL of the benchmark's own (unless --database-url), and the --workers "
        "1 and 2 figures",
    )
    parser.add_argument("--skip-v6", action="store_true")
    parser.add_argument(
        "--cpu-tasks", type=int, default=0, help="also measure server CPU per task over N tasks"
    )
    parser.add_argument(
        "--forms",
        nargs="+",
        choices=["one-request", "two-step"],
        default=["one-request", "two-step"],
        help="task-creation forms: the first gives the headline figures; CPU is measured for each",
    )
    parser.add_argument(
        "--paths", type=int, default=0, help="also time each request of N task cycles (bench/server_paths.py)"
    )
    return parser.parse_args()


def add_v6(results: dict[str, Any], v6: dict[str, Any] | None) -> None:
    """vantage6's figures (None when skipped or failed) and vfed's ratios to them, into `results`."""
    skipped: dict[str, Any] = {"v6_tasks_per_s": None, "v6_result_50mib_roundtrip_s": None}
    results.update(v6 or skipped)
    if not v6:
        results["ratio_task_create_vs_v6"] = None
        return
    results["ratio_task_create_vs_v6"] = results["tasks_per_s"] / v6["v6_tasks_per_s"]
    key = f"tasks_per_s_{CLIENTS}_clients"
    results[f"ratio_task_create_{CLIENTS}_clients_vs_v6"] = results[key] / v6["v6_" + key]
    results["ratio_result_roundtrip_vs_v6"] = (
        v6["v6_result_50mib_roundtrip_s"] / results["result_50mib_roundtrip_s"]
    )


def main() -> None:
    args = parse_args()
    with contextlib.ExitStack() as stack:
        if args.database == "postgresql" and not args.database_url:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.infra
            from tests import infra

            args.postgres = stack.enter_context(infra.postgres())
        measure(args)


def measure(args: argparse.Namespace) -> None:
    load_start = os.getloadavg()[0]
    results: dict[str, Any] = run_vfed(args)
    if args.paths:
        import server_paths

        # a fresh server, so these figures do not depend on the tasks created above
        results.update(run_vfed(args, server_paths.measure))
    if args.database == "postgresql":
        results.update(run_workers_scaling(args))
    add_v6(results, None if args.skip_v6 else run_v6(args.v6_python, args.v6_tasks))
    # other work on this machine moves these figures; the load average says how busy it was
    results["loadavg_1min_start"], results["loadavg_1min_end"] = load_start, os.getloadavg()[0]
    emit(results, args.json)


if __name__ == "__main__":
    main()
