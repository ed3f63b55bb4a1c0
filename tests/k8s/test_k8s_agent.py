"""A node whose runs go to a cluster, end to end: `vnode new --runtime kubernetes` writes its
configuration, `vnode start --no-container` runs its agent as a process, a researcher's central task runs as
a Job on the fake API server (tests/k8s/fake_apiserver.py: every body validated against 1.32, each pod a real
Docker container) and creates a subtask through the node's proxy, which its pod reaches by the proxy
Service's name and its own token alone; the researcher decrypts the right result.

The agent is outside the cluster here, as `--no-container` runs it: its proxy Service has no selector and an
EndpointSlice names the agent's listener, which is the address the fake's kubelet gives the Service's name
(on a cluster, its DNS and kube-proxy do that). Each run's token exists only in its Secret and its pod; it
opens nothing once the run ended, never shows in the agent's log, the server's database, a Job or a result.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import docker
import docker.errors
import pytest
import yaml
from click.testing import CliRunner
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from tests.node.node_harness import PASSWORD, VNODE, Server

from vfed.client.client import AsyncClient
from vfed.node.cli import main as vnode_main
from vfed.node.operator.container import ONLINE_RE

sys.path.insert(0, str(Path(__file__).parent))
from fake_apiserver import FakeKubernetes

pytestmark = [pytest.mark.k8s, pytest.mark.docker]

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "vfed-site"
SERVICE = "vfed-node-proxy"
IMAGE_REPO = "vfed-test-tmp/k8s-sdk-probe"
"""A throwaway image of this test (removed at its end): the algorithm below on vfed/algorithm-base, with the
SDK of this tree (an algorithm-base built from an older tree reads no PROXY_TOKEN_FILE)."""

ALGORITHM = """
import os

from vfed.algorithms import AlgorithmClient, central, federated
from vfed.algorithms.transport import Transport


@federated(datasets=())
def part(factor):
    return {"value": factor * int(os.environ["ORGANIZATION_ID"])}


@central()
def total(client: AlgorithmClient, factor):
    url = os.environ["PROXY_URL"]
    wrong = Transport(url=url, token="not-the-token-of-this-run").request("GET", "/run")
    bare = Transport(url=url).request("GET", "/run")
    parts = client.run_subtask("part", [factor])
    return {
        "sum": sum(p["value"] for p in parts),
        "run_id": client.run_info().run_id,
        "refused": [wrong.status, wrong.json()["error"], bare.status],
        "proxy_env": {k: v for k, v in os.environ.items() if k.startswith("PROXY_")},
    }
"""

DOCKERFILE = """FROM vfed/algorithm-base
COPY algorithms /opt/vfed/lib/python3.11/site-packages/vfed/algorithms
COPY k8sprobe.py /opt/k8sprobe/k8sprobe.py
ENV VFED_ALGORITHM_MODULE=k8sprobe PYTHONPATH=/opt/k8sprobe
USER 10001:10001
ENTRYPOINT ["python3", "-m", "vfed.algorithms"]
"""


@pytest.fixture(scope="module")
def image(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    context = tmp_path_factory.mktemp("image")
    shutil.copytree(
        ROOT / "algorithms" / "vfed" / "algorithms",
        context / "algorithms",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (context / "k8sprobe.py").write_text(ALGORITHM)
    (context / "Dockerfile").write_text(DOCKERFILE)
    tag = f"{IMAGE_REPO}:{secrets.token_hex(4)}"
    docker_client.images.build(path=str(context), tag=tag, rm=True, forcerm=True)
    try:
        yield tag
    finally:
        docker_client.images.remove(tag, force=True)


@pytest.fixture
def network(docker_client: docker.DockerClient) -> Iterator[tuple[str, str]]:
    """An internal Docker network for the pods (no way out of the host) and its gateway, an address of this
    machine the pods reach: where the agent's listener binds."""
    made = docker_client.networks.create(
        f"vfed-test-k8s-{secrets.token_hex(4)}", driver="bridge", internal=True
    )
    try:
        made.reload()
        gateway = made.attrs["IPAM"]["Config"][0]["Gateway"]
        yield str(made.name), str(gateway)
    finally:
        made.remove()


