"""Issue 18's main test: a federation across machines. Linux network namespaces on a bridge stand for the
machines (tests/deploy/netns.py): the server with its PostgreSQL and Mosquitto on one, a node agent on each of
two others (their algorithm containers on the host's Docker engine, as always), the researcher on a fourth.
They reach each other only at 198.18.0.0/15 addresses that exist inside these namespaces.

Deployed the way docs/deployment.md says: HTTPS with the private CA `vserver tls init` writes (nodes and the
researcher are given its ca.crt), Mosquitto configured by `vserver broker config` (TLS, no anonymous clients,
each node's own password from its login, an ACL per node topic), nodes told the broker by `mqtt.public_url`.

A researcher at organization A runs the probe image's `master` function at A; it creates a subtask at A and B
through its run's proxy and sums their results. Both agents poll only once an hour, so each run must have been
started by a doorbell message: the agents' start timelines (`vfed.node.timeline`) must begin with the ring.
Then what must be refused is: plain HTTP, a researcher holding the wrong CA, an anonymous broker client, and
node A reading node B's doorbell or publishing anywhere.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml
from tests.deploy import services
from tests.deploy.netns import Machine, Network, network
from tests.node.node_harness import PROBE_IMAGE, ensure_probe_image, remove_run_containers

from vfed.common.crypto import Keyring
from vfed.common.trust import TrustMode, TrustStore, fingerprint
from vfed.server.broker_auth import node_password, node_username

pytestmark = [
    pytest.mark.netns,
    pytest.mark.docker,
    pytest.mark.mqtt,
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.timeout(180),
]

BIN = Path(sys.executable).parent
PROBE = str(Path(__file__).with_name("probe.py"))
PASSWORD = "correct-horse-battery-staple"
SERVER_PORT = 7600
MQTTS_PORT = 8883
NOT_AUTHORIZED = 0x87
ORGS = ("A", "B")


@dataclass
class Federation:
    """The running deployment: machines, the server's URL, node names and logs, and organization ids."""

    net: Network
    work: Path
    server: Machine
    researcher: Machine
    nodes: dict[str, Machine]
    url: str
    node_names: dict[str, str]
    node_logs: dict[str, Path]
    server_log: Path
    ca: Path = Path()
    """The private CA (`vserver tls init`'s ca.crt) nodes and the researcher were given."""
    wrong_ca: Path = Path()
    """Another CA for the same address: what a man in the middle would present."""
    api_keys: dict[str, str] = field(default_factory=dict)
    node_ids: dict[str, int] = field(default_factory=dict)
    org_ids: dict[str, int] = field(default_factory=dict)
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    collaboration: int = 1
    """The fresh database's only collaboration."""

    def vfed(
        self, *args: str, input: str | None = None, timeout_s: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """The researcher's `vfed` CLI on the researcher's machine (pinned trust: no pin at first sight)."""
        return self.net.run(
            self.researcher,
            [str(BIN / "vfed"), *args],
            input=input,
            timeout_s=timeout_s,
            env={"VFED_TRUST": "pinned", "VFED_CONFIG_DIR": str(self.work / "researcher")},
        )

    def logs(self) -> str:
        """The tails of the server's and the agents' logs, for a failure's message."""
        parts = [("server", self.server_log), *((f"node {o}", p) for o, p in self.node_logs.items())]
        return "".join(
            f"\n--- {name} ---\n{path.read_text(errors='replace')[-3000:]}"
            for name, path in parts
            if path.exists()
        )

    def probe(self, machine: Machine, *args: str) -> dict[str, Any]:
        done = self.net.run(machine, [sys.executable, PROBE, *args], timeout_s=90)
        assert done.returncode == 0, done.stdout + done.stderr
        found: dict[str, Any] = json.loads(done.stdout)
        return found


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args}\n-> {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _wait_for_line(
    path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout_s: float = 60
) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(pattern, path.read_text(errors="replace")) if path.exists() else None
        if found:
            return found
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    text = path.read_text(errors="replace") if path.exists() else ""
    raise AssertionError(f"{pattern!r} not in {path.name} (process exit: {proc.poll()}):\n{text[-3000:]}")


def _import(net: Network, server: Machine, work: Path, config: Path) -> dict[str, str]:
    """`vserver import` on the server's machine: organizations A and B, a researcher at A, a node each."""
    spec = {
        "organizations": [{"name": o} for o in ORGS],
        "collaborations": [{"name": "deploy", "organizations": list(ORGS)}],
        "users": [{"username": "res-A", "password": PASSWORD, "organization": "A"}],
        "nodes": [{"name": f"node-{o}", "organization": o, "collaboration": "deploy"} for o in ORGS],
    }
    path = work / "federation.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = _ok(net.run(server, [str(BIN / "vserver"), "import", str(path), "--config", str(config)]))
    keys = dict(re.findall(r"node node-(\S+): created; API key \(shown once\): (\S+)", out))
    assert set(keys) == set(ORGS), out
    return keys


def _node_config(work: Path, org: str, name: str, api_key: str, server_url: str, ca: Path) -> Path:
    """Node `name`'s YAML: the server by its address on the network and its CA, the broker as the server
    announces it, doorbell-driven (the hourly poll never comes within the test), only the probe image
    allowed, trust pinned."""
    path = work / f"node-{org}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "server_url": server_url,
                "server_ca_file": str(ca),
                "api_key": api_key,
                "data_dir": str(work / f"node-{org}-data"),
                "poll_interval_s": 3600.0,
                "kill_grace_s": 1.0,
                "runtime": {"kind": "docker", "memory_bytes": 256 * 1024 * 1024},
                "policies": {"allowed_images": [PROBE_IMAGE], "unchecked_outputs": "allow"},
                "trust": "pinned",
            }
        )
    )
    return path


