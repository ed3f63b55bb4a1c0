"""`vnode start|stop|attach|clean` failure paths and leftovers, `vnode keys upload|rotate` and `vnode users
certify|revoke`, on a real Docker engine and a real `vserver` process. The full two-node scenario is in
test_vnode_two_nodes.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import requests
from vnode_testlib import (
    PASSWORD,
    ROOT,
    Dirs,
    VServer,
    dirs,
    new_node,
    remove_node_objects,
    unique,
    vnode,
    vserver,
)

from vfed.common.crypto import Keyring
from vfed.common.trust import (
    CertificateRevoked,
    SignedEntry,
    parse_records,
    revoked_digests,
    verify_certificate,
    verify_chain,
)
from vfed.node.config import load_settings
from vfed.node.operator.container import is_loopback

__all__ = ["dirs", "vserver"]


@pytest.fixture
def node_name(docker_client: docker.DockerClient) -> Iterator[str]:
    """A fresh node name; whatever Docker objects the test leaves under it are removed afterwards."""
    name = unique("op")
    yield name
    remove_node_objects(docker_client, name)


def test_loopback_detection() -> None:
    assert is_loopback("http://127.0.0.1:7600")
    assert is_loopback("http://localhost:7600/")
    assert is_loopback("http://[::1]:7600")
    assert is_loopback("mqtt://127.0.0.2:1883")
    assert not is_loopback("http://10.1.2.3:7600")
    assert not is_loopback("https://vfed.example.org")
    assert not is_loopback(None)


def test_engine_not_running_is_one_clear_line(dirs: Dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine is made unreachable by pointing DOCKER_HOST at a socket that does not exist."""
    new_node("eng", "1.a")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    for command in (["start", "eng"], ["stop", "eng"], ["attach", "eng"], ["clean", "eng"]):
        result = vnode(*command)
        assert result.exit_code == 1, (command, result.output)
        assert result.output.startswith("Error: Docker engine not running or not reachable"), result.output
        assert len(result.output.strip().splitlines()) == 1
    listed = vnode("list", "--format", "json")
    assert listed.exit_code == 0  # still lists what is configured, with a warning on stderr
    assert "Docker engine not running" in listed.stderr


@pytest.mark.docker
def test_start_without_key_and_stop_when_not_running(dirs: Dirs, node_name: str) -> None:
    new_node(node_name, "1.a", "--no-generate-key")
    result = vnode("start", node_name)
    assert result.exit_code == 1
    assert f"no organization key at {dirs.user_data}" in result.output
    assert f"`vnode keys generate {node_name}`" in result.output
    stopped = vnode("stop", node_name)
    assert stopped.exit_code == 1 and "is not running" in stopped.output
    attach = vnode("attach", node_name)
    assert attach.exit_code == 1 and "has no container" in attach.output
    none = vnode("stop", "--all")
    assert none.exit_code == 0 and "no node of the user scope is running" in none.output
    both = vnode("stop", node_name, "--all")
    assert both.exit_code == 2


@pytest.mark.docker
def test_start_with_a_missing_image(dirs: Dirs, node_name: str) -> None:
    new_node(node_name, "1.a")
    result = vnode("start", node_name, "--image", "vfed-test/no-such-image:1")
    assert result.exit_code == 1
    assert "image vfed-test/no-such-image:1 is not present and cannot be pulled" in result.output


