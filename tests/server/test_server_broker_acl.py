"""Broker credentials and ACLs on real brokers: a Mosquitto configured by `vserver broker config` (TLS, its
password and ACL files kept current by a real `vserver start`) and the embedded amqtt broker reading the same
files. Each node gets its own broker password at login; a node reads only its own topic and publishes
nowhere; anonymous clients and old passwords (rotated keys, deleted nodes) are refused; a node that is not on
the server's machine is never told a loopback broker address."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import paho.mqtt.client as paho
import pytest
from tests import infra
from vserver_proc import ServerProcess, server_process, vserver
from vserver_testkit import JWT_SECRET, World, seed

from vfed.common.api.doorbell import Ring
from vfed.node.doorbell import Doorbell
from vfed.node.server_api import NodeIdentity
from vfed.server.app import create_app
from vfed.server.broker_auth import (
    ACL,
    PASSWD,
    mosquitto_hash,
    node_password,
    parse_passwd,
    verify_mosquitto_hash,
)
from vfed.server.config import MqttSettings, Settings
from vfed.server.state import DOORBELL, SETTINGS

pytestmark = [pytest.mark.mqtt, pytest.mark.timeout(120)]
NOT_AUTHORIZED = 0x87
SUBACK_FAILURE = 0x80
IMPORT = """
organizations: [{name: alpha}, {name: beta}]
collaborations: [{name: study, organizations: [alpha, beta]}]
users:
  - {username: boss, password: "long password", organization: alpha, roles: [root]}
  - {username: res, password: "long password", organization: alpha, roles: [researcher]}
nodes:
  - {name: alpha-node, organization: alpha, collaboration: study}
  - {name: beta-node, organization: beta, collaboration: study}
"""


def _certs(d: Path) -> None:
    """A throwaway CA and a certificate for 127.0.0.1, made with the openssl CLI."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca"),
        *("-keyout", "ca.key", "-out", "ca.pem"),
    )
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "b.key", "-out", "b.csr")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        *("x509", "-req", "-in", "b.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"),
        *("-days", "1", "-extfile", "ext.cnf", "-out", "b.pem"),
    )


@dataclass
class Stack:
    """A real server, its Mosquitto, and the two imported nodes' API keys."""

    srv: ServerProcess
    broker_dir: Path
    port: int
    ca: Path
    keys: dict[str, str]

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def mqtt(self, username: str | None = None, password: str | None = None) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1", self.port, username=username, password=password, tls_context=self.tls(), timeout=10
        )


def _mosquitto_binary() -> str:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists() or not shutil.which("openssl"):
        infra.missing("mqtt", "mosquitto and openssl are needed for the ACL'd TLS broker")
    return binary


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    binary = _mosquitto_binary()
    (tmp_path / "pki").mkdir()
    _certs(tmp_path / "pki")
    port, broker_dir, ca = infra.free_port(), tmp_path / "broker", tmp_path / "pki" / "ca.pem"
    url = f"mqtts://127.0.0.1:{port}"
    mqtt = {
        "url": url,
        "public_url": url,
        "ca_file": str(ca),
        "broker_dir": str(broker_dir),
        "broker_pid_file": str(broker_dir / "mosquitto.pid"),
        "reconnect_max_s": 1.0,
    }
    with server_process(tmp_path, mqtt=mqtt) as srv:
        spec = tmp_path / "import.yaml"
        spec.write_text(IMPORT)
        out = vserver("import", str(spec), "--config", str(srv.config)).stdout
        keys = {
            name: next(line.rsplit(" ", 1)[1] for line in out.splitlines() if f"{name}-node" in line)
            for name in ("alpha", "beta")
        }
        made = vserver(
            *("broker", "config", "--config", str(srv.config), "--listen", f"127.0.0.1:{port}"),
            *("--cert-file", str(tmp_path / "pki" / "b.pem"), "--key-file", str(tmp_path / "pki" / "b.key")),
        )
        assert f"url: mqtts://127.0.0.1:{port}" in made.stdout
        conf = (broker_dir / "mosquitto.conf").read_text()
        assert "allow_anonymous false" in conf and f"acl_file {broker_dir / ACL}" in conf
        log = (tmp_path / "mosquitto.log").open("wb")
        proc = subprocess.Popen([binary, "-c", str(broker_dir / "mosquitto.conf")], stdout=log, stderr=log)
        try:
            infra.wait_for_port(port, 10, lambda: proc.poll() is None)
            yield Stack(srv, broker_dir, port, ca, keys)
        finally:
            infra.stop(proc)
            log.close()