@pytest.fixture
def federation(tmp_path: Path, docker_client: docker.DockerClient) -> Iterator[Federation]:
    """The whole deployment, up and trusted, on four machines; everything gone afterwards (checked)."""
    ensure_probe_image()
    services.mosquitto_binary()
    services.postgres_bindir()
    tag = uuid.uuid4().hex[:6]
    names = {org: f"dep{org.lower()}{tag}" for org in ORGS}
    with network() as net:
        try:
            yield from _federation(net, tmp_path, names)
        finally:
            for name in names.values():
                remove_run_containers(name)
    assert net.namespaces() == [], "namespaces left behind"
    for name in names.values():
        left = docker_client.containers.list(all=True, filters={"label": f"vfed.node={name}"})
        assert not left, f"run containers of {name} left behind"


def _tls_init(net: Network, server: Machine, folder: Path) -> Path:
    """`vserver tls init` for the server's address; the CA certificate to hand out."""
    out = _ok(net.run(server, [str(BIN / "vserver"), "tls", "init", "--dir", str(folder),
                               "--hostname", server.address]))  # fmt: skip
    assert f"vfed login --url https://{server.address}:{SERVER_PORT} --ca-file ca.crt" in out, out
    return folder / "ca.crt"


def _federation(net: Network, work: Path, names: dict[str, str]) -> Iterator[Federation]:
    server = net.machine("srv", 1)
    nodes = {"A": net.machine("na", 2), "B": net.machine("nb", 3)}
    researcher = net.machine("res", 4)
    url = f"https://{server.address}:{SERVER_PORT}"
    mqtt_url = f"mqtts://{server.address}:{MQTTS_PORT}"
    rings = {org: _organization_key(work, org) for org in ORGS}
    tls_dir = work / "tls"
    ca = _tls_init(net, server, tls_dir)
    wrong_ca = _tls_init(net, server, work / "other-ca")
    with services.postgres(net, server) as database_url:
        broker_dir = work / "broker"
        config = work / "vserver.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "host": server.address,
                    "port": SERVER_PORT,
                    "data_dir": str(work / "server-data"),
                    "database_url": database_url,
                    "jwt_secret": "three-machines-secret-0123456789",
                    "tls": {
                        "cert_file": str(tls_dir / "server.crt"),
                        "key_file": str(tls_dir / "server.key"),
                    },
                    "mqtt": {
                        "url": mqtt_url,
                        "public_url": mqtt_url,
                        "ca_file": str(ca),
                        "broker_dir": str(broker_dir),
                        "broker_pid_file": str(broker_dir / "mosquitto.pid"),
                        "reconnect_max_s": 1.0,
                    },
                }
            )
        )
        keys = _import(net, server, work, config)
        made = _ok(
            net.run(
                server,
                [str(BIN / "vserver"), "broker", "config", "--config", str(config),
                 "--listen", f"{server.address}:{MQTTS_PORT}",
                 "--cert-file", str(tls_dir / "server.crt"), "--key-file", str(tls_dir / "server.key")],
            )
        )  # fmt: skip
        assert f"url: {mqtt_url}" in made, made
        services.start_mosquitto(
            net, server, broker_dir / "mosquitto.conf", work / "mosquitto.log", port=MQTTS_PORT
        )
        server_log = work / "vserver.log"
        proc = net.start(server, [str(BIN / "vserver"), "start", "--config", str(config)], server_log)
        fed = Federation(net, work, server, researcher, nodes, url, names, {}, server_log, ca, wrong_ca, keys)
        waited = fed.probe(
            researcher, "wait-http", f"{url}/api/v1/health", "--timeout", "60", "--ca-file", str(ca)
        )
        assert waited["ok"], f"{waited}\n{server_log.read_text(errors='replace')[-3000:]}"
        assert proc.poll() is None

        # The researcher at A logs in (the password on stdin, never on a command line) with A's keyring and
        # the server's CA, reads the organizations' ids and pins both organizations' fingerprints (handed
        # over out of band).
        key_a = str(_key_path(work, "A"))
        login = ("login", "--url", url, "--ca-file", str(ca), "--username", "res-A", "--key-file", key_a)
        out = _ok(fed.vfed(*login, input=PASSWORD + "\n"))
        assert "logged in as res-A" in out
        listed = json.loads(_ok(fed.vfed("organizations", "list", "--format", "json")))
        fed.org_ids = {row["name"]: int(row["id"]) for row in listed}
        assert set(fed.org_ids) == set(ORGS)
        for org in ORGS:
            _ok(
                fed.vfed(
                    "trust",
                    "pin",
                    str(fed.org_ids[org]),
                    "--fingerprint",
                    fingerprint(rings[org].keys[0].public),
                )
            )
        # Each node pins the other organization (what `vnode trust ORG --fingerprint F` writes).
        for org in ORGS:
            store = TrustStore(_data_dir(work, org) / "trusted_orgs", TrustMode.PINNED)
            for other in ORGS:
                if other != org:
                    store.pin(fed.org_ids[other], fingerprint(rings[other].keys[0].public), note=other)

        for org in ORGS:
            node_config = _node_config(work, org, names[org], keys[org], url, ca)
            fed.node_logs[org] = work / f"node-{org}.log"
            agent = net.start(
                nodes[org],
                [
                    str(BIN / "vnode"),
                    "run",
                    "--config",
                    str(node_config),
                    "--log-level",
                    "INFO,vfed.node.timeline=DEBUG",
                ],
                fed.node_logs[org],
            )
            fed.agents[org] = agent
        for org in ORGS:
            subscribed = _wait_for_line(
                fed.node_logs[org], r"doorbell subscribed to vfed/nodes/(\d+)", fed.agents[org]
            )
            fed.node_ids[org] = int(subscribed.group(1))
        yield fed
        codes = {org: _stop(agent) for org, agent in fed.agents.items()}
        assert codes == dict.fromkeys(ORGS, 0), fed.logs()
        assert _stop(proc) == 0, fed.logs()


