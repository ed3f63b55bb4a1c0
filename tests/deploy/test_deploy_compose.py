"""The deployment artifacts in docker/: the compose files validated by `docker-compose config` (Debian's
docker-compose, v1), and the server stack brought up on the local engine from the offline-built images
(vfed/postgres, vfed/mosquitto, vfed/server, vfed/node) the way docs/deployment.md says: a certificate from
`vserver tls init`, Mosquitto configured by `vserver broker config` (TLS, password and ACL files, no anonymous
clients), the server on HTTPS and PostgreSQL. A node agent from the node's compose file runs the
summary-statistics example for a researcher, woken by its doorbell, and `down` leaves no container, network or
volume behind."""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests import infra

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"
NODE_COMPOSE = ROOT / "docker" / "node.compose.yaml"
OFFLINE_IMAGES = {
    "VFED_POSTGRES_IMAGE": "vfed/postgres",
    "VFED_MOSQUITTO_IMAGE": "vfed/mosquitto",
    "VFED_SERVER_IMAGE": "vfed/server",
    "VFED_NODE_IMAGE": "vfed/node",
}
EXAMPLE = "vfed-examples/summary_stats:latest"
PASSWORD = "compose-researcher-pw"
SERVER_UID = 10001  # the vfed user of vfed/base, which reads the mounted server configuration


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        infra.missing("docker-compose", "not installed (`make infra` installs Debian's docker-compose)")
        raise AssertionError("unreachable")
    return found


