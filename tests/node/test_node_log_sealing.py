"""Algorithm logs stay at home: what leaves a node about a failed run is a classified reason, and its log
tail leaves only sealed to the node's organization (and to the initiator by the node's opt-in).

A real server (SQLite), a real agent and real containers: organization beta's researcher runs an SDK
algorithm on organization alpha's data. The algorithm prints a cell of alpha's dataset (a secret) and raises
ValueError quoting it, the way a conversion error does. Neither beta's client nor the server's storage may
ever hold the secret; beta sees `algorithm-error: ValueError`; alpha reads the log with its key through
`vnode logs` and through the client; with `share_logs_with_initiator`, beta reads it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from tests import imagebuild
from tests.node.node_harness import (
    PASSWORD,
    PROBE_IMAGE,
    VNODE,
    Server,
    ensure_probe_image,
    running_agent,
    server_sql,
    wait_run_status,
    write_node_config,
)

from vfed.client.client import AsyncClient
from vfed.client.errors import RunFailed
from vfed.client.run_logs import LogUnreadable
from vfed.common.api import Reason, classified, code_of
from vfed.node.agent import Agent
from vfed.node.config import NodeSettings, load_settings
from vfed.node.operator import server
from vfed.node.operator.run_logs import quiet_keyring
from vfed.node.server_api import NodeClient

pytestmark = [pytest.mark.docker]

LEAKY_IMAGE = "vfed-test/leaky"
FINAL = {"completed", "failed", "start-failed", "not-allowed", "killed", "crashed"}


@pytest.fixture(scope="module", autouse=True)
def images() -> None:
    imagebuild.ensure("leaky", LEAKY_IMAGE)
    ensure_probe_image()


@dataclass
class Federation:
    server: Server
    alpha: NodeSettings
    alpha_config: Path
    beta: AsyncClient
    """The initiator: a researcher of beta, holding beta's keyring."""
    alpha_id: int
    collaboration: int
    secret: str
    beta_key: Path

    async def submit(self, method: str, image: str = LEAKY_IMAGE, *args: Any) -> dict[str, Any]:
        datasets = ["default"] if image == LEAKY_IMAGE else []
        return await self.beta.create_task(
            self.collaboration,
            image,
            method,
            args=list(args),
            organizations=[self.alpha_id],
            datasets=datasets,
        )

    async def final_run(self, task: dict[str, Any]) -> dict[str, Any]:
        (run,) = await wait_run_status(self.beta, task["id"], FINAL, timeout_s=120)
        return dict(run)


@contextlib.asynccontextmanager
async def federation(tmp_path: Path, serve: bool = True, **alpha_config: Any) -> AsyncIterator[Federation]:
    """alpha (a node with a dataset holding the secret, running unless `serve` is off) and beta (whose
    researcher starts tasks)."""
    secret = f"S3CR3T-{secrets.token_hex(8)}"
    dataset = tmp_path / "alpha.csv"
    dataset.write_text("value\n" + "".join(f"{i}.5\n" for i in range(11)) + f"{secret}\n")
    server = Server(tmp_path / "server", mqtt_url=None)
    keys = await server.seed(["alpha", "beta"])
    await server.start()
    try:
        configs = {
            org: write_node_config(
                tmp_path / f"{org}.yaml",
                name=f"ls{org[0]}{secrets.token_hex(3)}",
                api_key=keys[org],
                server_url=server.url,
                mqtt_url=None,
                poll_interval_s=0.5,
                trust="tofu",  # each node pins the other organization's first key at first sight
                **({"datasets": {"default": {"uri": str(dataset), "type": "csv"}}, **alpha_config})
                if org == "alpha"
                else {},
            )
            for org in ("alpha", "beta")
        }
        alpha, beta = load_settings(configs["alpha"]), load_settings(configs["beta"])
        async with Agent(beta) as agent:  # publishes beta's key chain; beta's node runs nothing here
            await agent.run(burst=True)
        if not serve:
            async with Agent(alpha) as agent:  # publishes alpha's key chain, then stops
                await agent.run(burst=True)
        async with (
            running_agent(alpha) if serve else contextlib.nullcontext(),
            AsyncClient(server.url, key_file=beta.key_path) as researcher,
        ):
            await researcher.login("res-beta", PASSWORD)
            orgs = {o["name"]: o["id"] for o in await researcher.organizations()}
            collab = (await researcher.collaborations())[0]["id"]
            yield Federation(
                server, alpha, configs["alpha"], researcher, orgs["alpha"], collab, secret, beta.key_path
            )
    finally:
        await server.stop()


