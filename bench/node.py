"""Node agent benchmark, all in one run on this machine (issue 5).

(a) a bare `docker run --rm` (the CLI) of the probe image with the agent's own hardened definition and limits,
    the figure the issue names; next to it the Docker SDK's create+start+wait+remove of the same definition
    (no CLI process, no attach), and the SDK's create+start alone: Docker's own start, the floor of (b);
(b) task POST -> container started (Docker's own `start` event), p50/p99 over N runs, doorbell on MQTT,
    counted from the researcher's create_task call and from its POST request leaving the client;
(c) submit -> decrypted result at the researcher, a trivial task on 3 nodes (3 agent processes).
The server runs as its own `vserver start` process, the agents as `vnode run` processes, as deployed.
Also the RSS of an idle agent process. Run: `.venv/bin/python bench/node.py [--json] [--runs 50]`.

`--leases` (issue 14): the three nodes run with `leases: required`; node a offers a small CSV dataset `d`,
registered on the collaboration's ledger and leased to organization a (the researcher's) by a certified org
admin, and every run of (b) reads it: each measured run does the full lease check, the reservation and the
receipt. (c)'s tasks read no dataset (the other nodes offer none); they are reserved and receipted too.
`--leases --ledger fabric` (issue 15): the same, with the collaboration's ledger on a real Fabric network
(three organizations, tests/fabric/network.py; each node, the org admin and the researcher use it there);
bench/node_ledger_compare.py sets the two side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import docker
import psutil  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.node harness

from tests import infra
from tests.node.node_harness import (
    PASSWORD,
    PROBE_IMAGE,
    AgentProcess,
    Server,
    ensure_probe_image,
    write_node_config,
)
from tests.server.vserver_proc import server_process

from node_bare import (
    MIB,
    bare_cli_runs,
    bare_docker_runs,
    bare_parallel_runs,
    c_floor,
    remove_bare_volume,
)
from vfed.client.client import AsyncClient
from vfed.node import timeline
from vfed.node.config import load_settings


class StartWatcher:
    """Docker `create` and `start` events of one node's run containers, by run id (Docker's own clock)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.starts: dict[str, float] = {}
        self.creates: dict[str, float] = {}
        self.destroys: dict[str, float] = {}
        self.jobs: dict[str, str] = {}
        self.volume_destroys: dict[str, float] = {}
        self._client = docker.from_env()
        self._events = self._client.events(
            decode=True,
            filters={
                "type": "container",
                "event": ["create", "start", "destroy"],
                "label": f"vfed.node={node}",
            },
        )
        self._volume_events = self._client.events(
            decode=True, filters={"type": "volume", "event": ["destroy"]}
        )
        self._threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_volumes, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read(self) -> None:
        tables = {"start": self.starts, "create": self.creates, "destroy": self.destroys}
        for event in self._events:
            attributes = event.get("Actor", {}).get("Attributes", {})
            run_id = attributes.get("vfed.run_id")
            table = tables.get(str(event.get("Action", event.get("status"))))
            if run_id and table is not None:
                table[run_id] = event["timeNano"] / 1e9
                self.jobs[run_id] = attributes.get("vfed.job_id", "")

    def _read_volumes(self) -> None:
        for event in self._volume_events:
            self.volume_destroys[str(event.get("Actor", {}).get("ID"))] = event["timeNano"] / 1e9

    async def cleaned_up(self, run_id: str) -> None:
        """The run's container and its job volume are gone (the agent removes both after the final report)."""
        await self.seen(self.destroys, run_id)
        await self.seen(self.volume_destroys, f"vfed-{self.node}-{self.jobs[run_id]}-tmp")

    def docker_own_start(self, run_id: str) -> float:
        """Seconds between Docker's `create` and `start` events of the run's container."""
        return self.starts[run_id] - self.creates[run_id]

    async def seen(self, table: dict[str, float], run_id: str, timeout_s: float = 10.0) -> None:
        for _ in range(int(timeout_s * 200)):
            if run_id in table:
                return
            await asyncio.sleep(0.005)

    async def next_start(self, known: set[str], timeout_s: float = 30.0) -> str:
        """The run id of the first container started that is not in `known` (runs go one at a time)."""
        for _ in range(int(timeout_s * 200)):
            new = set(self.starts) - known
            if new:
                return new.pop()
            await asyncio.sleep(0.005)
        raise TimeoutError(f"no new run container started in {timeout_s} s")

    def close(self) -> None:
        self._events.close()
        self._volume_events.close()
        self._client.close()