@pytest.mark.docker
@pytest.mark.mqtt
@pytest.mark.slow
def test_start_fails_with_the_agents_last_lines(
    dirs: Dirs, node_name: str, vserver: VServer, docker_client: docker.DockerClient
) -> None:
    """A node whose API key the server refuses: start waits, sees the agent exit, shows why, exits 1."""
    vserver.import_world(["X"])
    vserver.start()
    result = vnode(
        "new", node_name, "--server-url", vserver.url, "--api-key", "0000.not-a-real-key"
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = vnode("start", node_name, "--develop", str(ROOT), "--timeout", "60")
    assert result.exit_code == 1, result.output
    assert "the agent stopped (exit code 1); its last log lines:" in result.output
    assert "refused this node's api_key" in result.output
    agent = docker_client.containers.get(f"vfed-{node_name}-user")
    agent.reload()
    assert agent.status == "exited"  # not left restarting in a loop
    listed = {r["name"]: r for r in _list_json()}
    assert listed[node_name]["running"] is False and listed[node_name]["status"] == "offline"
    cleaned = vnode("clean", node_name)
    assert cleaned.exit_code == 0, cleaned.output
    assert f"removed container vfed-{node_name}-user" in cleaned.output
    assert f"removed volume vfed-{node_name}-vol" in cleaned.output
    assert not docker_client.containers.list(all=True, filters={"name": f"vfed-{node_name}-user"})


def _list_json() -> list[dict[str, object]]:
    import json

    result = vnode("list", "--format", "json")
    assert result.exit_code == 0, result.output
    rows: list[dict[str, object]] = json.loads(result.stdout)
    return rows


@pytest.mark.docker
def test_clean_removes_containers_volumes_and_networks(
    dirs: Dirs, node_name: str, docker_client: docker.DockerClient
) -> None:
    """What an agent leaves after a crash: an exited run container, job volumes, its own volume, a network."""
    new_node(node_name, "1.a")
    labels = {"vfed.node": node_name}
    run = docker_client.containers.create(
        "vfed/base", ["true"], name=f"vfed-{node_name}-run-9", labels=labels
    )
    docker_client.volumes.create(f"vfed-{node_name}-9-tmp", labels=labels)
    docker_client.volumes.create(f"vfed-{node_name}-vol")
    docker_client.networks.create(f"vfed-{node_name}-net", internal=True, labels=labels)
    other = unique("op")
    docker_client.volumes.create(f"vfed-{other}-9-tmp", labels={"vfed.node": other})  # another node's
    try:
        result = vnode("clean", node_name)
        assert result.exit_code == 0, result.output
        for what in (
            f"container {run.name}",
            f"volume vfed-{node_name}-9-tmp",
            f"volume vfed-{node_name}-vol",
            f"network vfed-{node_name}-net",
        ):
            assert f"removed {what}" in result.output
        assert not docker_client.containers.list(all=True, filters={"label": f"vfed.node={node_name}"})
        assert not [
            v for v in docker_client.volumes.list() if (v.name or "").startswith(f"vfed-{node_name}-")
        ]
        assert not docker_client.networks.list(names=[f"vfed-{node_name}-net"])
        assert docker_client.volumes.get(f"vfed-{other}-9-tmp")  # untouched
        again = vnode("clean", node_name)
        assert again.exit_code == 0 and "nothing left over for node" in again.output
    finally:
        remove_node_objects(docker_client, other)


@pytest.mark.mqtt
def test_keys_upload_and_rotate_publish_on_the_server(dirs: Dirs, vserver: VServer, tmp_path: Path) -> None:
    keys = vserver.import_world(["K"])
    vserver.start()
    new_node("keyed", keys["K"])
    vnode("new", "keyed", "--server-url", vserver.url, "--api-key", keys["K"], "--force", "--no-generate-key")
    settings = load_settings(dirs.user_config / "vfed" / "nodes" / "keyed.yaml")
    first = Keyring.load(settings.key_path).current
    uploaded = vnode("keys", "upload", "keyed")
    assert uploaded.exit_code == 0, uploaded.output
    assert f"published 1 key record(s); current key {first.key_id}" in uploaded.output
    assert _server_key_id(vserver, keys["K"]) == first.key_id
    again = vnode("keys", "upload", "keyed")
    assert again.exit_code == 0 and "nothing new" in again.output, again.output
    rotated = vnode("keys", "rotate", "keyed")
    assert rotated.exit_code == 0, rotated.output
    assert "no restart" in rotated.output and "restart" not in rotated.output.replace("no restart", "")
    ring = Keyring.load(settings.key_path)
    assert [k.key_id for k in ring.keys] == [first.key_id, ring.current.key_id]
    assert _server_key_id(vserver, keys["K"]) == ring.current.key_id
    chain = verify_chain(
        _org_id(vserver, keys["K"]), parse_records(_get(vserver, keys["K"], "key-records")), first.key_id
    )
    assert [k.key.key_id for k in chain.keys] == [first.key_id, ring.current.key_id]
    bad = vnode(
        "new", "keyed", "--server-url", vserver.url, "--api-key", "1.wrong", "--force", "--no-generate-key"
    )
    assert bad.exit_code == 0
    refused = vnode("keys", "upload", "keyed")
    assert refused.exit_code == 1 and "server answered 401" in refused.output


@pytest.mark.mqtt
def test_users_certify_and_revoke_through_the_server(dirs: Dirs, vserver: VServer) -> None:
    """The org admin certifies a researcher's own key; the certificate verifies under the organization's
    chain (not the server's word); a revocation makes it fail."""
    keys = vserver.import_world(["U"])
    vserver.start()
    made = vnode("new", "certs", "--server-url", vserver.url, "--api-key", keys["U"])
    assert made.exit_code == 0, made.output
    assert vnode("keys", "upload", "certs").exit_code == 0
    settings = load_settings(dirs.user_config / "vfed" / "nodes" / "certs.yaml")
    org_id = _org_id(vserver, keys["U"])
    login = requests.post(
        vserver.url + "/api/v1/token/user", json={"username": "res-U", "password": PASSWORD}, timeout=5
    ).json()
    user_id = int(login["user_id"])
    researcher = Keyring.generate().current.public
    made = vnode(
        "users", "certify", str(user_id), "certs",
        "--key", researcher.to_text(), "--days", "30", "--username", "alice",
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    assert f"certified key {researcher.key_id} of user {user_id}" in made.output
    (row,) = _get(vserver, keys["U"], f"certificates?user_id={user_id}")
    entry = SignedEntry.parse(row["certificate"])
    assert f"certificate {entry.digest}" in made.output
    root = Keyring.load(settings.key_path).keys[0].key_id
    chain = verify_chain(org_id, parse_records(_get(vserver, keys["U"], "key-records")), root)
    cert = verify_certificate(entry, chain, set(), now=time.time())
    assert (cert.user_id, cert.key.key_id, cert.roles) == (user_id, researcher.key_id, ("researcher",))
    assert cert.username == "alice"
    assert 29 * 86400 < cert.expires_at - time.time() <= 30 * 86400

    revoked = vnode("users", "revoke", "certs", "--user", str(user_id), "--reason", "left")
    assert revoked.exit_code == 0, revoked.output
    assert f"revoked certificate {entry.digest} of user {user_id}" in revoked.output
    revocations = [SignedEntry.parse(r) for r in _get(vserver, keys["U"], "revocations")]
    assert revoked_digests(revocations, chain) == {entry.digest}
    with pytest.raises(CertificateRevoked):
        verify_certificate(entry, chain, revoked_digests(revocations, chain), now=time.time())
    nothing = vnode("users", "revoke", "certs", "--user", str(user_id))
    assert nothing.exit_code == 1 and "no unrevoked certificate" in nothing.output
    usage = vnode("users", "revoke", "certs")
    assert usage.exit_code == 2


def _org_id(server: VServer, api_key: str) -> int:
    token = requests.post(server.url + "/api/v1/token/node", json={"api_key": api_key}, timeout=5).json()
    return int(token["organization_id"])


def _get(server: VServer, api_key: str, what: str) -> list[Any]:
    """`GET /organizations/{ours}/{what}` with the node's API key: the answer's data."""
    base = server.url + "/api/v1"
    token = requests.post(base + "/token/node", json={"api_key": api_key}, timeout=5).json()
    headers = {"Authorization": f"Bearer {token['access_token']}"}
    url = f"{base}/organizations/{token['organization_id']}/{what}"
    data: list[Any] = requests.get(url, headers=headers, timeout=5).json()["data"]
    return data


def _server_key_id(server: VServer, api_key: str) -> str:
    base = server.url + "/api/v1"
    token = requests.post(base + "/token/node", json={"api_key": api_key}, timeout=5).json()
    headers = {"Authorization": f"Bearer {token['access_token']}"}
    org = requests.get(f"{base}/organizations/{token['organization_id']}", headers=headers, timeout=5).json()
    return str(org["key_id"])