@dataclass
class Stack:
    """One compose project: its name, its files and the variables its files read."""

    project: str
    files: list[Path]
    env: dict[str, str]

    def run(
        self, *args: str, timeout_s: float = 120, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [docker_compose(), "--no-ansi", "-p", self.project]
        for file in self.files:
            cmd += ["-f", str(file)]
        return subprocess.run(
            [*cmd, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            timeout=timeout_s,
            check=False,
        )

    def ok(self, *args: str, timeout_s: float = 120, stdin: str | None = None) -> str:
        done = self.run(*args, timeout_s=timeout_s, stdin=stdin)
        assert done.returncode == 0, f"docker-compose {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout


def _own(path: Path) -> None:
    """The server image's vfed user (and Mosquitto, run as the same uid) reads what compose mounts."""
    if os.geteuid() == 0:
        os.chown(path, SERVER_UID, SERVER_UID)


def write_deploy_dir(folder: Path, db_password: str, public_mqtt: str = "mqtts://mosquitto:8883") -> Path:
    """The folder compose.yaml mounts: server.yaml, the database password, tls/ and broker/ (both empty)."""
    for sub in ("secrets", "broker", "tls"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        _own(folder / sub)
    secret = folder / "secrets" / "postgres_password"
    secret.write_text(db_password)
    server_yaml = folder / "server.yaml"
    server_yaml.write_text(
        yaml.safe_dump(
            {
                "database_url": "postgresql+asyncpg://vfed@postgres:5432/vfed",
                "database_password_file": "/run/secrets/postgres_password",
                "tls": {"cert_file": "/etc/vfed/tls/server.crt", "key_file": "/etc/vfed/tls/server.key"},
                "mqtt": {
                    "url": "mqtts://mosquitto:8883",
                    "ca_file": "/etc/vfed/tls/ca.crt",
                    "broker_dir": "/etc/vfed/broker",
                    "broker_pid_file": "/etc/vfed/broker/mosquitto.pid",
                    "public_url": public_mqtt,
                },
            }
        )
    )
    for path in (secret, server_yaml):
        path.chmod(0o600)
        _own(path)
    return folder


def compose_env(deploy: Path, **extra: str) -> dict[str, str]:
    return {"VFED_DEPLOY_DIR": str(deploy), **extra}


def _mount(volume: str | dict[str, Any]) -> tuple[str, str]:
    """(source, target) of a service's volume, in the short or the long syntax docker-compose answers."""
    if isinstance(volume, str):
        source, target = volume.split(":")[:2]
        return source, target
    return str(volume["source"]), str(volume["target"])


# --- docker-compose config ----------------------------------------------------------------------------------


def test_compose_files_validate_with_docker_compose(tmp_path: Path) -> None:
    deploy = write_deploy_dir(tmp_path / "deploy", "pw-" + secrets.token_hex(8))
    node_env = {
        "VFED_NODE_CONFIG": str(tmp_path / "node.yaml"),
        "VFED_NODE_DATA": str(tmp_path / "node-data"),
        "VFED_NODE_DATASETS": str(tmp_path / "datasets"),
    }
    # The defaults: the official images, every service restarted, healthy before the server starts.
    server = Stack("vfedcfg", [COMPOSE], compose_env(deploy))
    config = yaml.safe_load(server.ok("config"))
    services = config["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:")
    assert services["server"]["image"] == "vfed/server"
    assert {s["restart"] for s in services.values()} == {"unless-stopped"}
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["mosquitto"]
    assert services["server"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert set(config["volumes"]) == {"postgres-data", "mosquitto-data", "server-data"}
    # Mosquitto reads `vserver broker config`'s files at the paths the server wrote into mosquitto.conf, as
    # the server's uid (the files are 0600), in the server's pid namespace (so its SIGHUP reaches Mosquitto).
    mosquitto = services["mosquitto"]
    assert mosquitto["command"] == ["mosquitto", "-c", "/etc/vfed/broker/mosquitto.conf"]
    assert mosquitto["user"] == f"{SERVER_UID}:{SERVER_UID}"
    assert mosquitto["pid"] == "service:server"
    for name in ("server", "mosquitto"):
        targets = {_mount(v)[1]: _mount(v)[0] for v in services[name]["volumes"]}
        assert targets["/etc/vfed/broker"] == str(deploy / "broker")
        assert targets["/etc/vfed/tls"] == str(deploy / "tls")
    # The password reaches PostgreSQL as a mounted file, never as an environment value.
    assert "POSTGRES_PASSWORD" not in services["postgres"]["environment"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert config["secrets"]["postgres_password"]["file"] == str(deploy / "secrets" / "postgres_password")

    # Image names are variables: the offline-built images.
    offline = Stack("vfedcfg", [COMPOSE, NODE_COMPOSE], compose_env(deploy, **OFFLINE_IMAGES, **node_env))
    services = yaml.safe_load(offline.ok("config"))["services"]
    assert {name: s["image"] for name, s in services.items()} == {
        "postgres": "vfed/postgres",
        "mosquitto": "vfed/mosquitto",
        "server": "vfed/server",
        "node": "vfed/node",
    }
    # The node's data folder is mounted at the same path inside (its algorithm containers are siblings).
    mounts = dict(_mount(v) for v in services["node"]["volumes"])
    assert mounts[node_env["VFED_NODE_DATA"]] == node_env["VFED_NODE_DATA"]

    # The node file refuses to start without its configuration, saying which variable is missing.
    env_without = {k: v for k, v in os.environ.items() if not k.startswith("VFED_NODE_")}
    done = subprocess.run(
        [docker_compose(), "-p", "vfedcfg", "-f", str(NODE_COMPOSE), "config"],
        capture_output=True, text=True, env=env_without, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "VFED_NODE_CONFIG" in done.stderr


# --- the stack on the local engine --------------------------------------------------------------------------


def _require_images(client: Any, names: list[str]) -> None:
    import docker.errors

    for name in names:
        try:
            client.images.get(name)
        except docker.errors.ImageNotFound:
            infra.missing("docker", f"image {name} is missing (run: make images)")


def _leftovers(client: Any, project: str) -> dict[str, list[str]]:
    label = {"label": f"com.docker.compose.project={project}"}
    return {
        "containers": [c.name for c in client.containers.list(all=True, filters=label)],
        "networks": [n.name for n in client.networks.list(filters=label)],
        "volumes": [v.name for v in client.volumes.list(filters=label)],
    }


def _wait_healthy(client: Any, project: str, service: str, timeout_s: float = 240) -> None:
    """Until the service's container reports `healthy` (its healthcheck, from the compose file or image)."""
    deadline = time.monotonic() + timeout_s
    filters = {"label": [f"com.docker.compose.project={project}", f"com.docker.compose.service={service}"]}
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        found = client.containers.list(all=True, filters=filters)
        if found:
            found[0].reload()
            state = found[0].attrs["State"]
            if state.get("Health", {}).get("Status") == "healthy":
                return
            if state.get("Status") == "exited" or found[0].attrs.get("RestartCount", 0) >= 2:
                break  # it failed: no use waiting for it
        time.sleep(1)
    logs = found[0].logs(tail=40).decode(errors="replace") if found else "(no container)"
    raise AssertionError(f"{service} not healthy within {timeout_s} s: {state}\n{logs}")


def _volumes_in_use(client: Any, project: str) -> set[str]:
    """Every volume the project's containers mount, named or anonymous (an image's VOLUME), by name."""
    label = {"label": f"com.docker.compose.project={project}"}
    return {
        m["Name"]
        for c in client.containers.list(all=True, filters=label)
        for m in c.attrs.get("Mounts", [])
        if m.get("Type") == "volume"
    }


def _tls_init(deploy: Path, ca_dir: Path) -> None:
    """`vserver tls init` from the server image (as its vfed user) into a folder of its own, then the
    certificate, its key and the CA certificate into deploy/tls; the CA's key stays out of the mounts."""
    ca_dir.mkdir()
    _own(ca_dir)
    names = ["server", "mosquitto", "localhost", "127.0.0.1"]
    done = subprocess.run(
        ["docker", "run", "--rm", "-u", f"{SERVER_UID}:{SERVER_UID}", "-v", f"{ca_dir}:/ca",
         OFFLINE_IMAGES["VFED_SERVER_IMAGE"], "tls", "init", "--dir", "/ca", "--data-dir", "/tmp/vfed",
         *[a for n in names for a in ("--hostname", n)]],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "CA fingerprint (SHA-256)" in done.stdout, done.stdout
    for name in ("ca.crt", "server.crt", "server.key"):
        shutil.copy2(ca_dir / name, deploy / "tls" / name)
        _own(deploy / "tls" / name)
    assert (deploy / "tls" / "server.key").stat().st_mode & 0o077 == 0


@pytest.fixture
def stack(tmp_path: Path, docker_client: Any) -> Iterator[Stack]:
    """The server stack and a node, from the offline-built images; torn down with `down -v`, checked empty."""
    docker_compose()
    _require_images(docker_client, [*OFFLINE_IMAGES.values(), EXAMPLE])
    project = "vfedsmoke" + secrets.token_hex(4)
    node_name = f"compose{secrets.token_hex(3)}"
    deploy = write_deploy_dir(tmp_path / "deploy", "pw-" + secrets.token_hex(12))
    env = compose_env(
        deploy,
        **OFFLINE_IMAGES,
        VFED_BIND_ADDRESS="127.0.0.1",
        VFED_HTTP_PORT=str(infra.free_port()),
        VFED_MQTT_PORT=str(infra.free_port()),
        VFED_NODE_CONFIG=str(tmp_path / "node.yaml"),
        VFED_NODE_DATA=str(tmp_path / "node-data"),
        VFED_NODE_DATASETS=str(tmp_path / "datasets"),
        VFED_TEST_NODE_NAME=node_name,
        VFED_TEST_CA_DIR=str(tmp_path / "ca"),
    )
    up = Stack(project, [COMPOSE, NODE_COMPOSE], env)
    volumes: set[str] = set()
    try:
        yield up
    finally:
        volumes = _volumes_in_use(docker_client, project)
        down = up.run("down", "--volumes", "--remove-orphans", "--timeout", "10", timeout_s=180)
        for container in docker_client.containers.list(all=True, filters={"label": f"vfed.node={node_name}"}):
            with suppress(Exception):
                container.remove(force=True)
        assert down.returncode == 0, down.stderr
        assert _leftovers(docker_client, project) == {"containers": [], "networks": [], "volumes": []}
        left = {v.name for v in docker_client.volumes.list()} & volumes
        assert not left, f"volumes left behind: {left}"


@pytest.mark.docker
@pytest.mark.mqtt
@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compose_stack_runs_a_federated_task(stack: Stack, tmp_path: Path, docker_client: Any) -> None:
    import pandas as pd

    from vfed.client.client import Client

    env = stack.env
    deploy = Path(env["VFED_DEPLOY_DIR"])
    url = f"https://127.0.0.1:{env['VFED_HTTP_PORT']}"
    ca_file = deploy / "tls" / "ca.crt"
    _tls_init(deploy, Path(env["VFED_TEST_CA_DIR"]))

    # The database first: `vserver broker config` reads the nodes from it and writes the broker's files.
    stack.ok("up", "-d", "postgres", timeout_s=300)
    _wait_healthy(docker_client, stack.project, "postgres")
    out = stack.ok(
        "run", "--rm", "--no-deps", "server", "broker", "config",
        "--config", "/etc/vfed/server.yaml", "--data-dir", "/home/vfed/data", "--dir", "/etc/vfed/broker",
        "--listen", "0.0.0.0:8883", "--cert-file", "/etc/vfed/tls/server.crt",
        "--key-file", "/etc/vfed/tls/server.key",
        timeout_s=180,
    )  # fmt: skip
    assert "wrote /etc/vfed/broker/mosquitto.conf" in out, out
    conf = (deploy / "broker" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "certfile /etc/vfed/tls/server.crt" in conf

    stack.ok("up", "-d", "server", "mosquitto", timeout_s=300)
    _wait_healthy(docker_client, stack.project, "server")  # the image's HEALTHCHECK, here over HTTPS
    _wait_healthy(docker_client, stack.project, "mosquitto")
    context = ssl.create_default_context(cafile=str(ca_file))
    with urllib.request.urlopen(f"{url}/api/v1/health", timeout=10, context=context) as answer:
        assert answer.status == 200
    # Plain HTTP on the published port is not served (the server speaks TLS only).
    plain = url.replace("https://", "http://") + "/api/v1/health"
    with pytest.raises((OSError, http.client.HTTPException)):
        urllib.request.urlopen(plain, timeout=10).close()
    # The broker admits no anonymous client.
    assert _anonymous_mqtt_refused(int(env["VFED_MQTT_PORT"]), ca_file)

    # `vserver import` inside the server's container, on its PostgreSQL database; the file comes on stdin.
    federation = {
        "organizations": [{"name": "clinic"}],
        "collaborations": [{"name": "compose", "organizations": ["clinic"]}],
        "users": [{"username": "researcher", "password": PASSWORD, "organization": "clinic"}],
        "nodes": [{"name": "node-clinic", "organization": "clinic", "collaboration": "compose"}],
    }
    out = stack.ok(
        "exec", "-T", "server", "vserver", "import", "/dev/stdin",
        "--config", "/etc/vfed/server.yaml", "--data-dir", "/home/vfed/data",
        stdin=yaml.safe_dump(federation),
    )  # fmt: skip
    found = re.search(r"node node-clinic: created; API key \(shown once\): (\S+)", out)
    assert found, out
    # The tables live in the compose PostgreSQL, not in a SQLite file in the server's volume.
    tables = stack.ok(
        "exec", "-T", "postgres", "psql", "-U", "vfed", "-d", "vfed", "-tAc", "select name from organizations"
    )  # fmt: skip
    assert tables.split() == ["clinic"]

    # The node agent from node.compose.yaml: its data folder and datasets at the same paths as on the host;
    # it reaches the server over HTTPS (the CA's certificate in its data folder) and is told the broker.
    data = Path(env["VFED_NODE_DATA"])
    data.mkdir(mode=0o700)
    shutil.copy2(ca_file, data / "ca.crt")
    datasets = Path(env["VFED_NODE_DATASETS"])
    datasets.mkdir()
    table = pd.DataFrame(
        {"age": [30.0 + (i * 7) % 41 for i in range(60)], "bmi": [20 + i % 9 for i in range(60)]}
    )
    table.to_csv(datasets / "clinic.csv", index=False)
    node_yaml = Path(env["VFED_NODE_CONFIG"])
    node_yaml.write_text(
        yaml.safe_dump(
            {
                "name": env["VFED_TEST_NODE_NAME"],
                "server_url": "https://server:7600",
                "server_ca_file": str(data / "ca.crt"),
                "api_key": found.group(1),
                "data_dir": str(data),
                "poll_interval_s": 3600.0,  # the doorbell, not the poll, must bring the task
                "datasets": {"default": {"uri": str(datasets / "clinic.csv"), "type": "csv"}},
                "policies": {"allowed_images": ["vfed-examples/*"]},
                "runtime": {"kind": "docker", "memory_bytes": 512 * 1024 * 1024},
            }
        )
    )
    node_yaml.chmod(0o600)
    stack.ok("up", "-d", "node", timeout_s=180)

    def node_logs() -> str:
        return stack.run("logs", "--no-color", "--tail", "200", "node").stdout

    key_file = data / "org-key.json"
    deadline = time.monotonic() + 120
    while not key_file.exists():  # the agent made its organization key and published it
        assert time.monotonic() < deadline, node_logs()
        time.sleep(0.5)
    # Its own broker account reached Mosquitto (the server rewrote passwd/acl and sent SIGHUP): subscribed.
    deadline = time.monotonic() + 120
    while "doorbell subscribed to vfed/nodes/" not in node_logs():
        assert time.monotonic() < deadline, node_logs()
        time.sleep(1)
    assert "Mosquitto not reloaded" not in stack.run("logs", "--no-color", "server").stdout
    passwd = (deploy / "broker" / "passwd").read_text()
    assert re.search(r"^node-\d+:\$7\$", passwd, re.M), "the node's broker account is missing"

    client = Client(url, key_file=key_file, ca_file=ca_file)
    try:
        client.login("researcher", PASSWORD)
        [collaboration] = client.collaborations()
        me = client.organization_id
        assert me is not None
        deadline = time.monotonic() + 120
        while not all(o.get("public_key") for o in client.organizations()):
            assert time.monotonic() < deadline, node_logs()
            time.sleep(0.5)
        task = client.create_task(
            collaboration["id"], EXAMPLE, "summary", kwargs={"bins": 4}, organizations=[me]
        )
        done = client.wait(task, 300, False)
        assert done["status"] == "completed", (done, node_logs())
        [result] = client.results(task)
    finally:
        client.close()
    for column in ("age", "bmi"):
        stats = result["columns"][column]
        assert stats["count"] == len(table)
        assert abs(stats["mean"] - table[column].mean()) < 1e-9
        assert abs(stats["variance"] - table[column].var(ddof=1)) < 1e-6
    assert json.dumps(result)  # plain JSON, decrypted at the researcher


def _anonymous_mqtt_refused(port: int, ca_file: Path) -> bool:
    """An MQTT client without credentials, over TLS to the published broker port: refused at CONNECT."""
    import asyncio

    import aiomqtt

    async def attempt() -> bool:
        tls = ssl.create_default_context(cafile=str(ca_file))
        try:
            async with aiomqtt.Client("127.0.0.1", port, tls_context=tls, timeout=10):
                return False
        except aiomqtt.MqttError as exc:
            return "not authori" in str(exc).lower() or "bad user name or password" in str(exc).lower()

    return asyncio.run(attempt())
