"""Behind a reverse proxy: Debian's haproxy terminates TLS in front of a real `vserver start`
(`tls.terminated_by: proxy`), all on loopback. The proxy connects from 127.0.0.2, the only trusted proxy:
the client address it forwards is what the server records; a request straight to the server (with a forged
X-Forwarded-For) is refused, not believed."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest
from tests import infra
from tests.server.tls_server import PASSWORD, Certs, tls_init, tls_server

from vfed.common.tls import client_context

pytestmark = [pytest.mark.timeout(120)]
PROXY_SOURCE = "127.0.0.2"
CLIENT_SOURCE = "127.0.0.3"
FORGED = "198.18.5.5"  # only ever a header value: nothing is sent there

HAPROXY_CFG = """
global
    maxconn 100
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 90s
frontend https
    bind 127.0.0.1:{front} ssl crt {pem}
    option forwardfor
    default_backend vserver
backend vserver
    server vserver 127.0.0.1:{back} source {source}
"""


def _haproxy() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if found is None:
        infra.missing("haproxy", "not installed (apt-get install haproxy; make test installs it)")
    assert found is not None
    return found


@contextmanager
def haproxy(tmp_path: Path, certs: Certs, backend_port: int) -> Iterator[int]:
    """haproxy in the foreground terminating TLS with the server's certificate; its front port."""
    binary = _haproxy()
    pem = tmp_path / "haproxy.pem"
    pem.write_text(certs.cert.read_text() + certs.key.read_text())
    pem.chmod(0o600)
    front = infra.free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(front=front, pem=pem, back=backend_port, source=PROXY_SOURCE))
    check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    log = (tmp_path / "haproxy.log").open("wb")
    proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=log, stderr=log)
    try:
        infra.wait_for_port(front, 20, lambda: proc.poll() is None)
        yield front
    finally:
        infra.stop(proc)
        log.close()


def test_haproxy_terminates_tls_and_only_its_forwarded_address_counts(tmp_path: Path) -> None:
    certs = tls_init(tmp_path / "tls", "localhost")
    config = {"tls": {"terminated_by": "proxy"}, "trusted_proxies": [f"{PROXY_SOURCE}/32"]}
    with tls_server(tmp_path, None, **config) as server, haproxy(tmp_path, certs, server.port) as front:

        async def scenario() -> None:
            base = f"https://localhost:{front}/api/v1"
            forged = {"X-Forwarded-For": FORGED}
            connector = aiohttp.TCPConnector(ssl=client_context(certs.ca), local_addr=(CLIENT_SOURCE, 0))
            async with aiohttp.ClientSession(connector=connector) as http:
                login = {"username": "boss", "password": PASSWORD}
                async with http.post(f"{base}/token/user", json=login, headers=forged) as resp:
                    assert resp.status == 200, await resp.text()
                    token = (await resp.json())["access_token"]
                auth = {"Authorization": f"Bearer {token}", **forged}
                user = {"username": "through-proxy", "password": PASSWORD}
                async with http.post(f"{base}/users", json=user, headers=auth) as resp:
                    assert resp.status == 201, await resp.text()
                async with http.get(f"{base}/audit", params={"action": "user.create"}, headers=auth) as resp:
                    entries = (await resp.json())["data"]
            # haproxy appended the address it received from; the client's own (forged) entry is ignored
            assert entries[0]["target_name"] == "through-proxy"
            assert entries[0]["address"] == CLIENT_SOURCE

            async with aiohttp.ClientSession() as http:  # around the proxy: plain HTTP from 127.0.0.1
                direct = f"http://127.0.0.1:{server.port}/api/v1/token/user"
                async with http.post(direct, json=login, headers=forged) as resp:
                    assert resp.status == 403
                    body = await resp.json()
            assert body["error"] == "tls-proxy-only" and "proxy" in body["detail"]

        asyncio.run(scenario())