async def _eventually(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 20) -> None:
    """Until `check` holds (the server's rewrite and the broker's reload happen after the API answered)."""
    for _ in range(int(timeout_s * 10)):
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"never happened within {timeout_s} s: {what}")


async def _accepted(client: aiomqtt.Client) -> bool:
    try:
        async with client:
            return True
    except aiomqtt.MqttError:
        return False


async def _login(http: aiohttp.ClientSession, api_key: str) -> NodeIdentity:
    r = await http.post("/api/v1/token/node", json={"api_key": api_key})
    assert r.status == 200, await r.text()
    return NodeIdentity.model_validate(await r.json())


async def _user(http: aiohttp.ClientSession, username: str) -> dict[str, str]:
    r = await http.post("/api/v1/token/user", json={"username": username, "password": "long password"})
    return {"Authorization": f"Bearer {(await r.json())['access_token']}"}


async def _task_for(http: aiohttp.ClientSession, org_index: int) -> int:
    """A task for one organization of the study (0 alpha, 1 beta): its run rings that organization's node."""
    auth = await _user(http, "res")
    collab = (await (await http.get("/api/v1/collaborations", headers=auth)).json())["data"][0]
    body = {"collaboration_id": collab["id"], "image": "x"}
    body["organizations"] = [{"id": collab["organization_ids"][org_index]}]
    r = await http.post("/api/v1/tasks", json=body, headers=auth)
    assert r.status == 201, await r.text()
    return int((await r.json())["id"])


async def _first(client: aiomqtt.Client, timeout_s: float = 20) -> tuple[str, dict[str, Any]]:
    async with asyncio.timeout(timeout_s):
        msg = await anext(aiter(client.messages))
    return str(msg.topic), json.loads(bytes(msg.payload))  # type: ignore[arg-type]


def _publish_reason(stack: Stack, username: str, password: str, topic: str) -> int:
    """MQTT 5 QoS 1 publish: the PUBACK's reason code (Mosquitto answers 0x87 to a publish its ACL denies)."""
    codes: list[int] = []
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.username_pw_set(username, password)
    c.tls_set(ca_certs=str(stack.ca))
    c.on_publish = lambda _c, _u, _mid, rc, _p: codes.append(rc.value)
    c.connect("127.0.0.1", stack.port)
    c.loop_start()
    try:
        c.publish(topic, b'{"event": "forged"}', qos=1).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()
    return codes[0]


async def test_mosquitto_per_node_credentials_and_acls(stack: Stack) -> None:
    async with aiohttp.ClientSession(stack.srv.url) as http:
        alpha, beta = await _login(http, stack.keys["alpha"]), await _login(http, stack.keys["beta"])
        assert alpha.broker_username == f"node-{alpha.node_id}"
        assert beta.broker_username == f"node-{beta.node_id}"
        assert alpha.broker_password and beta.broker_password
        assert alpha.broker_password != beta.broker_password
        assert beta.broker_password == node_password(stack.keys["beta"])  # the same at every login
        assert (await _login(http, stack.keys["beta"])).broker_password == beta.broker_password
        r = await http.get("/api/v1/doorbell")
        assert (await r.json())["url"] == f"mqtts://127.0.0.1:{stack.port}"
        stored = parse_passwd((stack.broker_dir / PASSWD).read_text())
        assert verify_mosquitto_hash(beta.broker_password, stored[f"node-{beta.node_id}"])
        assert beta.broker_password not in (stack.broker_dir / PASSWD).read_text()

        # the node's own doorbell client, with the credentials from its login
        rings: asyncio.Queue[Ring] = asyncio.Queue()
        bell = Doorbell(
            f"mqtts://127.0.0.1:{stack.port}",
            beta.node_id,
            rings.put_nowait,
            credentials=lambda: (beta.broker_username, beta.broker_password),
            ca_file=stack.ca,
        )
        runner = asyncio.create_task(bell.run())
        try:
            await _eventually(lambda: _connected(bell), "the node's doorbell connects with its own password")
            assert alpha.broker_username and alpha.broker_password
            async with stack.mqtt(alpha.broker_username, alpha.broker_password) as snoop:
                # Mosquitto 2.0 grants the SUBACK but its ACL drops every message on another node's topic
                await snoop.subscribe(f"vfed/nodes/{beta.node_id}", qos=1)
                await snoop.subscribe("vfed/nodes/#", qos=1)
                await snoop.subscribe(f"vfed/nodes/{alpha.node_id}", qos=1)
                beta_task = await _task_for(http, 1)
                async with asyncio.timeout(20):
                    while (ring := await rings.get()).task_id != beta_task:
                        assert ring.event == "reconnected"
                alpha_task = await _task_for(http, 0)
                # published after beta's ring: had beta's ring reached alpha, it would have come first
                topic, message = await _first(snoop)
                assert (topic, message["task_id"]) == (f"vfed/nodes/{alpha.node_id}", alpha_task)
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

        for topic in (f"vfed/nodes/{beta.node_id}", f"vfed/nodes/{alpha.node_id}", "elsewhere"):
            reason = await asyncio.to_thread(
                _publish_reason, stack, alpha.broker_username, alpha.broker_password, topic
            )
            assert reason == NOT_AUTHORIZED, topic
        assert not await _accepted(stack.mqtt())  # anonymous
        assert not await _accepted(stack.mqtt(alpha.broker_username, beta.broker_password))
        assert not await _accepted(stack.mqtt(beta.broker_username, beta.broker_password + "x"))