async def server_answers(fed: Federation, task: dict[str, Any], run: dict[str, Any]) -> str:
    """Every answer the server gives the initiator about the task and its run, as one text."""
    api = fed.beta.api
    answers = [
        await api.request("GET", f"/tasks/{task['id']}"),
        await api.request("GET", f"/tasks/{task['id']}/wait", params={"timeout_s": 0}),
        await api.request("GET", "/runs", params={"task_id": task["id"]}),
        await api.request("GET", f"/runs/{run['id']}"),
        await api.request("GET", "/tasks"),
    ]
    return json.dumps(answers, default=str)


async def initiator_view(fed: Federation, task: dict[str, Any], run: dict[str, Any]) -> str:
    """What the initiator's client makes of it all: the server's answers and the results (or failures)."""
    failures = await fed.beta.results(task, raise_on_failure=False)
    return await server_answers(fed, task, run) + "".join(str(f) for f in failures)


def server_storage(server: Server) -> bytes:
    """Every byte the server keeps on disk: its SQLite database (with WAL) and its blob files."""
    return b"".join(p.read_bytes() for p in sorted(server.data_dir.rglob("*")) if p.is_file())


async def vnode_logs(fed: Federation, run_id: int, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`vnode logs RUN_ID NAME --system`, with alpha's config in a system scope of the test's own (in a
    thread: the server answering it runs on this loop)."""
    system = tmp_path / "etc-vfed"
    (system / "nodes").mkdir(parents=True, exist_ok=True)
    (system / "nodes" / f"{fed.alpha.name}.yaml").write_text(fed.alpha_config.read_text())
    env = {**os.environ, "VFED_SYSTEM_CONFIG_DIR": str(system)}
    args = [VNODE, "logs", str(run_id), fed.alpha.name, "--system"]
    return await asyncio.to_thread(
        subprocess.run, args, capture_output=True, text=True, timeout=60, env=env, check=False
    )


async def vfed(config_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The researcher's `vfed` CLI with its own config folder (in a thread, like vnode_logs)."""
    env = {**os.environ, "VFED_CONFIG_DIR": str(config_dir)}
    command = [sys.executable, "-m", "vfed.client.cli", *args]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60, env=env, check=False
    )


