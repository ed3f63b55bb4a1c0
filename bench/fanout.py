"""Fan-out benchmark: one task to every node of a 1,000-organization collaboration.

A real `vserver start` on a private PostgreSQL and Mosquitto (tests/infra.py); 1,000 simulated nodes in this
process (tests/server/fanout_sim.py: log in, subscribe to their doorbell topic, claim on a ring, upload a tiny
result, set the run completed; no containers), each with an HTTP connection of its own unless `--http-limit`
says fewer (then they queue for connections in the simulator instead of at the server). The server manages
no broker accounts: the broker takes anonymous clients, so the figures are the doorbell path itself, not the
ACL check. Mosquitto runs with `set_tcp_nodelay true`, as `vserver broker config` writes it.

Measured, from the moment the task's request is sent (it commits the task, then queues the doorbells):
- `doorbell_p99_s`: until each node heard its run-created ring (p99 over nodes);
- `all_completed_s`: until the last run's `completed` was answered;
- `server_peak_rss_mib`: the server process tree's peak RSS over the whole run (sampled every 20 ms);
- `server_cpu_s_per_run`: the server's CPU seconds (user + system) from the request to the last completion,
  per run;
- `mosquitto_fanout_p99_s`: the limit beside it: one message published once to a topic the same 1,000
  subscribers hold, until each heard it (p99).
Targets (issue 19): doorbell p99 <= 2 s, all completed <= 30 s, server RSS <= 500 MiB.

    flock -x /tmp/vfed-cpu.lock .venv/bin/python bench/fanout.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # type: ignore[import-untyped]
from tests import infra
from tests.server.fanout_sim import Simulator, federation, metric, pct, server

TARGETS = {"doorbell_p99_s": 2.0, "all_completed_s": 30.0, "server_peak_rss_mib": 500.0}
MIB = 1024 * 1024


class PeakRss:
    """Samples the RSS of a process and its children in a thread (the event loop is busy being the nodes)."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak_bytes = max(self.peak_bytes, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass  # a child that just ended
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cpu_s(pid: int) -> float:
    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        t = p.cpu_times()
        total += t.user + t.system
    return total


