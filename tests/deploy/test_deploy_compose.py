"""The deployment artifacts in docker/: the compose files validated by `docker-compose config` (Debian's
docker-compose, v1), and the server stack brought up on the local engine from the offline-built images
(vfed/postgres, vfed/mosquitto, vfed/server, vfed/node): a node agent from the node's compose file runs the
summary-statistics example for a researcher, and `down` leaves no container, network or volume behind."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
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


def write_deploy_dir(folder: Path, db_password: str, mqtt_port: int) -> Path:
    """The folder compose.yaml mounts: server.yaml, the database password, the broker's files, tls/."""
    for sub in ("secrets", "broker", "tls"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    secret = folder / "secrets" / "postgres_password"
    secret.write_text(db_password)
    server_yaml = folder / "server.yaml"
    server_yaml.write_text(
        yaml.safe_dump(
            {
                "database_url": f"postgresql+asyncpg://vfed:{db_password}@postgres:5432/vfed",
                "mqtt": {"url": f"mqtt://mosquitto:{mqtt_port}"},
            }
        )
    )
    (folder / "broker" / "mosquitto.conf").write_text(
        f"listener {mqtt_port}\nallow_anonymous true\n"
        "persistence true\npersistence_location /mosquitto/data/\n"
    )
    for path in (secret, server_yaml):
        path.chmod(0o600)
        if os.geteuid() == 0:  # the server runs as the image's vfed user
            os.chown(path, SERVER_UID, SERVER_UID)
    return folder


def compose_env(deploy: Path, **extra: str) -> dict[str, str]:
    return {"VFED_DEPLOY_DIR": str(deploy), **extra}


# --- docker-compose config ----------------------------------------------------------------------------------


def test_compose_files_validate_with_docker_compose(tmp_path: Path) -> None:
    deploy = write_deploy_dir(tmp_path / "deploy", "pw-" + secrets.token_hex(8), 1883)
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
    assert services["server"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "mosquitto": {"condition": "service_healthy"},
    }
    assert set(config["volumes"]) == {"postgres-data", "mosquitto-data", "server-data"}
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
    mounts = {v.split(":")[0]: v.split(":")[1] for v in services["node"]["volumes"] if isinstance(v, str)}
    if not mounts:  # docker-compose may answer the long syntax
        mounts = {v["source"]: v["target"] for v in services["node"]["volumes"]}
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


@pytest.fixture
def stack(tmp_path: Path, docker_client: Any) -> Iterator[Stack]:
    """The server stack and a node, from the offline-built images; torn down with `down -v`, checked empty."""
    docker_compose()
    _require_images(docker_client, [*OFFLINE_IMAGES.values(), EXAMPLE])
    project = "vfedsmoke" + secrets.token_hex(4)
    node_name = f"compose{secrets.token_hex(3)}"
    deploy = write_deploy_dir(tmp_path / "deploy", "pw-" + secrets.token_hex(12), 1883)
    env = compose_env(
        deploy,
        **OFFLINE_IMAGES,
        VFED_BIND_ADDRESS="127.0.0.1",
        VFED_HTTP_PORT=str(infra.free_port()),
        VFED_MQTT_PORT=str(infra.free_port()),
        VFED_MQTT_LISTENER_PORT="1883",
        VFED_NODE_CONFIG=str(tmp_path / "node.yaml"),
        VFED_NODE_DATA=str(tmp_path / "node-data"),
        VFED_NODE_DATASETS=str(tmp_path / "datasets"),
        VFED_TEST_NODE_NAME=node_name,
    )
    up = Stack(project, [COMPOSE, NODE_COMPOSE], env)
    try:
        yield up
    finally:
        down = up.run("down", "--volumes", "--remove-orphans", "--timeout", "10", timeout_s=180)
        for container in docker_client.containers.list(all=True, filters={"label": f"vfed.node={node_name}"}):
            with suppress(Exception):
                container.remove(force=True)
        assert down.returncode == 0, down.stderr
        assert _leftovers(docker_client, project) == {"containers": [], "networks": [], "volumes": []}


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compose_stack_runs_a_federated_task(stack: Stack, tmp_path: Path, docker_client: Any) -> None:
    import pandas as pd

    from vfed.client.client import Client

    env = stack.env
    url = f"http://127.0.0.1:{env['VFED_HTTP_PORT']}"
    stack.ok("up", "-d", "postgres", "mosquitto", "server", timeout_s=300)
    _wait_healthy(docker_client, stack.project, "postgres")
    _wait_healthy(docker_client, stack.project, "mosquitto")
    _wait_healthy(docker_client, stack.project, "server")  # the image's HEALTHCHECK
    with urllib.request.urlopen(f"{url}/api/v1/health", timeout=10) as answer:
        assert answer.status == 200

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

    # The node agent from node.compose.yaml: its data folder and datasets at the same paths as on the host.
    data = Path(env["VFED_NODE_DATA"])
    data.mkdir(mode=0o700)
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
                "server_url": "http://server:7600",
                "api_key": found.group(1),
                "data_dir": str(data),
                "mqtt_url": "mqtt://mosquitto:1883",
                "poll_interval_s": 2.0,
                "datasets": {"default": {"uri": str(datasets / "clinic.csv"), "type": "csv"}},
                "policies": {"allowed_images": ["vfed-examples/*"]},
                "runtime": {"kind": "docker", "memory_bytes": 512 * 1024 * 1024},
            }
        )
    )
    node_yaml.chmod(0o600)
    stack.ok("up", "-d", "node", timeout_s=180)
    key_file = data / "org-key.json"
    deadline = time.monotonic() + 120
    while not key_file.exists():  # the agent made its organization key and published it
        assert time.monotonic() < deadline, stack.run("logs", "--tail", "40", "node").stdout
        time.sleep(0.5)

    client = Client(url, key_file=key_file)
    try:
        client.login("researcher", PASSWORD)
        [collaboration] = client.collaborations()
        me = client.organization_id
        assert me is not None
        deadline = time.monotonic() + 120
        while not all(o.get("public_key") for o in client.organizations()):
            assert time.monotonic() < deadline, stack.run("logs", "--tail", "40", "node").stdout
            time.sleep(0.5)
        task = client.create_task(
            collaboration["id"], EXAMPLE, "summary", kwargs={"bins": 4}, organizations=[me]
        )
        done = client.wait(task, 300, False)
        assert done["status"] == "completed", (done, stack.run("logs", "--tail", "60", "node").stdout)
        [result] = client.results(task)
    finally:
        client.close()
    for column in ("age", "bmi"):
        stats = result["columns"][column]
        assert stats["count"] == len(table)
        assert abs(stats["mean"] - table[column].mean()) < 1e-9
        assert abs(stats["variance"] - table[column].var(ddof=1)) < 1e-6
    assert json.dumps(result)  # plain JSON, decrypted at the researcher
