"""Shared pieces of the vnode operator tests: isolated config folders, the CLI, a real `vserver` subprocess.

Imported by the test modules: they re-export the fixtures with `from vnode_testlib import` (conftest.py here
only moves the researcher client's files into each test's folder).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
import requests
import yaml
from click.testing import CliRunner, Result
from tests import infra

from vfed.node.cli import main

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
VNODE = str(BIN / "vnode")
VSERVER = str(BIN / "vserver")
PASSWORD = "correct-horse-battery"


@dataclass(frozen=True)
class Dirs:
    """Where the two scopes live for one test."""

    user_config: Path
    user_data: Path
    system_config: Path
    system_data: Path

    def env(self) -> dict[str, str]:
        return {
            "XDG_CONFIG_HOME": str(self.user_config),
            "XDG_DATA_HOME": str(self.user_data),
            "VFED_SYSTEM_CONFIG_DIR": str(self.system_config),
            "VFED_SYSTEM_DATA_DIR": str(self.system_data),
        }


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Dirs:
    """Both scopes moved under tmp_path, for this process and for the subprocesses it starts."""
    found = Dirs(
        tmp_path / "xdg-config", tmp_path / "xdg-data", tmp_path / "etc-vfed", tmp_path / "var-lib-vfed"
    )
    for key, value in found.env().items():
        monkeypatch.setenv(key, value)
    return found


def vnode(*args: str, input: str | None = None) -> Result:
    """Run `vnode ARGS` in-process (not a terminal: no questions are asked unless input is given)."""
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def vnode_proc(*args: str, timeout_s: float = 180.0) -> subprocess.CompletedProcess[str]:
    """Run the installed `vnode` entry point as a child process."""
    return subprocess.run([VNODE, *args], capture_output=True, text=True, timeout=timeout_s, check=False)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def new_node(name: str, api_key: str = "1.secret", *extra: str) -> Result:
    result = vnode("new", name, "--server-url", "http://127.0.0.1:9", "--api-key", api_key, *extra)
    assert result.exit_code == 0, result.output
    return result


def remove_node_objects(client: docker.DockerClient, name: str) -> None:
    """Remove every container and volume a test node may have left (agent, runs, job volumes)."""
    for c in client.containers.list(all=True, ignore_removed=True):
        labels = c.labels or {}
        if (
            c.name in (f"vfed-{name}-user", f"vfed-{name}-system")
            or labels.get("vfed.node") == name
            or labels.get("vfed.agent.node") == name
        ):
            with contextlib.suppress(docker.errors.NotFound):
                c.remove(force=True)
    for v in client.volumes.list():
        if (v.name or "").startswith(f"vfed-{name}-"):
            with contextlib.suppress(docker.errors.APIError):
                v.remove(force=True)


@dataclass
class VServer:
    """`vserver start` as a child process on a free loopback port, seeded with `vserver import`."""

    data_dir: Path
    mqtt_url: str | None
    port: int = field(default_factory=infra.free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config(self) -> Path:
        path = self.data_dir / "vserver.yaml"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            doc: dict[str, Any] = {"mqtt": {"url": self.mqtt_url}} if self.mqtt_url else {}
            path.write_text(yaml.safe_dump(doc))
        return path

    def import_world(self, orgs: list[str], collaboration: str = "collab") -> dict[str, str]:
        """Organizations, a collaboration, a researcher and a node per organization; node API keys by org."""
        spec = {
            "organizations": [{"name": o} for o in orgs],
            "collaborations": [{"name": collaboration, "organizations": orgs}],
            "users": [{"username": f"res-{o}", "password": PASSWORD, "organization": o} for o in orgs],
            "nodes": [{"name": f"node-{o}", "organization": o, "collaboration": collaboration} for o in orgs],
        }
        path = self.data_dir / "import.yaml"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(spec))
        out = subprocess.run(
            [VSERVER, "import", str(path), "--data-dir", str(self.data_dir), "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        keys = dict(re.findall(r"node node-(\S+): created; API key \(shown once\): (\S+)", out.stdout))
        assert set(keys) == set(orgs), out.stdout
        return keys

    def start(self, timeout_s: float = 60.0) -> None:
        log = (self.data_dir / "vserver.log").open("ab")
        cmd = [
            VSERVER,
            "start",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--config",
            str(self.config),
        ]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vserver exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            try:
                if requests.get(self.url + "/api/v1/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise AssertionError(f"vserver did not answer within {timeout_s} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        path = self.data_dir / "vserver.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def vserver(tmp_path: Path, mqtt_broker: infra.Broker) -> Iterator[VServer]:
    """A real server process (SQLite, the session's Mosquitto as doorbell broker); not started yet."""
    server = VServer(tmp_path / "server", mqtt_broker.url)
    yield server
    server.stop()