def raise_open_files(needed: int) -> int:
    """Each simulated node holds a broker connection, and Mosquitto (a child) one per node: lift the soft
    limit of open files to what is needed (the hard limit is the ceiling)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def measure(
    args: argparse.Namespace, tmp: Path, pg: infra.Postgres, broker: infra.Broker
) -> dict[str, Any]:
    asked = {"spread_max_s": args.spread_max_s, "spread_per_node_s": args.spread_per_node_s}
    mqtt = {k: v for k, v in asked.items() if v is not None}
    broker_url = f"mqtt://{broker.host}:{broker.port}"
    fed = federation(tmp, args.nodes, pg.url(infra.create_database(pg)), broker_url, **mqtt)
    with server(fed, tmp / "vserver.log") as proc, PeakRss(proc.pid) as rss:
        async with Simulator(fed, broker, http_limit=args.http_limit) as sim:
            t0 = time.monotonic()
            await sim.start(timeout_s=300)
            ready_s = time.monotonic() - t0
            await sim.broker_fanout()  # warm-up
            broker_p99 = [pct(await sim.broker_fanout(), 0.99) for _ in range(args.repeat)]
            user = await sim.researcher()
            cpu0 = cpu_s(proc.pid)
            task, sent = await sim.create_task(user)
            created_s = time.monotonic() - sent
            runs = await sim.runs_of(user, task["id"])
            await sim.wait_completed({r["id"] for r in runs}, timeout_s=args.timeout_s)
            cpu1 = cpu_s(proc.pid)
            statuses = {r["status"] for r in await sim.runs_of(user, task["id"])}
            rung = [
                min(t for t, ring in sim.tally.rings[(n, "run-created")] if ring.task_id == task["id"]) - sent
                for n in sim.node_ids
                if any(ring.task_id == task["id"] for _, ring in sim.tally.rings[(n, "run-created")])
            ]
            doorbells = {
                o: await metric(
                    sim.http, fed.metrics_url, "vserver_doorbell_messages_total", f'outcome="{o}"'
                )
                for o in ("published", "degraded", "dropped")
            }
            spread = next(
                (r.spread_s for n in sim.node_ids for _, r in sim.tally.rings[(n, "run-created")]), 0.0
            )
    completed = [sim.tally.completed[r["id"]] - sent for r in runs]
    return {
        "nodes": args.nodes,
        "http_connections": args.http_limit,
        "doorbell_p99_s": pct(rung, 0.99) if len(rung) == len(runs) else None,
        "doorbell_p50_s": statistics.median(rung) if rung else None,
        "doorbell_first_s": min(rung) if rung else None,
        "nodes_rung": len(rung),
        "all_completed_s": max(completed),
        "completed_p50_s": statistics.median(completed),
        "task_create_s": created_s,
        "spread_s": spread,
        "server_peak_rss_mib": rss.peak_bytes / MIB,
        "server_cpu_s_per_run": (cpu1 - cpu0) / len(runs),
        "mosquitto_fanout_p99_s": statistics.median(broker_p99),
        "runs_completed": len(sim.tally.completed),
        "claim_conflicts": sim.tally.conflicts,
        "task_statuses": sorted(statuses),
        "doorbell_messages": doorbells,
        "errors": sim.tally.errors[:5],
        "simulator_ready_s": ready_s,
    }


def report(r: dict[str, Any]) -> None:
    print(f"fan-out of one task to {r['nodes']} nodes (PostgreSQL, Mosquitto, one vserver process)")
    print(f"  simulator HTTP connections              {r['http_connections']}")
    created, spread = r["task_create_s"], r["spread_s"]
    print(f"  task created (request sent -> 201)      {created:.3f} s   (spread asked: {spread} s)")
    for key, label in (
        ("doorbell_p99_s", "task request -> doorbell heard, p99"),
        ("all_completed_s", "task request -> every run completed"),
        ("server_peak_rss_mib", "server peak RSS, MiB"),
    ):
        value, target = r[key], TARGETS[key]
        shown = "missing" if value is None else f"{value:.3f}"
        verdict = "" if value is None else f"  target <= {target:g}: {'met' if value <= target else 'MISSED'}"
        print(f"  {label:<40} {shown}{verdict}")
    print(f"  server CPU per run                       {r['server_cpu_s_per_run'] * 1000:.2f} ms")
    print(f"  Mosquitto alone: one message to all, p99 {r['mosquitto_fanout_p99_s']:.3f} s")
    if r["doorbell_p99_s"]:
        ratio = r["doorbell_p99_s"] / max(r["mosquitto_fanout_p99_s"], 1e-6)
        print(f"  doorbell p99 / Mosquitto p99             {ratio:.1f}x")
    print(f"  runs completed {r['runs_completed']}, doorbells {r['doorbell_messages']}, errors {r['errors']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument(
        "--http-limit",
        type=int,
        help="the simulator's HTTP connections at most (default: one per node, as real nodes)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="broker-only fan-outs (median of their p99)")
    parser.add_argument("--timeout-s", type=float, default=180)
    parser.add_argument("--spread-max-s", type=float, help="the server's mqtt.spread_max_s (0: no spread)")
    parser.add_argument("--spread-per-node-s", type=float, help="the server's mqtt.spread_per_node_s")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.http_limit = args.http_limit or args.nodes
    raise_open_files(4 * args.nodes + 1024)
    with (
        tempfile.TemporaryDirectory(prefix="vfed-fanout-") as d,
        infra.postgres() as pg,
        infra.mosquitto() as mq,
    ):
        broker = infra.Broker("127.0.0.1", mq.port)
        result = asyncio.run(measure(args, Path(d), pg, broker))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)


if __name__ == "__main__":
    main()