async def wait_done(researcher: AsyncClient, task_id: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = await researcher.runs(task_id)
        if runs and all(r["status"] not in ("pending", "initializing", "active") for r in runs):
            if any(r["status"] != "completed" for r in runs):
                raise RuntimeError(f"task {task_id} did not complete: {runs}")
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"task {task_id} not done after {timeout_s} s")


async def dispatch_latencies(
    researcher: AsyncClient, collab: int, org: int, runs: int, work: Path, datasets: list[str]
) -> dict[str, Any]:
    """Seconds from just before POST /tasks (the researcher's client: encrypt, upload, create) to Docker's
    start event of the run's container, and the part of that between Docker's create and start events. Like
    (a), each run starts once the previous container and its job volume are removed, so the clean-up does not
    compete. Between runs, one bare SDK create+start: Docker's own start while the federation's processes run.
    """
    watcher = StartWatcher("a")
    out: dict[str, Any] = {"dispatch": [], "docker_start": [], "post": [], "post_to_create": [], "runs": {}}
    out["bare_between"], out["dispatch_from_post_sent"] = [], []
    sent = await trace_post_sent(researcher)
    try:
        for number in range(runs):
            known = set(watcher.starts)
            posted = time.time()
            task = await researcher.create_task(
                collab, PROBE_IMAGE, "echo", args=[1], organizations=[org], datasets=datasets
            )
            returned = time.time()
            post_sent = sent.pop()
            # Docker's events say when the run started and ended (its container is removed after the final
            # report), so the researcher does not poll the server while the run it measures is dispatched.
            run_id = await watcher.next_start(known)
            await watcher.cleaned_up(run_id)
            await wait_done(researcher, int(task["id"]))
            (run,) = await researcher.runs(int(task["id"]))
            assert str(run["id"]) == run_id, (run, run_id)
            out["dispatch"].append(watcher.starts[run_id] - posted)
            out["dispatch_from_post_sent"].append(watcher.starts[run_id] - post_sent)
            out["docker_start"].append(watcher.docker_own_start(run_id))
            out["post"].append(returned - posted)
            out["post_to_create"].append(watcher.creates[run_id] - returned)
            events = {"docker_create": watcher.creates[run_id], "docker_start": watcher.starts[run_id]}
            marks = {"posted": posted, "post_sent": post_sent, "post_answered": returned}
            out["runs"][int(run_id)] = {**marks, **events}
            between = await asyncio.to_thread(bare_docker_runs, work, 1, f"between{number}-")
            out["bare_between"].append(between["create_start"][0])
    finally:
        watcher.close()
    return out


async def trace_post_sent(researcher: AsyncClient) -> list[float]:
    """When each POST /tasks request leaves the client (epoch s): the issue's "task POST", after the key
    look-up and the encryption that come before it in create_task."""
    sent: list[float] = []

    async def on_start(_s: Any, _c: Any, params: aiohttp.TraceRequestStartParams) -> None:
        if params.method == "POST" and params.url.path.endswith("/tasks"):
            sent.append(time.time())

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    if researcher.api._session is not None:  # the one login opened; the client makes one lazily
        await researcher.api._session.close()
    researcher.api._session = aiohttp.ClientSession(trace_configs=[trace])
    return sent


async def end_to_end(researcher: AsyncClient, collab: int, rounds: int) -> list[float]:
    """Seconds from submit to the decrypted results of a 3-organization task, the way a researcher gets
    them: the client's own `wait` (its polling schedule is part of the figure), then `results`."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        task = await researcher.create_task(collab, PROBE_IMAGE, "echo", args=[1])
        await researcher.wait(task, timeout_s=120, progress=False)
        results = await researcher.results(task)
        times.append(time.perf_counter() - started)
        assert len(results) == 3
    return times


def start_steps(agent_log: str, runs: dict[int, dict[str, float]]) -> dict[str, float]:
    """p50 ms of each start mark (vfed.node.timeline) and Docker event after the POST answer, in order."""
    after: dict[str, list[float]] = {}
    for line in agent_log.splitlines():
        parsed = timeline.parse(line)
        if parsed is None or parsed[0] not in runs:
            continue
        run = runs[parsed[0]]
        for step, at in {**parsed[1], **run}.items():
            after.setdefault(step, []).append(at - run["post_answered"])
    steps = {step: ms(percentile(values, 0.5)) for step, values in after.items()}
    return dict(sorted(steps.items(), key=lambda item: item[1]))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def federation_figures(
    work: Path, runs: int, rounds: int, leases: bool, fabric: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`fabric`: node name -> its `ledger.fabric` settings (the ledger on a Fabric channel: `--ledger
    fabric`)."""
    with infra.mosquitto() as broker:
        server = Server(work / "server", mqtt_url=f"mqtt://127.0.0.1:{broker.port}")
        keys = await server.seed(["a", "b", "c"])
        # The server as its own `vserver start` process, as deployed (in this process it would share the GIL
        # with the researcher's client and the Docker event watcher).
        settings = server.settings().model_dump(mode="json", include={"port", "data_dir", "jwt_secret"})
        with server_process(work, **settings, mqtt={"url": server.mqtt_url}):
            return await _federation_figures(work, server, keys, runs, rounds, leases, fabric)


