"""Issue 5's hostile algorithm, for real: an image trying every way out, started through the Docker runtime.

Every attempt must fail. Each probe also runs where it should succeed (a plain container on another node's
network, as root, with the Docker socket and the other job's volume mounted) so that a broken probe cannot
pass for a closed door.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.types import Mount
from hostile_support import (
    COMMON_PORTS,
    Canary,
    OtherNode,
    bridge_gateway,
    build_hostile_image,
    canary_listeners,
    host_ip,
    other_node_network,
    parse_report,
    proxy_on_socket,
    put_secret,
)
from runtime_contract import SpecFactory, make_spec, node_name

from vfed.node import run_folder
from vfed.node.run_folder import BadOutput
from vfed.node.runtime import DatasetMount, RunLimits
from vfed.node.runtime.docker import DockerRuntime
from vfed.node.runtime.docker_config import DockerRuntimeConfig

pytestmark = [pytest.mark.docker, pytest.mark.slow]
__all__ = ["make_spec", "node_name"]  # shared fixtures, used by name


@pytest.fixture(scope="module")
def hostile_image(docker_client: docker.DockerClient) -> str:
    return build_hostile_image(docker_client)


@pytest.fixture
def run_image(hostile_image: str) -> str:
    """make_spec's image unless a test names another."""
    return hostile_image


@pytest.fixture
async def runtime() -> AsyncIterator[DockerRuntime]:
    async with DockerRuntime(DockerRuntimeConfig(memory_bytes=256 << 20, pids_limit=64)) as rt:
        yield rt


@pytest.fixture
async def canary() -> AsyncIterator[Canary]:
    async with canary_listeners() as c:
        yield c


@pytest.fixture
def other_node(docker_client: docker.DockerClient) -> Any:
    with other_node_network(docker_client) as other:
        yield other


def probe_targets(
    docker_client: docker.DockerClient, canary: Canary, other: OtherNode, volume: str
) -> dict[str, Any]:
    gateway, own_ip = bridge_gateway(docker_client), host_ip()
    tcp = [
        ["1.1.1.1", 443, "internet"],
        [gateway, canary.tcp_port, "gateway-canary"],
        [other.server_ip, other.server_port, "other-node"],
        *([gateway, port, "gateway-common"] for port in COMMON_PORTS),
    ]
    udp = [[gateway, canary.udp_port, "gateway-canary"]]
    if own_ip:
        tcp.append([own_ip, canary.tcp_port, "host-ip-canary"])
        udp.append([own_ip, canary.udp_port, "host-ip-canary"])
    return {"tcp": tcp, "udp": udp, "volumes": [volume], "timeout_s": 3}


async def run_control(
    client: docker.DockerClient, image: str, env: dict[str, str], other: OtherNode, volume: str
) -> str:
    """The same probes from a plain container: root, on a network, the socket and the volume mounted."""

    def run() -> str:
        container = client.containers.run(
            image,
            ["probes"],
            user="0:0",
            network=other.network,
            environment=env,
            mounts=[
                Mount("/mnt/other-job", volume, type="volume"),
                Mount("/var/run/docker.sock", "/var/run/docker.sock", type="bind"),
            ],
            detach=True,
        )
        try:
            container.wait(timeout=120)
            return str(container.logs().decode())
        finally:
            container.remove(force=True)

    return await asyncio.to_thread(run)


def names(report: dict[str, Any], prefix: str) -> list[str]:
    return [n for n in report if n.startswith(prefix)]


