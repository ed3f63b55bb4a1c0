"""Issue 6's scenario on one machine: two dockerized nodes with different names and scopes, a real server
process (`vserver start` + `vserver import`), the session's Mosquitto as doorbell broker, real algorithm
containers started by the agents-in-containers as siblings.

`--develop ROOT` mounts this checkout over the package inside vfed/node, so the test exercises the code under
test even when the image was built from an older tree (and exercises `--develop` itself).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from tests.node.node_harness import PROBE_IMAGE, ensure_probe_image
from vnode_testlib import (
    PASSWORD,
    ROOT,
    VNODE,
    Dirs,
    VServer,
    dirs,
    remove_node_objects,
    unique,
    vnode_proc,
    vserver,
)

from vfed.client.client import Client
from vfed.node.config import load_settings

__all__ = ["dirs", "vserver"]

pytestmark = [pytest.mark.docker, pytest.mark.mqtt, pytest.mark.slow]


@pytest.fixture
def names(docker_client: docker.DockerClient) -> Iterator[tuple[str, str]]:
    first, second = unique("na"), unique("nb")
    yield first, second
    for name in (first, second):
        remove_node_objects(docker_client, name)


def _ok(*args: str) -> str:
    done = vnode_proc(*args)
    assert done.returncode == 0, f"vnode {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _listed() -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in json.loads(_ok("list", "--format", "json"))}


def _runs(client: Client, task_id: int) -> dict[int, str]:
    return {r["organization_id"]: r["status"] for r in client.runs(task_id)}


def _wait_runs(client: Client, task_id: int, want: dict[int, str], timeout_s: float = 60) -> dict[int, str]:
    deadline = time.monotonic() + timeout_s
    seen = _runs(client, task_id)
    while time.monotonic() < deadline:
        seen = _runs(client, task_id)
        if all(seen.get(org) == status for org, status in want.items()):
            return seen
        time.sleep(0.5)
    raise AssertionError(f"runs of task {task_id}: {seen}, expected {want}")


def test_two_nodes_on_one_machine(
    dirs: Dirs,
    vserver: VServer,
    names: tuple[str, str],
    docker_client: docker.DockerClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ensure_probe_image()
    keys = vserver.import_world(["A", "B"])
    vserver.start()
    first, second = names
    table = tmp_path / "table.csv"
    table.write_text("x\n1\n2\n")
    broker = vserver.mqtt_url or ""
    common = ["--server-url", vserver.url, "--mqtt-url", broker, "--allow-image", PROBE_IMAGE]
    _ok("new", first, "--api-key", keys["A"], "--dataset", f"table={table}", *common)
    _ok("new", second, "--system", "--api-key", keys["B"], "--no-generate-key", *common)
    # The second organization's key is passphrase-protected: start must hand the passphrase to the agent.
    monkeypatch.setenv("VFED_TEST_KEY_PASS", "a passphrase for node b")
    _ok("keys", "generate", second, "--system", "--passphrase-env", "VFED_TEST_KEY_PASS")

    # Both start (different names, different scopes) and come online.
    assert f"node {first} (user) is online" in _ok("start", first, "--develop", str(ROOT))
    assert f"node {second} (system) is online" in _ok("start", second, "--system", "--develop", str(ROOT))
    rows = _listed()
    for name, scope in ((first, "user"), (second, "system")):
        assert rows[name]["scope"] == scope
        assert rows[name]["running"] is True and rows[name]["status"] == "online", rows[name]
        assert rows[name]["runtime"] == "docker"
    assert rows[first]["datasets"] == ["table"] and rows[second]["datasets"] == []
    _check_agent_container(docker_client, f"vfed-{first}-user", first, table)

    # attach follows the log until Ctrl-C (read up to the agent's start line: lines come in one by one, and
    # the agent logs others before it, e.g. the ledger's verification).
    out = _interrupt_when(
        [VNODE, "attach", first, "--tail", "all"],
        lambda lines: any("vfed.node.agent" in line and "started" in line for line in lines),
    )
    assert "started" in out and "vfed.node" in out, out

    # The second node stops: offline, and its work waits for it.
    assert f"stopped node {second} (system)" in _ok("stop", second, "--system", "--grace", "20")
    rows = _listed()
    assert rows[second]["running"] is False and rows[second]["status"] == "offline"
    assert rows[first]["running"] is True and rows[first]["status"] == "online"

    key_file = load_settings(dirs.user_config / "vfed" / "nodes" / f"{first}.yaml").key_path
    with Client(vserver.url, key_file=key_file) as researcher:
        researcher.login("res-A", PASSWORD)
        orgs = {o["name"]: o["id"] for o in researcher.organizations()}
        collaboration = researcher.collaborations()[0]["id"]
        # B runs A's tasks once its admin pinned A's fingerprint, as A's admin read it out (B is stopped
        # now: the agent reads its pins when it starts, and again whenever the file changes).
        shown = json.loads(_ok("keys", "show", first, "--format", "json"))
        pinned = _ok("trust", str(orgs["A"]), second, "--system", "--fingerprint", shown["fingerprint"])
        assert f"pinned organization {orgs['A']} to {shown['fingerprint']}" in pinned
        task = researcher.create_task(collaboration, PROBE_IMAGE, "echo", args=[2, 3])
        _wait_runs(researcher, task["id"], {orgs["A"]: "completed"})
        time.sleep(3)  # the stopped node's run must not move, even given time
        assert _runs(researcher, task["id"])[orgs["B"]] == "pending"

        # Started again (and attached), the second node picks up its pending run and the task completes.
        started = _interrupt_when(
            [VNODE, "start", second, "--system", "--develop", str(ROOT), "--attach"],
            lambda lines: (
                any("is online" in line for line in lines)
                and any("vfed.node.agent" in line for line in lines)
            ),
        )
        assert f"node {second} (system) is online" in started
        _wait_runs(researcher, task["id"], {orgs["A"]: "completed", orgs["B"]: "completed"})
        results = {r["organization_id"]: r["value"] for r in researcher.results(task)}
    assert results == {orgs["A"]: 5 * orgs["A"], orgs["B"]: 5 * orgs["B"]}

    assert f"stopped node {first} (user)" in _ok("stop", "--all")
    assert f"stopped node {second} (system)" in _ok("stop", "--all", "--system")
    rows = _listed()
    assert not rows[first]["running"] and not rows[second]["running"]
    assert not [
        v for v in docker_client.volumes.list() if (v.name or "").endswith("-tmp") and first in v.name
    ]


def _interrupt_when(cmd: list[str], done: Callable[[list[str]], bool], timeout_s: float = 120) -> str:
    """Run cmd, read its output until done(lines), then Ctrl-C it; it must exit 0. Returns all its output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()  # raw reads: a buffered readline would hide data from select
    text = ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None and not done(text.splitlines()):
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            text += os.read(fd, 65536).decode("utf-8", "replace")
    proc.send_signal(signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
        raise AssertionError(
            f"{cmd} did not end within 20 s of Ctrl-C; its output:\n{text}{rest.decode('utf-8', 'replace')}"
        ) from None
    output = text + rest.decode("utf-8", "replace")
    lines = text.splitlines()
    assert done(lines), f"{cmd}: not seen in its output within {timeout_s} s:\n{output}"
    assert proc.returncode == 0, output
    return output


def _check_agent_container(client: docker.DockerClient, container: str, name: str, table: Path) -> None:
    """Host network for a loopback server; socket, config, key, dataset (read-only) and volume mounted."""
    attrs = client.containers.get(container).attrs
    assert attrs["HostConfig"]["NetworkMode"] == "host"
    assert attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    mounts = {m["Destination"]: m for m in attrs["Mounts"]}
    assert mounts["/var/run/docker.sock"]["Type"] == "bind"
    assert mounts["/etc/vfed/node.yaml"]["RW"] is False
    assert mounts["/etc/vfed/keys"]["RW"] is False  # the key file's folder: a rotation reaches the agent
    assert mounts["/etc/vfed/trust"]["Type"] == "bind"  # the pins `vnode trust` writes
    assert mounts[str(table)]["RW"] is False and mounts[str(table)]["Source"] == str(table)
    assert (
        mounts["/var/lib/vfed"]["Type"] == "volume" and mounts["/var/lib/vfed"]["Name"] == f"vfed-{name}-vol"
    )
    assert any(d.endswith("/site-packages/vfed/node") for d in mounts)  # --develop
    labels = attrs["Config"]["Labels"]
    assert labels["vfed.agent.node"] == name and labels["vfed.agent.scope"] == "user"