def fabric_ledgers(net: Any) -> dict[str, Any]:
    """`--ledger fabric`: the ledger chaincode deployed for collaboration 1 with organizations a, b and c (the
    server's 1, 2 and 3) acting through org1..org3's MSPs; each node's `ledger.fabric` settings."""
    import json as json_

    from vfed.common.ledger.fabric import FabricSettings

    chaincode = Path(__file__).resolve().parents[1] / "chaincode"
    msp = json_.dumps({org.msp_id: org.index for org in net.orgs})
    net.deploy_chaincode(
        "bench-node", "1.0", 1, {o.name: chaincode for o in net.orgs}, init_args=["InitLedger", "1", msp]
    )
    out = {}
    for name, org in zip(("a", "b", "c"), net.orgs, strict=True):
        ident = org.identity("User1")
        out[name] = FabricSettings(
            connection_profile=net.profile_path(org.name),
            channel=net.channel,
            chaincode="bench-node",
            msp_id=ident.msp_id,
            certificate=ident.cert,
            private_key=ident.key,
        )
    return out


DATASET = "d"
"""The label of node a's dataset with `--leases`."""


def lease_config(work: Path, name: str, fabric: Any = None) -> dict[str, Any]:
    """The node config lines `--leases` adds: `leases: required`, and node a's small CSV dataset; with
    `fabric` (the node's FabricSettings), the ledger on that Fabric channel."""
    lines: dict[str, Any] = {"leases": "required"}
    if fabric is not None:
        lines["ledger"] = {"backend": "fabric", "fabric": fabric.model_dump(mode="json")}
    if name != "a":
        return lines
    data = work / "d.csv"
    data.write_text("age,weight\n30,70\n41,82\n")
    return {**lines, "datasets": {DATASET: {"uri": str(data), "type": "csv"}}}


async def grant_lease(config: Path, researcher: AsyncClient, collab: int) -> str:
    """Register node a's dataset on the ledger (signed by organization a's key) and lease it to organization a
    (the researcher's) for a day with runs enough, signed by an org admin's own key that the organization
    certified with the `org-admin` role, the way `vnode users certify`, `vnode datasets register` and
    `vnode leases grant` do it. The ledger view is the operator CLIs' (`NodeLedger.connect`). The lease id."""
    # Only with --leases: these modules are not in the code bench/node_compare.py measures as the baseline.
    from vfed.common.crypto import Keyring
    from vfed.common.ledger import dataset_entry, lease_entry
    from vfed.common.trust import certify
    from vfed.node.keys import passphrase
    from vfed.node.ledger import NodeLedger

    settings = load_settings(config)
    org, user = researcher.organization_id, researcher.user_id
    assert org is not None and user is not None
    async with aiohttp.ClientSession() as session:
        ledger = await NodeLedger.connect(settings, session)
        try:
            org_key = Keyring.load(settings.key_path, passphrase(settings)).current
            admin = Keyring.generate().current
            certificate = certify(org_key, org, user, "res-a", admin.public, roles=["org-admin"])
            body = {"certificate": certificate.model_dump(mode="json")}
            await ledger.client.request("POST", f"/organizations/{org}/certificates", json=body)
            if settings.ledger.backend == "fabric":  # the server carries it onto its own ledger only
                await ledger.append(certificate)
            await ledger.sync()
            dataset = dataset_entry(
                org_key, collaboration=collab, organization=org, label=DATASET, seen=ledger.head
            )
            await ledger.append(dataset)
            await ledger.sync()
            lease = lease_entry(
                admin,
                collaboration=collab,
                dataset=dataset.digest,
                owner=org,
                grantee=org,
                expires_at=int(time.time() + 86400),
                by_user=user,
                certificate=certificate.digest,
                seen=ledger.head,
                max_runs=1_000_000,
            )
            await ledger.append(lease)
        finally:
            await ledger.aclose()
    return lease.digest