async def test_a_crash_quoting_data_reaches_the_initiator_classified_and_the_log_only_sealed(
    tmp_path: Path,
) -> None:
    async with federation(tmp_path) as fed:
        task = await fed.submit("convert")
        run = await fed.final_run(task)
        assert run["status"] == "failed" and run["exit_code"] == 1, run
        assert run["reason"] == "algorithm-error: ValueError"
        assert code_of(run["reason"]) == Reason.ALGORITHM_ERROR
        assert run["result_blob_id"] is None  # the SDK's error output (message, traceback) stays home
        assert run["sealed_log"]

        view = await initiator_view(fed, task, run)
        assert fed.secret not in view and "bad value" not in view
        assert "algorithm-error: ValueError" in view  # what the initiator does learn
        with pytest.raises(LogUnreadable) as unreadable:
            await fed.beta.run_log(run["id"])
        assert unreadable.value.kind == "not-a-recipient"

        (row,) = await server_sql(fed.server, "SELECT * FROM runs WHERE id = :id", id=run["id"])
        assert fed.secret not in repr(tuple(row)) and "converting" not in repr(tuple(row))
        assert fed.secret.encode() not in server_storage(fed.server)

        # alpha's operator reads the log with alpha's key: through vnode ...
        shown = await vnode_logs(fed, run["id"], tmp_path)
        assert shown.returncode == 0, shown.stderr
        assert f"converting {fed.secret}" in shown.stdout
        assert f"ValueError: bad value {fed.secret}" in shown.stdout  # the traceback, in full
        # ... and through the client, with the organization's keyring
        async with AsyncClient(fed.server.url, key_file=fed.alpha.key_path) as own:
            await own.login("res-alpha", PASSWORD)
            assert f"ValueError: bad value {fed.secret}" in await own.run_log(run["id"])
        (failure,) = await fed.beta.results(task, raise_on_failure=False)
        assert isinstance(failure, RunFailed) and failure.reason == "algorithm-error: ValueError"
        assert failure.log_tail == ""  # the initiator's client cannot open it

        # and the CLI: alpha's researcher holding alpha's keyring reads it, beta sees the reason only
        for org, key in (("alpha", fed.alpha.key_path), ("beta", fed.beta_key)):
            login = ["login", "--url", fed.server.url, "--username", f"res-{org}", "--password", PASSWORD]
            done = await vfed(tmp_path / f"{org}-cli", *login, "--key-file", str(key))
            assert done.returncode == 0, done.stderr
        read = await vfed(tmp_path / "alpha-cli", "run", "log", str(run["id"]))
        assert read.returncode == 0 and f"converting {fed.secret}" in read.stdout, read.stderr
        listed = await vfed(tmp_path / "beta-cli", "task", "runs", str(task["id"]))
        assert listed.returncode == 0 and "algorithm-error: ValueError" in listed.stdout, listed.stderr
        refused = await vfed(tmp_path / "beta-cli", "run", "log", str(run["id"]))
        assert refused.returncode == 1 and refused.stdout == "" and fed.secret not in refused.stderr
        assert refused.stderr.strip().splitlines() == [
            f"vfed: error: run {run['id']}: the log is sealed to organization {fed.alpha_id} only (its node "
            "did not share it with the initiator), and this key is not one of its recipients"
        ]

        # a run of another organization is refused by vnode in one line, exit 1
        other = await vnode_logs(fed, run["id"] + 1000, tmp_path)
        assert other.returncode == 1 and other.stdout == ""
        assert len(other.stderr.strip().splitlines()) == 1 and "404" in other.stderr


async def test_with_the_opt_in_the_initiator_reads_the_sealed_log(tmp_path: Path) -> None:
    async with federation(tmp_path, share_logs_with_initiator=True) as fed:
        task = await fed.submit("convert")
        run = await fed.final_run(task)
        assert run["reason"] == "algorithm-error: ValueError"
        assert fed.secret not in await server_answers(fed, task, run)  # still not in the clear
        assert fed.secret.encode() not in server_storage(fed.server)
        text = await fed.beta.run_log(run["id"])
        assert f"converting {fed.secret}" in text and f"ValueError: bad value {fed.secret}" in text
        with pytest.raises(RunFailed) as failed:
            await fed.beta.results(task)
        assert f"bad value {fed.secret}" in failed.value.log_tail
        shown = await vnode_logs(fed, run["id"], tmp_path)  # and alpha still reads it too
        assert shown.returncode == 0 and f"converting {fed.secret}" in shown.stdout, shown.stderr


