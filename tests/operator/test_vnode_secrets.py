"""`vnode start` hands the dockerized agent its key passphrase as a read-only file, never as an environment
variable: `docker inspect` of the agent container shows no passphrase at all, and the agent still opens its
passphrase-protected key and comes online. On a real Docker engine and a real `vserver` process."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import yaml
from vnode_testlib import ROOT, Dirs, VServer, dirs, remove_node_objects, unique, vnode, vserver

from vfed.node.config import load_settings
from vfed.node.operator.container import PASSPHRASE_IN_CONTAINER

__all__ = ["dirs", "vserver"]

PASSPHRASE = "a passphrase nobody may inspect"
VARIABLE = "VFED_TEST_SECRET_PASS"


@pytest.fixture
def node_name(docker_client: docker.DockerClient) -> Iterator[str]:
    name = unique("sec")
    yield name
    remove_node_objects(docker_client, name)


def _ok(*args: str) -> str:
    result = vnode(*args)
    assert result.exit_code == 0, f"vnode {' '.join(args)} -> {result.exit_code}\n{result.output}"
    return result.output


@pytest.mark.docker
@pytest.mark.mqtt
@pytest.mark.slow
def test_the_passphrase_is_a_mounted_file_not_in_docker_inspect(
    dirs: Dirs,
    node_name: str,
    vserver: VServer,
    docker_client: docker.DockerClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = vserver.import_world(["X"])
    vserver.start()
    _ok("new", node_name, "--server-url", vserver.url, "--api-key", keys["X"], "--no-generate-key")
    monkeypatch.setenv(VARIABLE, PASSPHRASE)
    _ok("keys", "generate", node_name, "--passphrase-env", VARIABLE)

    # Without the variable there is nothing to hand over: one clear line, no container.
    monkeypatch.delenv(VARIABLE)
    refused = vnode("start", node_name, "--develop", str(ROOT))
    assert refused.exit_code == 1
    assert f"the key file needs a passphrase: set the environment variable {VARIABLE}" in refused.output
    assert not docker_client.containers.list(all=True, filters={"name": f"vfed-{node_name}-user"})

    monkeypatch.setenv(VARIABLE, PASSPHRASE)
    assert f"node {node_name} (user) is online" in _ok("start", node_name, "--develop", str(ROOT))
    container = docker_client.containers.get(f"vfed-{node_name}-user")
    inspected = docker_client.api.inspect_container(container.id)
    env = inspected["Config"]["Env"] or []
    assert not [e for e in env if PASSPHRASE in e or e.startswith(VARIABLE + "=")], env
    assert PASSPHRASE not in json.dumps(inspected)  # nowhere in what `docker inspect` shows

    assert inspected["HostConfig"]["UsernsMode"] == "host"  # the agent is never remapped (docs/security.md)
    (mount,) = [m for m in inspected["Mounts"] if m["Destination"] == PASSPHRASE_IN_CONTAINER]
    assert mount["Type"] == "bind" and mount["RW"] is False
    written = Path(mount["Source"])
    assert written.read_text() == PASSPHRASE
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert stat.S_IMODE(written.parent.stat().st_mode) == 0o700
    settings = load_settings(dirs.user_config / "vfed" / "nodes" / f"{node_name}.yaml")
    assert written.is_relative_to(settings.key_path.parent.parent)  # the node's own data folder
    inside = yaml.safe_load((written.parent.parent / "agent.yaml").read_text())
    assert inside["private_key_passphrase_file"] == PASSPHRASE_IN_CONTAINER
    assert "private_key_passphrase_env" not in inside

    assert f"stopped node {node_name} (user)" in _ok("stop", node_name, "--grace", "10")
    assert not written.exists()  # a stopped node keeps no copy of the passphrase