async def receipts_on_ledger(researcher: AsyncClient, collab: int, lease: str, least: int) -> int:
    """How many run receipts on the researcher's verified ledger name the lease, once at least `least` do
    (receipts are appended through the node's queue, after the run)."""
    count = 0
    for _ in range(300):
        receipts = await researcher.receipts(collab)
        count = sum(1 for r in receipts if any(u.get("lease") == lease for u in r.datasets))
        if count >= least:
            break
        await asyncio.sleep(0.1)
    return count


async def _federation_figures(
    work: Path,
    server: Server,
    keys: dict[str, str],
    runs: int,
    rounds: int,
    leases: bool,
    fabric: dict[str, Any] | None = None,
) -> dict[str, Any]:
    agents = []
    try:
        for name, key in keys.items():
            config = write_node_config(
                work / f"{name}.yaml",
                name=name,
                api_key=key,
                server_url=server.url,
                mqtt_url=None,
                poll_interval_s=30.0,
                trust="tofu",  # the organizations pin each other at first sight (a deployment pins by hand)
                **(lease_config(work, name, (fabric or {}).get(name)) if leases else {}),
            )
            agent = AgentProcess(config, work / f"{name}.log")
            agent.start("--log-level", "INFO,vfed.node.timeline=DEBUG")  # marks of each run's start
            agents.append(agent)
        for agent in agents:
            await agent.wait_for_log("doorbell subscribed")
        await asyncio.sleep(3)
        assert agents[0].proc is not None
        idle_rss = psutil.Process(agents[0].proc.pid).memory_info().rss / MIB
        key_file = load_settings(agents[0].config).key_path
        trust = {"trust_file": work / "researcher-trusted_orgs", "trust": "tofu"}
        async with AsyncClient(server.url, key_file=key_file, **trust) as researcher:
            await researcher.login("res-a", PASSWORD)
            collab = (await researcher.collaborations())[0]["id"]
            org = researcher.organization_id
            assert org is not None
            if fabric is not None:  # the chaincode was initialized for collaboration 1, organization a = 1
                assert (collab, org) == (1, 1), (collab, org)
                researcher.fabric_ledgers[collab] = fabric["a"]
            datasets = []
            if leases:
                lease = await grant_lease(agents[0].config, researcher, collab)
                datasets = [DATASET]
            await end_to_end(researcher, collab, 1)  # warm-up: keys cached, images hot
            dispatch = await dispatch_latencies(researcher, collab, org, runs, work, datasets)
            dispatch["steps"] = start_steps(agents[0].log(), dispatch.pop("runs"))
            if leases:  # every measured run did the lease check and appended its receipt
                dispatch["receipts"] = await receipts_on_ledger(researcher, collab, lease, runs)
                if dispatch["receipts"] < runs:
                    raise RuntimeError(f"{dispatch['receipts']} receipts name the lease after {runs} runs")
            e2e = await end_to_end(researcher, collab, rounds)
    finally:
        for agent in agents:
            agent.stop()
    return {**dispatch, "e2e": e2e, "idle_rss": idle_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--runs", type=int, default=50, help="runs for (b)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds for (a) and (c)")
    parser.add_argument(
        "--leases",
        action="store_true",
        help="nodes with `leases: required`; (b)'s runs read a dataset of node a under a lease (issue 14)",
    )
    parser.add_argument(
        "--ledger",
        choices=["embedded", "fabric"],
        default="embedded",
        help="with --leases: the ledger on a real Fabric network (three orgs, tests/fabric/network.py) "
        "instead of the server's",
    )
    args = parser.parse_args()
    if args.ledger == "fabric" and not args.leases:
        parser.error("--ledger fabric needs --leases")
    ensure_probe_image()
    with tempfile.TemporaryDirectory(prefix="vfed-bench-node-") as tmp:
        work = Path(tmp)
        try:
            cli, cli_cpu = (values[1:] for values in bare_cli_runs(work, args.rounds + 1))
            sdk = bare_docker_runs(work, max(args.rounds, args.runs // 2) + 1)
            bare3 = bare_parallel_runs(work, args.rounds)
            if args.ledger == "fabric":
                from tests.fabric.network import FabricNetwork

                with FabricNetwork(orgs=3) as net:
                    ledgers = fabric_ledgers(net)
                    figures = asyncio.run(federation_figures(work, args.runs, args.rounds, True, ledgers))
            else:
                figures = asyncio.run(federation_figures(work, args.runs, args.rounds, args.leases))
        finally:
            remove_bare_volume()
    report: dict[str, Any] = build_report(cli, sdk, bare3, figures)
    report.update(c_floor(report["bare_docker_run_s"], statistics.median(cli_cpu)))
    if args.leases:
        report["leases"] = True
        report["ledger"] = args.ledger
        report["lease_receipts"] = figures["receipts"]
    if args.json:  # each run's figures, in order (bench/node_compare.py pools them over its blocks)
        report["per_run_ms"] = per_run_ms(figures)
    print_report(report, len(figures["dispatch"]), args.json)


def per_run_ms(figures: dict[str, Any]) -> dict[str, list[float]]:
    """ms per run of (b): dispatch, the bare start right after it, their difference (the paired figure)."""
    dispatch, between = figures["dispatch"], figures["bare_between"]
    return {
        "dispatch": [round(d * 1000, 3) for d in dispatch],
        "bare_between": [round(b * 1000, 3) for b in between],
        "dispatch_beyond_bare_between_paired": [
            round((d - b) * 1000, 3) for d, b in zip(dispatch, between, strict=True)
        ],
        "dispatch_from_post_sent": [round(d * 1000, 3) for d in figures["dispatch_from_post_sent"]],
        "task_post": [round(p * 1000, 3) for p in figures["post"]],
        "post_to_create": [round(p * 1000, 3) for p in figures["post_to_create"]],
    }


def paired_p50(values: list[float], baselines: list[float]) -> float:
    """p50 of each value minus its own baseline (measured right after it): the machine's drift cancels."""
    return percentile([v - b for v, b in zip(values, baselines, strict=True)], 0.5)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def build_report(
    cli: list[float], sdk: dict[str, list[float]], bare3: list[float], figures: dict[str, Any]
) -> dict[str, float]:
    bare_s, e2e_s, bare3_s = (
        statistics.median(cli),
        statistics.median(figures["e2e"]),
        statistics.median(bare3),
    )
    create_start = sdk["create_start"][1:]
    dispatch, events = figures["dispatch"], figures["docker_start"]
    return {
        "bare_docker_run_s": round(bare_s, 4),
        "bare_docker_run_sdk_s": round(statistics.median(sdk["run"][1:]), 4),
        "dispatch_p50_ms": ms(percentile(dispatch, 0.5)),
        "dispatch_p99_ms": ms(percentile(dispatch, 0.99)),
        "bare_create_start_p50_ms": ms(percentile(create_start, 0.5)),
        "bare_create_start_p99_ms": ms(percentile(create_start, 0.99)),
        "dispatch_beyond_bare_create_start_p50_ms": ms(
            percentile(dispatch, 0.5) - percentile(create_start, 0.5)
        ),
        "dispatch_beyond_bare_create_start_p99_ms": ms(
            percentile(dispatch, 0.99) - percentile(create_start, 0.99)
        ),
        "bare_create_start_between_p50_ms": ms(percentile(figures["bare_between"], 0.5)),
        "dispatch_beyond_bare_between_p50_ms": ms(
            percentile(dispatch, 0.5) - percentile(figures["bare_between"], 0.5)
        ),
        # Each run against the bare start measured right after it: the machine's drift over the runs cancels.
        "dispatch_beyond_bare_between_paired_p50_ms": ms(paired_p50(dispatch, figures["bare_between"])),
        "dispatch_from_post_sent_p50_ms": ms(percentile(figures["dispatch_from_post_sent"], 0.5)),
        "dispatch_from_post_sent_p99_ms": ms(percentile(figures["dispatch_from_post_sent"], 0.99)),
        "dispatch_from_post_sent_beyond_bare_between_paired_p50_ms": ms(
            paired_p50(figures["dispatch_from_post_sent"], figures["bare_between"])
        ),
        "docker_create_to_start_event_p50_ms": ms(percentile(events, 0.5)),
        "dispatch_beyond_docker_p50_ms": ms(
            percentile([d - o for d, o in zip(dispatch, events, strict=True)], 0.5)
        ),
        "task_post_p50_ms": ms(percentile(figures["post"], 0.5)),
        "post_returned_to_create_event_p50_ms": ms(percentile(figures["post_to_create"], 0.5)),
        "end_to_end_s": round(e2e_s, 4),
        "ratio_end_to_end_vs_bare": round(e2e_s / bare_s, 3),
        "bare_docker_run_x3_parallel_s": round(bare3_s, 4),
        "ratio_end_to_end_vs_bare_x3": round(e2e_s / bare3_s, 3),
        "idle_agent_rss_mib": round(figures["idle_rss"], 1),
        **{f"step_p50_ms.{step}": value for step, value in figures["steps"].items()},
    }


def print_report(r: dict[str, float], runs: int, as_json: bool) -> None:
    if as_json:
        print(json.dumps(r))
        return
    print(f"(a) bare `docker run --rm` (CLI), same definition and limits: {r['bare_docker_run_s']:.3f} s")
    print(f"    the same through the SDK (create+start+wait+remove): {r['bare_docker_run_sdk_s']:.3f} s")
    if r.get("leases"):
        print(
            f"--leases: (b)'s runs read node a's dataset under a lease; {r['lease_receipts']} receipts "
            "on the ledger name it"
        )
    print_dispatch(r, runs)
    print_end_to_end(r)


def print_dispatch(r: dict[str, float], runs: int) -> None:
    print(
        f"(b) task POST -> container started (Docker's start event), {runs} runs: "
        f"p50 {r['dispatch_p50_ms']} ms, p99 {r['dispatch_p99_ms']} ms"
    )
    print(
        f"    Docker's own start = bare SDK create+start of the same definition, this run: "
        f"p50 {r['bare_create_start_p50_ms']} ms, p99 {r['bare_create_start_p99_ms']} ms; "
        f"dispatch beyond it: p50 {r['dispatch_beyond_bare_create_start_p50_ms']} ms, "
        f"p99 {r['dispatch_beyond_bare_create_start_p99_ms']} ms"
    )
    print(
        f"    the same bare create+start between (b)'s runs (the federation's processes up): "
        f"p50 {r['bare_create_start_between_p50_ms']} ms; dispatch beyond it: "
        f"p50 {r['dispatch_beyond_bare_between_p50_ms']} ms; paired run by run: "
        f"p50 {r['dispatch_beyond_bare_between_paired_p50_ms']} ms"
    )
    print(
        f"    counted from the POST request leaving the client (after create_task's key look-up and "
        f"encryption): p50 {r['dispatch_from_post_sent_p50_ms']} ms, "
        f"p99 {r['dispatch_from_post_sent_p99_ms']} ms; beyond the bare start between, paired: p50 "
        f"{r['dispatch_from_post_sent_beyond_bare_between_paired_p50_ms']} ms"
    )
    print(
        f"    event split: Docker create->start events p50 {r['docker_create_to_start_event_p50_ms']} ms; "
        f"POST -> create event (server, doorbell, claim, input, checks, job folder, proxy) p50 "
        f"{r['dispatch_beyond_docker_p50_ms']} ms"
    )
    print(
        f"    of that: the researcher's create_task (encrypt, one POST) p50 {r['task_post_p50_ms']} ms; "
        f"from its answer to Docker's create event (doorbell, claim, checks, job folder, proxy, "
        f"Docker's create) p50 {r['post_returned_to_create_event_p50_ms']} ms"
    )
    steps = [(k.removeprefix("step_p50_ms."), v) for k, v in r.items() if k.startswith("step_p50_ms.")]
    print("    p50 ms after the POST's answer, agent marks and Docker events:")
    print("      " + ", ".join(f"{step} {value}" for step, value in steps))


def print_end_to_end(r: dict[str, float]) -> None:
    print(f"(c) submit -> decrypted results, 3 nodes, median: {r['end_to_end_s']:.3f} s")
    print(f"(c)/(a) = {r['ratio_end_to_end_vs_bare']}")
    print(
        f"(a3) three bare SDK runs at once on this machine (the 3 nodes of (c) share its 2 cores), median: "
        f"{r['bare_docker_run_x3_parallel_s']:.3f} s; (c)/(a3) = {r['ratio_end_to_end_vs_bare_x3']}"
    )
    print(
        f"    one bare CLI run keeps this machine's cores busy for {r['bare_docker_run_cpu_s']:.3f} CPU s; "
        f"three need at least {r['end_to_end_floor_s']:.3f} s on {r['cores']} cores, i.e. (c)/(a) >= "
        f"{r['ratio_floor_vs_bare']} before any vfed work"
    )
    print(f"idle agent RSS: {r['idle_agent_rss_mib']} MiB")


if __name__ == "__main__":
    main()