def _data_dir(work: Path, org: str) -> Path:
    return work / f"node-{org}-data"


def _key_path(work: Path, org: str) -> Path:
    return _data_dir(work, org) / "org-key.json"


def _organization_key(work: Path, org: str) -> Keyring:
    """The organization's keyring where its node looks for it (what `vnode keys generate` does)."""
    _data_dir(work, org).mkdir(mode=0o700)
    ring = Keyring.generate()
    ring.save(_key_path(work, org))
    return ring


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return -9


def _claims_and_rings(log: Path) -> tuple[set[int], set[int]]:
    """Run ids the agent claimed, and those whose start timeline begins with a doorbell ring."""
    text = log.read_text(errors="replace")
    claimed = {int(n) for n in re.findall(r"run (\d+): claimed \(task", text)}
    rung = {int(n) for n in re.findall(r"run (\d+) start marks: ring=", text)}
    return claimed, rung


def _mqtt_probe(fed: Federation, machine: Machine, *args: str) -> list[str]:
    """The probe's `mqtt` command against the server's TLS broker, checked with the right CA."""
    return [sys.executable, PROBE, "mqtt", fed.server.address, str(MQTTS_PORT), "--tls", "--ca-file",
            str(fed.ca), *args]  # fmt: skip


def _node_a_listens(fed: Federation) -> tuple[subprocess.Popen[bytes], Path]:
    """On A's machine, with A's own broker account (what A's agent got at login): subscribe to A's and B's
    doorbell topics, try to publish on both and elsewhere, then listen until stopped."""
    password = fed.work / "node-A-broker.password"
    password.write_text(node_password(fed.api_keys["A"]))
    password.chmod(0o600)
    a, b = fed.node_ids["A"], fed.node_ids["B"]
    log = fed.work / "probe-node-A.log"
    proc = fed.net.start(
        fed.nodes["A"],
        _mqtt_probe(
            fed, fed.nodes["A"],
            "--username", node_username(a), "--password-file", str(password),
            "--subscribe", f"vfed/nodes/{a}", "--subscribe", f"vfed/nodes/{b}",
            "--publish", f"vfed/nodes/{b}", "--publish", f"vfed/nodes/{a}", "--publish", "vfed/other",
            "--listen", "150",
        ),
        log,
    )  # fmt: skip
    _wait_for_line(log, "READY", proc, timeout_s=30)
    return proc, log