def _vnode(*args: str) -> str:
    result = CliRunner().invoke(vnode_main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _proxy_service(api: k8s.ApiClient, address: str, port: int) -> None:
    """What a site does for an agent outside its cluster: a Service without a selector, and the agent's
    address as its EndpointSlice."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SERVICE},
        "spec": {"ports": [{"name": "proxy", "port": port, "protocol": "TCP", "targetPort": port}]},
    }
    k8s.CoreV1Api(api).create_namespaced_service(NAMESPACE, service)
    piece = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{SERVICE}-agent", "labels": {"kubernetes.io/service-name": SERVICE}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
        "ports": [{"name": "proxy", "port": port, "protocol": "TCP"}],
    }
    k8s.DiscoveryV1Api(api).create_namespaced_endpoint_slice(NAMESPACE, piece)


def _history(api: k8s.ApiClient, kind: str) -> list[dict[str, Any]]:
    """Every object of this kind the fake ever stored in the namespace, deleted ones too (its event history
    is kept whole; a real server compacts it)."""
    lister = {
        "secrets": k8s.CoreV1Api(api).list_namespaced_secret,
        "jobs": k8s.BatchV1Api(api).list_namespaced_job,
    }[kind]
    seen: dict[str, dict[str, Any]] = {}
    for event in k8s_watch.Watch().stream(lister, NAMESPACE, resource_version="1", timeout_seconds=1):
        if event["type"] == "ADDED":
            obj = api.sanitize_for_serialization(event["object"])
            seen[obj["metadata"]["name"]] = obj
    return list(seen.values())


async def _left(api: k8s.ApiClient, node: str) -> list[str]:
    """The node's run objects still in the namespace, once the agent cleaned up (at most 20 s)."""
    selector = f"vfed.node={node}"
    found: list[str] = []
    for _ in range(200):
        core, batch, net = k8s.CoreV1Api(api), k8s.BatchV1Api(api), k8s.NetworkingV1Api(api)
        found = [
            f"{kind} {item.metadata.name}"
            for kind, items in (
                ("job", batch.list_namespaced_job(NAMESPACE, label_selector=selector).items),
                ("secret", core.list_namespaced_secret(NAMESPACE, label_selector=selector).items),
                ("policy", net.list_namespaced_network_policy(NAMESPACE, label_selector=selector).items),
            )
            for item in items
        ]
        if not found:
            return found
        await asyncio.sleep(0.1)
    return found


@dataclass
class Outcome:
    result: dict[str, Any]
    run: dict[str, Any]
    run_log: str
    tokens: list[tuple[str, str]]  # (run id, token) of every run Secret the namespace ever held
    jobs: list[dict[str, Any]]  # every Job it ever held
    agent_log: str
    left: list[str]
    after: list[int]  # the listener's answers to each token once its run ended


async def test_a_central_task_runs_in_the_cluster_through_the_proxy_service(
    image: str, network: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net_name, gateway = network
    port = _free_port(gateway)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    server = Server(tmp_path / "server", mqtt_url=None)
    keys = await server.seed(["alpha"])
    await server.start()
    try:
        with FakeKubernetes(namespaces=(NAMESPACE,), require_digest=True, network=net_name) as fake:
            kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig", NAMESPACE)
            api = k8s_config.new_client_from_config(str(kubeconfig))
            _proxy_service(api, gateway, port)
            name = f"k8s{secrets.token_hex(3)}"
            made = _vnode(
                "new", name, "--server-url", server.url, "--api-key", keys["alpha"],
                "--runtime", "kubernetes", "--namespace", NAMESPACE, "--kubeconfig", str(kubeconfig),
                "--proxy-port", str(port), "--proxy-listen", f"{gateway}:{port}",
                "--proxy-ip-block", f"{gateway}/32", "--allow-image", f"{IMAGE_REPO}*",
            )  # fmt: skip
            assert f"next: `vnode start {name} --no-container`" in made
            out = await _run_central_task(server, api, name, image, tmp_path, env, f"http://{gateway}:{port}")
    finally:
        await server.stop()

    assert out.left == [] and out.after == [401, 401]  # the runs' objects are gone; their tokens open nothing
    org = out.run["organization_id"]
    assert out.result["sum"] == 7 * org and out.result["run_id"] == out.run["id"]
    assert out.result["refused"] == [401, "unauthorized", 401]  # from the pod: a wrong token, and none
    assert out.result["proxy_env"] == {
        "PROXY_URL": f"http://{SERVICE}.{NAMESPACE}.svc:{port}",
        "PROXY_TOKEN_FILE": "/run/vfed-token/token",
    }
    assert len(out.tokens) == 2 and out.tokens[0][0] != out.tokens[1][0]  # the task's run, its subtask's
    plain = [_decoded(t) for _, t in out.tokens]
    assert len(set(plain)) == 2 and all(len(t) == 43 for t in plain)  # 32 random bytes, URL-safe base64
    assert len(out.jobs) == 2
    for job in out.jobs:
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        names = {e["name"] for e in container["env"]}
        assert {"PROXY_URL", "PROXY_TOKEN_FILE"} <= names and "PROXY_SOCKET" not in names
        assert [v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v] == [
            job["metadata"]["name"]
        ]
        assert not [v for v in pod["volumes"] if v["name"] == "proxy-socket"]
    database = b"".join(p.read_bytes() for p in (tmp_path / "server").rglob("*") if p.is_file())
    agent_files = b"".join(p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file())
    for token in plain:
        assert token not in out.agent_log
        assert token.encode() not in database
        assert token.encode() not in agent_files  # the journal keeps none: a restart reads it from the Secret
        assert token not in str(out.jobs) and token not in str(out.result) and token not in out.run_log


async def _run_central_task(
    server: Server,
    api: k8s.ApiClient,
    name: str,
    image: str,
    tmp_path: Path,
    env: dict[str, str],
    listener: str,
) -> Outcome:
    """`vnode start NAME --no-container` with the configuration `vnode new` wrote (and the site's own choices
    for this test), the researcher's task `total`, and what the namespace and the listener show after."""
    config_path = tmp_path / "config" / "vfed" / "nodes" / f"{name}.yaml"
    config = yaml.safe_load(config_path.read_text())
    config.update(leases="off", poll_interval_s=0.3)  # no ledger here; a fast poll
    config["policies"]["unchecked_outputs"] = "allow"  # plain JSON results
    config["runtime"]["memory_bytes"] = 256 * 1024 * 1024
    config["runtime"]["image_source"] = "engine"  # the fake's kubelet runs images of the local engine
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "agent.log"
    agent = _start_agent(name, env, log_path)
    try:
        await _online(agent, log_path)
        async with AsyncClient(server.url, key_file=Path(config["private_key"])) as researcher:
            await researcher.login("res-alpha", PASSWORD)
            collab = (await researcher.collaborations())[0]["id"]
            task = await researcher.create_task(collab, image, "total", args=[7])
            done = await researcher.wait(task, timeout_s=60, progress=False)
            assert done["status"] == "completed", (done, log_path.read_text()[-3000:])
            (result,) = await researcher.results(task)
            (run,) = await researcher.runs(task["id"])
            run_log = await researcher.run_log(run)
        left = await _left(api, name)
        secrets_seen, jobs = await asyncio.gather(
            asyncio.to_thread(_history, api, "secrets"), asyncio.to_thread(_history, api, "jobs")
        )
        tokens = [(s["metadata"]["labels"]["vfed.run_id"], s["data"]["token"]) for s in secrets_seen]
        after = [await _status(listener, _decoded(token)) for _, token in tokens]
    finally:
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(30)
    agent_log = log_path.read_text(errors="replace")
    assert code == 0, agent_log[-3000:]
    return Outcome(result, run, run_log, tokens, jobs, agent_log, left, after)


def _decoded(encoded: str) -> str:
    import base64

    return base64.b64decode(encoded).decode()


async def _status(url: str, token: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/run", headers={"Authorization": f"Bearer {token}"}) as answer,
    ):
        return answer.status


def _start_agent(name: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`vnode start NAME --no-container`: the agent as a child process, its output in `log_path`."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [VNODE, "start", name, "--no-container"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        )


def _text(path: Path) -> str:
    return path.read_text(errors="replace")


async def _online(agent: subprocess.Popen[bytes], log_path: Path) -> None:
    for _ in range(300):
        if ONLINE_RE.search(_text(log_path)):
            return
        if agent.poll() is not None:
            raise AssertionError(f"the agent exited ({agent.returncode}):\n{_text(log_path)[-3000:]}")
        await asyncio.sleep(0.1)
    raise AssertionError(f"the agent did not come online:\n{_text(log_path)[-3000:]}")