async def _connected(bell: Doorbell) -> bool:
    return bell.connected.is_set()


async def test_mosquitto_rotation_and_deletion_revoke_broker_passwords(stack: Stack) -> None:
    async with aiohttp.ClientSession(stack.srv.url) as http:
        alpha, beta = await _login(http, stack.keys["alpha"]), await _login(http, stack.keys["beta"])
        assert beta.broker_username and beta.broker_password and alpha.broker_password
        await _eventually(
            lambda: _accepted(stack.mqtt(beta.broker_username, beta.broker_password)), "beta's password works"
        )
        admin = await _user(http, "boss")
        async with stack.mqtt(beta.broker_username, beta.broker_password) as old:
            await old.subscribe(f"vfed/nodes/{beta.node_id}", qos=1)
            r = await http.post(f"/api/v1/nodes/{beta.node_id}/api-key", headers=admin)
            assert r.status == 200, await r.text()
            new_key = (await r.json())["api_key"]
            with pytest.raises(aiomqtt.MqttError):  # Mosquitto's reload drops the connection
                await _first(old)
        assert not await _accepted(stack.mqtt(beta.broker_username, beta.broker_password))
        fresh = await _login(http, new_key)
        assert fresh.broker_password and fresh.broker_password != beta.broker_password
        await _eventually(
            lambda: _accepted(stack.mqtt(fresh.broker_username, fresh.broker_password)),
            "the rotated node's new password works after its login",
        )

        r = await http.delete(f"/api/v1/nodes/{alpha.node_id}", headers=admin)
        assert r.status == 204
        await _eventually(
            lambda: _refused(stack.mqtt(alpha.broker_username, alpha.broker_password)),
            "a deleted node's password is refused",
        )
        assert f"node-{alpha.node_id}" not in (stack.broker_dir / ACL).read_text()


async def _refused(client: aiomqtt.Client) -> bool:
    return not await _accepted(client)


# --- the embedded broker ----------------------------------------------------------------------------------
@pytest.fixture
async def embedded(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[tuple[World, int]]:
    port = infra.free_port()
    settings = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        jwt_secret=JWT_SECRET,
        mqtt=MqttSettings(embedded_broker=True, embedded_port=port),
    )
    w = await seed(await aiohttp_client(create_app(settings)))
    await asyncio.wait_for(w.client.app[DOORBELL].connected.wait(), 30)
    yield w, port


async def _node_login(w: World, name: str, api_key: str | None = None) -> NodeIdentity:
    r = await w.client.post("/api/v1/token/node", json={"api_key": api_key or w.api_keys[name]})
    assert r.status == 200, await r.text()
    return NodeIdentity.model_validate(await r.json())


def _embedded_client(port: int, ident: NodeIdentity | None = None) -> aiomqtt.Client:
    user, password = (ident.broker_username, ident.broker_password) if ident else (None, None)
    return aiomqtt.Client("127.0.0.1", port, username=user, password=password, timeout=10)