@pytest.mark.slow
async def test_each_kind_of_failure_has_its_classified_reason(tmp_path: Path) -> None:
    """Out of memory, the wall-clock limit, a bad input and a refused disclosure: each reason is its code and
    nothing the algorithm printed or raised, while every log still reaches alpha sealed."""
    rules = [{"image": LEAKY_IMAGE}, {"image": PROBE_IMAGE, "max_run_time_s": 2}]
    async with federation(tmp_path, policies={"allowed_images": rules}) as fed:
        tasks = {
            "hog": await fed.submit("hog"),
            "sleep": await fed.submit("sleep", PROBE_IMAGE, 120),
            "unknown method": await fed.submit("no_such_method"),
            "small group": await fed.submit("small_group"),
            "total": await fed.submit("total"),
        }
        runs = {name: await fed.final_run(task) for name, task in tasks.items()}
        expected = {
            "hog": ("failed", "out-of-memory: limit 256 MiB"),
            "sleep": ("failed", "timeout: killed: ran past its wall-clock limit (max_run_time_s)"),
            "unknown method": ("failed", Reason.BAD_INPUT.value),
            "small group": ("failed", classified(Reason.DISCLOSURE_REFUSED, "min-rows")),
            "total": ("completed", None),
        }
        assert {n: (r["status"], r["reason"]) for n, r in runs.items()} == expected
        assert runs["small group"]["exit_code"] == 3 and runs["unknown method"]["exit_code"] == 2
        for name, run in runs.items():
            view = await initiator_view(fed, tasks[name], run)
            assert fed.secret not in view and "has 1 records" not in view, name  # nor the group size
            assert run["sealed_log"], name
        assert fed.secret.encode() not in server_storage(fed.server)
        async with AsyncClient(fed.server.url, key_file=fed.alpha.key_path) as own:
            await own.login("res-alpha", PASSWORD)
            logs = {name: await own.run_log(run["id"]) for name, run in runs.items()}
        assert f"first cell {fed.secret}" in logs["hog"]
        assert "probe: sleep" in logs["sleep"]
        assert "no_such_method" in logs["unknown method"]
        assert f"group of {fed.secret}" in logs["small group"] and "has 1 records" in logs["small group"]
        assert f"cell {fed.secret}" in logs["total"]
        with pytest.raises(LogUnreadable):  # a completed run's log is alpha's too
            await fed.beta.run_log(runs["total"]["id"])
        assert yaml.safe_load(fed.alpha_config.read_text()).get("share_logs_with_initiator") is None


async def test_vnode_stop_marks_killed_with_the_log_sealed(tmp_path: Path) -> None:
    """`vnode stop` marks the runs it stops killed (server.mark_killed, here without the Docker part): their
    log goes sealed to the organization, and not at all when the key file cannot be opened unasked."""
    async with federation(tmp_path, serve=False) as fed:
        tasks = [await fed.submit("convert"), await fed.submit("convert")]
        async with aiohttp.ClientSession() as http:
            node = NodeClient(http, fed.server.url, fed.alpha.api_key.get_secret_value())
            await node.login()
            ids = [(await node.list_runs(task_id=task["id"]))[0].id for task in tasks]
            for run_id in ids:
                await node.claim(run_id)
        words = {run_id: f"last words {fed.secret}\n" for run_id in ids}
        reason = classified(Reason.KILLED, "the node was stopped by its operator")
        sealed_one, bare_one = ids
        marked = [
            await asyncio.to_thread(server.mark_killed, fed.alpha, [run_id], reason, words, keyring)
            for run_id, keyring in ((sealed_one, quiet_keyring(fed.alpha)), (bare_one, None))
        ]
        assert marked == [[sealed_one], [bare_one]]
        runs = {run_id: await fed.beta.run(run_id) for run_id in ids}
        assert {r["status"] for r in runs.values()} == {"killed"}
        assert runs[sealed_one]["reason"] == "killed: the node was stopped by its operator"
        assert runs[sealed_one]["sealed_log"] and runs[bare_one]["sealed_log"] is None
        assert fed.secret.encode() not in server_storage(fed.server)
        shown = await vnode_logs(fed, sealed_one, tmp_path)
        assert shown.returncode == 0 and shown.stdout == words[sealed_one], shown.stderr
        with pytest.raises(LogUnreadable):
            await fed.beta.run_log(sealed_one)