def _probe_result(proc: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text(errors="replace")
    last = log.read_text(errors="replace").strip().splitlines()[-1]
    found: dict[str, Any] = json.loads(last)
    return found


def test_three_machines(federation: Federation) -> None:
    fed = federation
    a, b = fed.org_ids["A"], fed.org_ids["B"]
    node_a, node_b = fed.node_ids["A"], fed.node_ids["B"]
    listener, listener_log = _node_a_listens(fed)
    created = json.loads(
        _ok(
            fed.vfed(
                "task", "create", "--collaboration", str(fed.collaboration), "--image", PROBE_IMAGE,
                "--method", "master", "--args", "[2, 3]", "--org", str(a), "--format", "json",
            )
        )
    )  # fmt: skip
    task_id = created["id"]
    waited = fed.vfed("task", "wait", str(task_id), "--timeout", "90", timeout_s=120)
    assert waited.returncode == 0, waited.stdout + waited.stderr + fed.logs()
    assert waited.stdout.strip() == f"task {task_id} completed"
    [aggregate] = json.loads(_ok(fed.vfed("task", "results", str(task_id), "--format", "json")))
    assert aggregate["by_org"] == {str(a): 5 * a, str(b): 5 * b}
    assert aggregate["total"] == 5 * (a + b)

    # Doorbell, not polling: A ran the master and its share of the subtask, B its share; every one of these
    # runs was claimed because a ring named it (the agents poll hourly, after their first look at start).
    claimed_a, rung_a = _claims_and_rings(fed.node_logs["A"])
    claimed_b, rung_b = _claims_and_rings(fed.node_logs["B"])
    assert len(claimed_a) == 2 and len(claimed_b) == 1, fed.logs()
    assert claimed_a <= rung_a and claimed_b <= rung_b, fed.logs()

    # Node A's broker account: its own topic delivers (the two rings its agent also got), B's topic delivers
    # nothing although B was rung meanwhile (Mosquitto grants the SUBACK and its ACL drops every message),
    # and every publish is refused.
    seen = _probe_result(listener, listener_log)
    assert seen["connack"] == 0, seen
    assert seen["received"].get(f"vfed/nodes/{node_a}", 0) >= 2, seen
    assert seen["received"].get(f"vfed/nodes/{node_b}", 0) == 0, seen
    assert seen["publish"] == dict.fromkeys(
        (f"vfed/nodes/{node_b}", f"vfed/nodes/{node_a}", "vfed/other"), NOT_AUTHORIZED
    ), seen

    # An anonymous broker client, and a client with a made-up account, are refused at CONNECT.
    anonymous = fed.net.run(fed.researcher, _mqtt_probe(fed, fed.researcher), timeout_s=60)
    assert anonymous.returncode == 0, anonymous.stderr
    refused = json.loads(anonymous.stdout)
    assert refused["connack"] is not None and refused["connack"] >= 0x80, refused

    # Plain HTTP to the server gets no HTTP answer (the port speaks TLS only), and the server is not on the
    # researcher's loopback: only at its network address.
    plain = fed.probe(fed.researcher, "plain-http", fed.server.address, str(SERVER_PORT))
    assert not (plain["status_line"] or "").startswith("HTTP/"), plain
    local = fed.probe(fed.researcher, "plain-http", "127.0.0.1", str(SERVER_PORT))
    assert local["status_line"] is None and "ConnectionRefused" in local["error"], local

    # A researcher given the wrong CA: refused before any password is sent, with a one-line reason.
    wrong = fed.vfed(
        "login", "--url", fed.url, "--ca-file", str(fed.wrong_ca), "--username", "res-A",
        input=PASSWORD + "\n",
    )  # fmt: skip
    assert wrong.returncode != 0, wrong.stdout
    assert "Traceback" not in wrong.stderr, wrong.stderr
    assert "certificate" in wrong.stderr.lower() and str(fed.wrong_ca) in wrong.stderr, wrong.stderr
    # The researcher's saved login (with the right CA) is untouched by the refused one.
    assert json.loads(_ok(fed.vfed("organizations", "list", "--format", "json")))
