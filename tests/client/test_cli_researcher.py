"""The researcher's way around the `vfed` CLI: whoami, logout, collaborations, nodes, task show/logs/results
--output, `--format table|json` on the listings, `--version` and the exit codes (0 ok, 1 failure, 2 usage) of
vfed, vnode and vserver; and `from vfed.client import Client, AsyncClient`.

Against the real server app (SQLite) and, for the task views, two real node agents running real containers
(the node-probe image): nothing is faked."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import importlib.metadata
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from tests.node.node_harness import (
    PASSWORD,
    PROBE_IMAGE,
    VNODE,
    Server,
    ensure_probe_image,
    running_pair,
)

from vfed.node.config import NodeSettings

BIN = Path(sys.executable).parent
FINAL = {"completed", "failed", "start-failed", "not-allowed", "killed", "crashed"}


def vfed(*args: str) -> subprocess.CompletedProcess[str]:
    """`vfed` in a child process, with this test's config folder (conftest: VFED_CONFIG_DIR)."""
    return subprocess.run(
        [sys.executable, "-m", "vfed.client.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
        timeout=120,
        check=False,
    )


async def avfed(*args: str) -> subprocess.CompletedProcess[str]:
    """`vfed` in a thread: the server it talks to runs on this test's loop."""
    return await asyncio.to_thread(vfed, *args)


def one_error_line(res: subprocess.CompletedProcess[str], needle: str) -> str:
    """A runtime failure: exit 1, one line on stderr naming the problem, no traceback."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("vfed: error:") and needle in lines[0], lines[0]
    return lines[0]


def credentials_file() -> Path:
    return Path(os.environ["VFED_CONFIG_DIR"]) / "credentials.json"


def test_client_and_async_client_import_from_the_package() -> None:
    import vfed.client
    from vfed.client import AsyncClient, Client
    from vfed.client.client import AsyncClient as Impl

    assert AsyncClient is Impl and {"Client", "AsyncClient"} <= set(vfed.client.__all__)
    assert callable(Client.create_task) and callable(Client.nodes)


@pytest.mark.parametrize("program", ["vfed", "vnode", "vserver"])
def test_version_comes_from_the_installed_package(program: str) -> None:
    res = subprocess.run([str(BIN / program), "--version"], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{program}, version {importlib.metadata.version('vfed')}"


@pytest.mark.parametrize(
    "args",
    [
        ("vfed", "task", "show", "not-a-number"),
        ("vfed", "nodes", "list", "--format", "xml"),
        ("vfed", "collaborations", "frobnicate"),
        ("vnode", "no-such-command"),
        ("vserver", "no-such-command"),
        ("vserver", "start", "--port", "many"),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    res = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, check=False)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Usage:" in res.stderr


def test_vserver_and_vnode_runtime_failures_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: [")
    res = subprocess.run(
        [str(BIN / "vserver"), "start", "--config", str(bad)], capture_output=True, text=True, check=False
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    res = subprocess.run(
        [VNODE, "run", "--config", str(tmp_path / "absent.yaml")], capture_output=True, text=True, check=False
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_not_logged_in_is_one_line_exit_1() -> None:
    for command in (("whoami",), ("nodes", "list"), ("collaborations", "list"), ("task", "show", "1")):
        res = vfed(*command)
        assert res.returncode == 1 and "not logged in" in res.stderr, (command, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    res = vfed("logout")  # nothing to forget is not a failure
    assert res.returncode == 0 and "not logged in" in res.stdout


async def test_whoami_collaborations_nodes_and_logout(tmp_path: Path) -> None:
    """No node ever connected: both nodes are listed offline, never seen."""
    server = Server(tmp_path / "server", mqtt_url=None)
    await server.seed(["north", "south"], collaboration="study")
    await server.start()
    try:
        res = await avfed("login", "--url", server.url, "--username", "res-north", "--password", PASSWORD)
        assert res.returncode == 0, res.stderr

        res = await avfed("whoami", "--format", "json")
        assert res.returncode == 0, res.stderr
        me = json.loads(res.stdout)
        assert me["user"] == "res-north" and me["organization"] == "north" and me["server"] == server.url
        assert "researcher" in me["roles"] and isinstance(me["user_id"], int)
        now = datetime.now(UTC)
        access = datetime.fromisoformat(me["access_token_expires_at"])
        refresh = datetime.fromisoformat(me["refresh_token_expires_at"])
        assert now < access <= refresh
        saved = json.loads(credentials_file().read_text())
        assert saved["access_token"] not in res.stdout and saved["refresh_token"] not in res.stdout
        res = await avfed("whoami")
        assert res.returncode == 0 and "res-north" in res.stdout and "researcher" in res.stdout
        assert saved["access_token"] not in res.stdout

        res = await avfed("collaborations", "list", "--format", "json")
        assert res.returncode == 0, res.stderr
        [collab] = json.loads(res.stdout)
        assert collab["name"] == "study" and len(collab["organization_ids"]) == 2
        assert sorted(o["name"] for o in collab["organizations"]) == ["north", "south"]
        res = await avfed("collaborations", "list")
        assert res.returncode == 0 and res.stdout.splitlines()[0].split()[:2] == ["ID", "NAME"]
        assert "study" in res.stdout and "north" in res.stdout and "\x1b[" not in res.stdout

        res = await avfed("nodes", "list", "--format", "json")
        assert res.returncode == 0, res.stderr
        nodes = {n["name"]: n for n in json.loads(res.stdout)}
        assert set(nodes) == {"node-north", "node-south"}
        assert all(n["status"] == "offline" and n["last_seen_at"] is None for n in nodes.values())
        assert nodes["node-south"]["organization"] == "south"
        assert nodes["node-north"]["collaboration_id"] == collab["id"]
        res = await avfed("nodes", "list", "--organization", str(nodes["node-south"]["organization_id"]))
        assert res.returncode == 0 and "node-south" in res.stdout and "node-north" not in res.stdout
        assert "offline" in res.stdout and "never" in res.stdout
        res = await avfed("nodes", "list", "--collaboration", "999", "--format", "json")
        assert res.returncode == 0 and json.loads(res.stdout) == []

        res = await avfed("task", "list", "--format", "json")
        assert res.returncode == 0 and json.loads(res.stdout) == []
        one_error_line(await avfed("task", "show", "4242"), "404")
        one_error_line(await avfed("task", "logs", "4242"), "404")

        before_logout = json.loads(credentials_file().read_text())["refresh_token"]
        res = await avfed("logout")
        assert res.returncode == 0 and "logged out" in res.stdout, res.stderr
        assert "the server revoked the login's refresh token" in res.stdout and not res.stderr, res.stderr
        # the server revoked it: a copy taken before the logout refreshes nothing
        async with aiohttp.ClientSession() as http:
            r = await http.post(server.url + "/api/v1/token/refresh", json={"refresh_token": before_logout})
            assert r.status == 401 and (await r.json())["error"] == "token-revoked"
            r = await http.post(server.url + "/api/v1/token/revoke", json={"refresh_token": "not.a.token"})
            assert r.status == 401 and "error" in await r.json()
        kept = json.loads(credentials_file().read_text())
        assert "access_token" not in kept and "refresh_token" not in kept and kept["url"] == server.url
        assert saved["refresh_token"] not in credentials_file().read_text()
        one_error_line(await avfed("whoami"), "not logged in")
        one_error_line(await avfed("collaborations", "list"), "not logged in")
    finally:
        await server.stop()


# --- the task views, on two real nodes -------------------------------------------------------------------
@dataclass
class Pair:
    server: Server
    nodes: dict[str, NodeSettings]
    orgs: dict[str, int]


@contextlib.asynccontextmanager
async def two_nodes(tmp_path: Path) -> AsyncIterator[Pair]:
    """Organizations alpha and beta, a running node each (neither shares its logs with initiators); the
    researcher of beta logs in with beta's keyring."""
    async with running_pair(tmp_path, "rc") as (server, settings):
        login = ["login", "--url", server.url, "--username", "res-beta", "--password", PASSWORD]
        res = await avfed(*login, "--key-file", str(settings["beta"].key_path))
        assert res.returncode == 0, res.stderr
        orgs = json.loads((await avfed("organizations", "list", "--format", "json")).stdout)
        yield Pair(server, settings, {o["name"]: o["id"] for o in orgs})


async def _finished(task_id: int) -> list[dict[str, object]]:
    for _ in range(600):
        res = await avfed("task", "runs", str(task_id), "--format", "json")
        assert res.returncode == 0, res.stderr
        runs: list[dict[str, object]] = json.loads(res.stdout)
        if runs and all(r["status"] in FINAL for r in runs):
            return runs
        await asyncio.sleep(0.2)
    raise AssertionError(f"task {task_id} did not finish: {runs}")


@pytest.mark.docker
async def test_task_show_logs_results_on_two_nodes(tmp_path: Path, docker_client: object) -> None:
    await asyncio.to_thread(ensure_probe_image)
    async with two_nodes(tmp_path) as pair:
        alpha, beta = pair.orgs["alpha"], pair.orgs["beta"]

        res = await avfed("nodes", "list", "--format", "json")
        assert res.returncode == 0, res.stderr
        listed = {n["organization"]: n for n in json.loads(res.stdout)}
        assert {n["status"] for n in listed.values()} == {"online"}, listed
        assert listed["alpha"]["name"] == "node-alpha" and listed["alpha"]["last_seen_at"]

        create = ["task", "create", "--collaboration", "1", "--image", PROBE_IMAGE, "--format", "json"]
        res = await avfed(*create, "--method", "echo", "--args", '["hello"]')
        assert res.returncode == 0, res.stderr
        task_id = json.loads(res.stdout)["id"]
        await _finished(task_id)

        res = await avfed("task", "show", str(task_id), "--format", "json")
        assert res.returncode == 0, res.stderr
        shown = json.loads(res.stdout)
        assert shown["id"] == task_id and shown["status"] == "completed" and shown["signed"] is True
        assert shown["image"] == PROBE_IMAGE and "descriptor" not in shown and "links" not in shown
        assert [(r["organization"], r["organization_id"], r["status"]) for r in shown["runs"]] == sorted(
            [("alpha", alpha, "completed"), ("beta", beta, "completed")], key=lambda x: x[1]
        )
        assert all(r["has_result"] and r["reason"] is None for r in shown["runs"])
        res = await avfed("task", "show", str(task_id))
        assert res.returncode == 0 and f"task {task_id}" in res.stdout and "alpha (" in res.stdout

        # logs: beta's own run opens with beta's key; alpha's is sealed to alpha and says so
        res = await avfed("task", "logs", str(task_id), "--format", "json")
        assert res.returncode == 0, res.stderr
        logs = {item["organization"]: item for item in json.loads(res.stdout)}
        assert logs["beta"]["readable"] is True and "probe: echo ['hello']" in logs["beta"]["log"]
        assert logs["alpha"]["readable"] is False and logs["alpha"]["log"] is None
        assert "not shared with you" in logs["alpha"]["why"]
        res = await avfed("task", "logs", str(task_id))
        assert res.returncode == 0 and "probe: echo ['hello']" in res.stdout
        [alpha_head] = [
            line for line in res.stdout.splitlines() if line.startswith("=== ") and "alpha" in line
        ]
        assert "not shared with you" in alpha_head

        # results: one file per organization
        out = tmp_path / "results"
        res = await avfed("task", "results", str(task_id), "--output", str(out))
        assert res.returncode == 0, res.stderr
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [f"organization-{alpha}.json", f"organization-{beta}.json"]
        )
        for org_id in (alpha, beta):
            echoed = json.loads((out / f"organization-{org_id}.json").read_text())
            assert echoed["args"] == ["hello"]
        res = await avfed("task", "results", str(task_id), "--output", str(out / "csv"), "--format", "csv")
        assert res.returncode == 0, res.stderr
        rows = list(csv.DictReader(io.StringIO((out / "csv" / f"organization-{alpha}.csv").read_text())))
        assert len(rows) == 1 and json.loads(rows[0]["args"]) == ["hello"]

        # a failing task: its reason per organization, and results say which organizations have none
        res = await avfed(*create, "--method", "fail", "--args", "[5]", "--org", str(alpha))
        assert res.returncode == 0, res.stderr
        failing = json.loads(res.stdout)["id"]
        [run] = await _finished(failing)
        assert run["status"] == "failed" and str(run["reason"]).startswith("algorithm-error"), run
        res = await avfed("task", "show", str(failing), "--format", "json")
        [shown_run] = json.loads(res.stdout)["runs"]
        assert shown_run["status"] == run["status"] and shown_run["reason"] == run["reason"]
        assert shown_run["has_result"] is False
        res = await avfed("task", "show", str(failing))
        assert f"alpha ({alpha}): run {run['id']} {run['status']}: {run['reason']}" in res.stdout.splitlines()
        res = await avfed("task", "results", str(failing), "--output", str(tmp_path / "none"))
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.splitlines()[0].startswith(f"alpha ({alpha}): run {run['id']}")
        assert (
            res.stderr.strip().splitlines()[-1].startswith("vfed: error: 1 of 1 organizations have no result")
        )
        assert list((tmp_path / "none").iterdir()) == []

        res = await avfed("task", "list")
        assert res.returncode == 0 and res.stdout.splitlines()[0].split()[:2] == ["ID", "STATUS"]
        assert len(res.stdout.splitlines()) == 3
