"""Real things for the hostile-image tests to aim at.

Canary listeners on the host, another node's network with a server in it, another job's volume holding a
secret, and a proxy app on a run's Unix socket."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import psutil  # type: ignore[import-untyped]
from aiohttp import web
from docker.types import Mount
from tests import imagebuild

HOSTILE_IMAGE = "vfed-test/hostile"
HOSTILE_DIR = Path(__file__).resolve().parents[1] / "images" / "hostile"
REPORT_PREFIX = "HOSTILE-REPORT "
COMMON_PORTS = (22, 80, 443, 1883, 5432, 6443, 7600)


def build_hostile_image(client: docker.DockerClient) -> str:
    """Build the image from tests/images/hostile unless its inputs are unchanged."""
    imagebuild.ensure("hostile", HOSTILE_IMAGE)
    return HOSTILE_IMAGE


def parse_report(logs: str) -> dict[str, Any]:
    """The hostile script's JSON report, keyed by attempt name."""
    lines = [line for line in logs.splitlines() if line.startswith(REPORT_PREFIX)]
    assert lines, f"no report in the logs:\n{logs[-3000:]}"
    body = json.loads(lines[-1][len(REPORT_PREFIX) :])
    return {r["name"]: r for r in body["results"]} | {"_body": body}


def bridge_gateway(client: docker.DockerClient) -> str:
    """The host's address on docker0, as `docker network inspect bridge` tells it."""
    config = client.networks.get("bridge").attrs["IPAM"]["Config"][0]
    if config.get("Gateway"):
        return str(config["Gateway"])
    return str(next(ipaddress.ip_network(config["Subnet"]).hosts()))  # Docker's default: the first address


def host_ip() -> str | None:
    """The host's own non-loopback IPv4 address (not a Docker bridge), if it has one."""
    for name, addrs in psutil.net_if_addrs().items():
        if name == "lo" or name.startswith(("docker", "br-", "veth")):
            continue
        for addr in addrs:
            if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                return str(addr.address)
    return None


@dataclass
class Canary:
    """TCP and UDP listeners on 0.0.0.0 that remember who reached them."""

    tcp_port: int = 0
    udp_port: int = 0
    tcp_peers: list[str] = field(default_factory=list)
    udp_peers: list[str] = field(default_factory=list)

    def reset(self) -> None:
        self.tcp_peers.clear()
        self.udp_peers.clear()


class _UdpRecorder(asyncio.DatagramProtocol):
    def __init__(self, canary: Canary) -> None:
        self.canary = canary

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.canary.udp_peers.append(str(addr[0]))


@asynccontextmanager
async def canary_listeners() -> AsyncIterator[Canary]:
    canary = Canary()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        canary.tcp_peers.append(str(writer.get_extra_info("peername")[0]))
        writer.close()

    server = await asyncio.start_server(on_connect, host="0.0.0.0", port=0)
    canary.tcp_port = server.sockets[0].getsockname()[1]
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: _UdpRecorder(canary),
        local_addr=("0.0.0.0", 0),
    )
    canary.udp_port = transport.get_extra_info("sockname")[1]
    try:
        yield canary
    finally:
        transport.close()
        server.close()
        await server.wait_closed()


@dataclass
class OtherNode:
    network: str
    server_ip: str
    server_port: int


@contextmanager
def other_node_network(client: docker.DockerClient) -> Iterator[OtherNode]:
    """Another node's network (`vfed-<node>-net`) with an HTTP server in it."""
    name = f"vfed-other{uuid.uuid4().hex[:8]}-net"
    network = client.networks.create(name, driver="bridge")
    server = client.containers.run(
        "vfed/base", ["python3", "-m", "http.server", "8080"], network=name, detach=True, user="10001:10001"
    )
    try:
        deadline = time.monotonic() + 30
        while b"Serving HTTP" not in server.logs() and time.monotonic() < deadline:
            time.sleep(0.05)
        server.reload()
        ip = server.attrs["NetworkSettings"]["Networks"][name]["IPAddress"]
        yield OtherNode(network=name, server_ip=ip, server_port=8080)
    finally:
        server.remove(force=True)
        network.remove()


def put_secret(client: docker.DockerClient, volume: str, secret: str) -> None:
    """Write secret.txt into a volume, as another job's run would."""
    client.containers.run(
        "vfed/base",
        ["sh", "-c", f"echo {secret} > /v/secret.txt && chmod 644 /v/secret.txt"],
        mounts=[Mount("/v", volume, type="volume")],
        network_mode="none",
        remove=True,
    )


@asynccontextmanager
async def proxy_on_socket(path: Path, run_id: str) -> AsyncIterator[list[str]]:
    """A tiny aiohttp app on the run's Unix socket, standing in for the proxy; yields the paths it served."""
    served: list[str] = []

    async def run_info(request: web.Request) -> web.Response:
        served.append(request.path)
        return web.json_response({"run_id": run_id, "via": "unix-socket"})

    app = web.Application()
    app.router.add_get("/run", run_info)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    try:
        yield served
    finally:
        await runner.cleanup()