async def test_embedded_broker_same_rules_same_credentials(embedded: tuple[World, int]) -> None:
    w, port = embedded
    a, b = await _node_login(w, "a_node"), await _node_login(w, "b_node")
    assert a.broker_username == f"node-{a.node_id}" and a.broker_password != b.broker_password
    stored = parse_passwd((w.client.app[SETTINGS].data_dir / "broker" / PASSWD).read_text())
    assert verify_mosquitto_hash(str(b.broker_password), stored[str(b.broker_username)])
    assert not await _accepted(_embedded_client(port))  # anonymous
    async with _embedded_client(port, a) as snoop, _embedded_client(port, b) as sub:
        refused = await snoop.subscribe(f"vfed/nodes/{b.node_id}", qos=1)
        assert [c.value for c in refused] == [SUBACK_FAILURE]  # type: ignore[union-attr]
        refused = await snoop.subscribe("vfed/nodes/#", qos=1)
        assert [c.value for c in refused] == [SUBACK_FAILURE]  # type: ignore[union-attr]
        granted = await sub.subscribe(f"vfed/nodes/{b.node_id}", qos=1)
        assert [c.value for c in granted] == [1]  # type: ignore[union-attr]
        await snoop.publish(f"vfed/nodes/{b.node_id}", b'{"event": "forged"}', qos=1)
        task = await w.task("a_res", "ab", ["B"])
        topic, message = await _first(sub)  # the forged message was dropped: the server's ring comes first
        assert (topic, message["task_id"]) == (f"vfed/nodes/{b.node_id}", task["id"])

    status, body = await w.call("root", "POST", f"/nodes/{b.node_id}/api-key")
    assert status == 200
    assert not await _accepted(_embedded_client(port, b))  # the files were rewritten before the answer
    fresh = await _node_login(w, "b_node", body["api_key"])
    assert fresh.broker_password != b.broker_password
    assert await _accepted(_embedded_client(port, fresh))


# --- what nodes are told ----------------------------------------------------------------------------------
async def _doorbell_url(client: Any, forwarded_for: str | None) -> str | None:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    r = await client.get("/api/v1/doorbell", headers=headers)
    assert r.status == 200
    url = (await r.json())["url"]
    return str(url) if url else None


@pytest.mark.parametrize("public_url", [None, "mqtts://broker.example.org:8883"])
async def test_loopback_broker_is_never_announced_to_a_remote_node(
    aiohttp_client: Any, tmp_path: Path, public_url: str | None
) -> None:
    """The test client is the trusted proxy on loopback; X-Forwarded-For names a remote node (198.18.0.0/15:
    an address no packet is sent to)."""
    settings = Settings.model_validate(
        {
            "data_dir": tmp_path,
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
            "jwt_secret": JWT_SECRET,
            "trusted_proxies": ["127.0.0.1/32"],
            "mqtt": {"url": "mqtt://127.0.0.1:1", "public_url": public_url, "reconnect_max_s": 30},
        }
    )
    client = await aiohttp_client(create_app(settings))
    remote = await _doorbell_url(client, "198.18.0.7")
    local = await _doorbell_url(client, None)
    if public_url is None:
        assert remote is None and local == "mqtt://127.0.0.1:1"
    else:
        assert remote == local == public_url


def test_hashes_match_mosquitto_passwd(tmp_path: Path) -> None:
    if shutil.which("mosquitto_passwd") is None:
        infra.missing("mqtt", "no mosquitto_passwd binary")
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(path), "someone", "pa:ss word"], check=True)
    written = parse_passwd(path.read_text())["someone"]
    assert verify_mosquitto_hash("pa:ss word", written) and not verify_mosquitto_hash("pa:ss", written)
    ours = mosquitto_hash("pa:ss word", salt=bytes(12))
    assert ours.startswith("$7$101$AAAAAAAAAAAAAAAA$") and verify_mosquitto_hash("pa:ss word", ours)
    assert not verify_mosquitto_hash("x", "$6$junk") and not verify_mosquitto_hash("x", "$7$101$!!$??")


def test_broker_config_refuses_plain_without_saying_so(tmp_path: Path) -> None:
    cfg = tmp_path / "vserver.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\nmqtt: {{broker_dir: {tmp_path / 'broker'}}}\n")
    plain = vserver("broker", "config", "--config", str(cfg), check=False)
    assert plain.returncode == 1 and "--insecure-plain" in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1
    nowhere = vserver("broker", "config", "--data-dir", str(tmp_path), "--insecure-plain", check=False)
    assert nowhere.returncode == 1 and "mqtt.broker_dir" in nowhere.stderr
    made = vserver("broker", "config", "--config", str(cfg), "--insecure-plain", "--listen", "127.0.0.1:1884")
    assert "url: mqtt://127.0.0.1:1884" in made.stdout
    assert ((tmp_path / "broker" / PASSWD).stat().st_mode & 0o077) == 0