async def test_hostile_algorithm_cannot_get_out(
    runtime: DockerRuntime,
    make_spec: SpecFactory,
    node_name: str,
    hostile_image: str,
    canary: Canary,
    other_node: OtherNode,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    # Another job of the same node left a secret in its temporary volume.
    other_volume = await runtime.ensure_job_volume(node_name, "otherjob")
    secret = f"secret-{uuid.uuid4().hex}"
    await asyncio.to_thread(put_secret, docker_client, other_volume, secret)
    targets = probe_targets(docker_client, canary, other_node, other_volume)
    env = {"HOSTILE_TARGETS": json.dumps(targets)}

    # Positive control: the probes work, and every target is really there to be reached.
    control = parse_report(await run_control(docker_client, hostile_image, env, other_node, other_volume))
    reachable = [*names(control, "tcp:gateway-canary"), *names(control, "tcp:other-node")]
    reachable += [*names(control, "tcp:host-ip-canary"), *names(control, "udp:")]
    for name in [
        *reachable,
        "docker-socket:/var/run/docker.sock",
        "docker-socket-present:/var/run/docker.sock",
    ]:
        assert control[name]["ok"], control[name]
    assert control["find-secrets"]["detail"] == [secret]
    assert control["capabilities"]["ok"] and control["setuid-root"]["ok"] and control["write:/"]["ok"]
    assert "lo" in control["interfaces"]["detail"] and len(control["interfaces"]["detail"]) > 1
    assert canary.tcp_peers, (
        "the canary must be reachable from a normal container, or this test proves nothing"
    )
    await asyncio.sleep(0.2)
    assert canary.udp_peers, "UDP datagrams from a normal container must reach the canary"
    canary.reset()

    # The hostile run, through the runtime, with a dataset and its proxy socket.
    data = tmp_path / "cohort.csv"
    data.write_text("age\n41\n")
    data.chmod(0o666)
    sock = tmp_path / "proxy" / "proxy.sock"
    sock.parent.mkdir()
    spec = make_spec(
        ["probes"],
        image=hostile_image,
        job_id="hostilejob",
        env=env,
        datasets=[DatasetMount(label="cohort", host_path=str(data), type="csv")],
        proxy_socket=str(sock),
    )
    async with proxy_on_socket(sock, spec.run_id) as served:
        handle = await runtime.start(spec)
        status = await runtime.wait(handle, timeout_s=120)
    logs = await runtime.logs(handle, max_bytes=1 << 20)
    assert status.exit_code == 0, logs
    report = parse_report(logs)
    assert json.loads((Path(spec.run_dir) / "output").read_text()) == report["_body"]

    # Network: nothing but loopback, every address and port refused at once.
    assert report["interfaces"]["detail"] == ["lo"]
    for name in names(report, "tcp:") + names(report, "udp:"):
        assert not report[name]["ok"], report[name]
        assert report[name]["detail"].startswith("ENETUNREACH"), report[name]
        assert report[name]["elapsed_s"] < 1, report[name]
    assert len(names(report, "tcp:")) == len(targets["tcp"])
    assert not report["dns:example.com"]["ok"]
    await asyncio.sleep(0.2)
    assert canary.tcp_peers == [] and canary.udp_peers == []
    for name in names(report, "docker-socket"):
        assert not report[name]["ok"], report[name]

    # Files: nothing outside its own folders, no other job's volume, the dataset read-only.
    for folder in (
        "/",
        "/etc",
        "/usr/local/bin",
        "/opt",
        "/home",
        "/var/tmp",
        "/root",
        "/mnt",
        "/mnt/job",
        "/run",
    ):
        assert not report[f"write:{folder}"]["ok"], report[f"write:{folder}"]
    assert not report["write:dataset:cohort"]["ok"] and report["read:dataset:cohort"]["ok"]
    for name in (
        "write:run-dir",
        "write:temporary-folder",
        "write:/tmp",
        "read:input",
        "exec:temporary-folder",
    ):
        assert report[name]["ok"], report[name]  # its own folders do work
    assert not report["exec:/tmp"]["ok"]  # /tmp is noexec
    assert report["find-secrets"]["detail"] == []
    assert not report[f"read:/var/lib/docker/volumes/{other_volume}/_data/secret.txt"]["ok"]

    # Privileges: none to gain.
    for name in ("setuid-root", "capabilities", "chown-to-root"):
        assert not report[name]["ok"], report[name]
    assert report["identity"]["detail"] == {"uid": 10001, "gid": 10001, "no_new_privs": "1"}

    # The one way out that is meant to work: its proxy, over the Unix socket, alone in a read-only folder.
    assert report["list:proxy-folder"]["detail"] == ["proxy.sock"], report["list:proxy-folder"]
    for name in ("write:proxy-folder", "remove:proxy-socket"):
        assert not report[name]["ok"] and "EROFS" in report[name]["detail"], report[name]
    assert report["proxy:GET /run"]["ok"], report["proxy:GET /run"]
    assert f'"run_id": "{spec.run_id}"' in report["proxy:GET /run"]["detail"]
    assert served == ["/run"]


async def test_fork_bomb_meets_the_pids_limit(
    runtime: DockerRuntime, make_spec: SpecFactory, hostile_image: str
) -> None:
    spec = make_spec(["forkbomb"], image=hostile_image, env={"HOLD_S": "3"}, limits=RunLimits(pids_limit=48))
    handle = await runtime.start(spec)
    async with asyncio.timeout(60):
        while "PIDS-LIMIT-REACHED" not in await runtime.logs(handle):  # noqa: ASYNC110 - polling a container
            await asyncio.sleep(0.1)
    # While the bomb holds every pid it could get, the host and the runtime still work.
    assert (await asyncio.to_thread(subprocess.run, ["true"], check=False)).returncode == 0
    other = await runtime.start(make_spec(["python3", "-c", "print('still fine')"], image="vfed/base"))
    assert (await runtime.wait(other, timeout_s=60)).exit_code == 0
    status = await runtime.wait(handle, timeout_s=60)
    assert status.exit_code == 0, await runtime.logs(handle)
    body = parse_report(await runtime.logs(handle))["_body"]
    fork = body["results"][0]
    assert not fork["ok"] and fork["detail"].startswith("EAGAIN"), fork
    assert 0 < body["children"] < 48


async def test_memory_bomb_is_oom_killed(
    runtime: DockerRuntime, make_spec: SpecFactory, hostile_image: str
) -> None:
    spec = make_spec(["membomb"], image=hostile_image, limits=RunLimits(memory_bytes=64 << 20))
    handle = await runtime.start(spec)
    status = await runtime.wait(handle, timeout_s=60)
    assert status.oom_killed and status.exit_code == 137 and not status.succeeded
    assert status.reason == "out of memory (limit 64 MiB)"
    allocated = [
        int(line.split()[1]) for line in (await runtime.logs(handle)).splitlines() if "allocated" in line
    ]
    assert allocated and max(allocated) <= 64
    # The runtime keeps serving.
    after = await runtime.start(make_spec(["python3", "-c", "print('next run')"], image="vfed/base"))
    assert (await runtime.wait(after, timeout_s=60)).exit_code == 0


@pytest.mark.parametrize("mode", ["output-symlink", "output-fifo"])
async def test_booby_trapped_output_is_refused(
    runtime: DockerRuntime,
    make_spec: SpecFactory,
    hostile_image: str,
    tmp_path: Path,
    mode: str,
    docker_client: docker.DockerClient,
) -> None:
    """The run folder is writable by the algorithm: what it leaves there must not lead the agent elsewhere."""
    key = tmp_path / "org-private.key"
    key.write_text("PRIVATE KEY of the organization")
    spec = make_spec([mode], image=hostile_image, env={"SYMLINK_TARGET": str(key)})
    handle = await runtime.start(spec)
    container = docker_client.containers.get(handle.removeprefix("docker:"))
    await asyncio.to_thread(container.wait, timeout=60)
    run_dir = Path(spec.run_dir)
    output = run_dir / "output"
    if mode == "output-symlink":  # the trap is real: a naive reader gets the key
        assert output.is_symlink() and output.read_text() == key.read_text()
        assert (run_dir / "output.sealed").is_symlink()
        with pytest.raises(BadOutput, match="not a regular file"):
            run_folder.read_output(run_dir, max_bytes=1 << 20)
    else:
        assert output.is_fifo()
        with pytest.raises(BadOutput, match="not a regular file"):
            run_folder.read_output(run_dir, max_bytes=1 << 20)
    # The runtime leaves the folder as the run left it; once the run stopped, the node's cleaning (the one
    # place it happens, before the agent reads anything) leaves only regular files.
    assert (await runtime.wait(handle, timeout_s=60)).exit_code == 0, await runtime.logs(handle)
    assert output.is_symlink() or output.is_fifo()
    assert "output" in run_folder.sanitize(run_dir)
    assert sorted(os.listdir(run_dir)) == ["input"]
    with pytest.raises(BadOutput, match="no output"):
        run_folder.read_output(run_dir, max_bytes=1 << 20)
    assert key.read_text() == "PRIVATE KEY of the organization"
