"""The doorbell through a Mosquitto that demands TLS and a username/password (started here, since the
session broker is anonymous and plain): the configured credentials and CA are used, and wrong ones only
cost the doorbell, never the API."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from tests import infra
from vserver_testkit import JWT_SECRET, seed

from vfed.server.app import create_app
from vfed.server.config import MqttSettings, Settings
from vfed.server.state import DOORBELL

pytestmark = pytest.mark.mqtt


def _certs(d: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    )


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[int]:
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()) or not shutil.which("openssl"):
        infra.missing("mqtt", "mosquitto and openssl are needed for the TLS broker")
    _certs(tmp_path)
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(tmp_path / "passwd"), "vserver", "s3cret"], check=True
    )
    port = infra.free_port()
    (tmp_path / "mosquitto.conf").write_text(
        # "user root": started as root, mosquitto would drop to its own user and could not read 0700 tmp dirs
        f"user root\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {tmp_path / 'passwd'}\n"
        f"cafile {tmp_path / 'ca.pem'}\ncertfile {tmp_path / 'server.pem'}\n"
        f"keyfile {tmp_path / 'server.key'}\n"
    )
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(tmp_path / "mosquitto.conf")], stderr=subprocess.DEVNULL)
    try:
        infra.wait_for_port(port, 10, lambda: proc.poll() is None)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def _settings(tmp_path: Path, mqtt: MqttSettings) -> Settings:
    return Settings(
        data_dir=tmp_path / "srv",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        jwt_secret=JWT_SECRET,
        mqtt=mqtt,
    )


async def test_doorbell_over_tls_with_password(
    aiohttp_client: Any, tmp_path: Path, secure_broker: int
) -> None:
    mqtt = MqttSettings(
        url=f"mqtts://127.0.0.1:{secure_broker}",
        username="vserver",
        password="s3cret",
        ca_file=tmp_path / "ca.pem",
    )
    w = await seed(await aiohttp_client(create_app(_settings(tmp_path, mqtt))))
    await asyncio.wait_for(w.client.app[DOORBELL].connected.wait(), 20)
    tls = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    async with aiomqtt.Client(
        "127.0.0.1", secure_broker, username="vserver", password="s3cret", tls_context=tls
    ) as sub:
        await sub.subscribe(f"vfed/nodes/{w.nodes['b_node']}", qos=1)
        task = await w.task("a_res", "ab", ["B"])
        async with asyncio.timeout(20):
            msg = await anext(aiter(sub.messages))
    assert json.loads(bytes(msg.payload))["task_id"] == task["id"]  # type: ignore[arg-type]


async def test_wrong_password_leaves_api_working(
    aiohttp_client: Any, tmp_path: Path, secure_broker: int
) -> None:
    mqtt = MqttSettings(
        url=f"mqtts://127.0.0.1:{secure_broker}",
        username="vserver",
        password="wrong",
        ca_file=tmp_path / "ca.pem",
        reconnect_max_s=0.5,
    )
    w = await seed(await aiohttp_client(create_app(_settings(tmp_path, mqtt))))
    task = await w.task("a_res", "ab", ["B"])
    assert task["status"] == "pending"
    await asyncio.sleep(1)
    assert not w.client.app[DOORBELL].connected.is_set()
