"""HTTPS on a real `vserver start`: certificates from `vserver tls init`, the researcher's client and CLI
with the CA (wrong CA and wrong host name refused in one line), plain HTTP to the TLS port refused, the
certificate reloaded on SIGHUP without dropping connections, and plain HTTP off loopback refused at start."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from tests.server.tls_server import PASSWORD, pem_to_der, served_certificate, tls_init, tls_server
from vserver_proc import vserver

from vfed.client.client import AsyncClient
from vfed.server.config import Settings
from vfed.server.tls import plain_http_refusal

VFED = [sys.executable, "-m", "vfed.client.cli"]
pytestmark = [pytest.mark.timeout(120)]


def vfed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VFED, *args], capture_output=True, text=True, env=os.environ, timeout=60, check=False
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    return lines[0]


def test_tls_init_writes_a_ca_and_a_server_certificate(tmp_path: Path) -> None:
    out = vserver(
        "tls",
        "init",
        "--dir",
        str(tmp_path / "tls"),
        "--hostname",
        "vfed.example",
        "--hostname",
        "127.0.0.1",
        "--data-dir",
        str(tmp_path / "data"),
    ).stdout
    folder = tmp_path / "tls"
    assert {p.name for p in folder.iterdir()} == {"ca.crt", "ca.key", "server.crt", "server.key"}
    assert (folder / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (folder / "server.key").stat().st_mode & 0o777 == 0o600
    assert f"cert_file: {folder / 'server.crt'}" in out and "--server-ca ca.crt" in out
    assert "vfed login --url https://vfed.example:7600 --ca-file ca.crt" in out
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-in", str(folder / "server.crt")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "DNS:vfed.example" in text and "IP Address:127.0.0.1" in text and "TLS Web Server" in text
    check = subprocess.run(
        ["openssl", "verify", "-CAfile", str(folder / "ca.crt"), str(folder / "server.crt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    again = vserver("tls", "init", "--dir", str(folder), "--data-dir", str(tmp_path / "data"), check=False)
    assert again.returncode == 1 and "--force" in again.stderr
    ca_before = (folder / "ca.crt").read_bytes()
    cert_before = (folder / "server.crt").read_bytes()
    renewed = vserver(
        "tls",
        "init",
        "--dir",
        str(folder),
        "--hostname",
        "vfed.example",
        "--force",
        "--data-dir",
        str(tmp_path / "data"),
    ).stdout
    assert "(kept)" in renewed
    assert (folder / "ca.crt").read_bytes() == ca_before and (
        folder / "server.crt"
    ).read_bytes() != cert_before


def test_client_and_cli_reach_the_server_over_https_with_the_ca(tmp_path: Path) -> None:
    certs = tls_init(tmp_path / "tls", "localhost")
    other = tls_init(tmp_path / "other-ca", "localhost")
    with tls_server(tmp_path, certs) as server:
        login = vfed(
            "login",
            "--url",
            server.url,
            "--ca-file",
            str(certs.ca),
            "--username",
            "res",
            "--password",
            PASSWORD,
        )
        assert login.returncode == 0, login.stderr
        saved = json.loads((tmp_path / "vfed-config" / "credentials.json").read_text())
        assert saved["ca_file"] == str(certs.ca.resolve())
        listed = vfed("task", "list")  # the saved CA is used without naming it again
        assert listed.returncode == 0, listed.stderr

        line = one_line(
            vfed(
                "login",
                "--url",
                server.url,
                "--ca-file",
                str(other.ca),
                "--username",
                "res",
                "--password",
                PASSWORD,
            )
        )
        assert "does not verify with the CA file" in line and str(other.ca) in line
        line = one_line(vfed("login", "--url", server.url, "--username", "res", "--password", PASSWORD))
        assert "does not verify with the system's CAs" in line
        wrong_host = server.url.replace("localhost", "127.0.0.1")
        line = one_line(
            vfed(
                "login",
                "--url",
                wrong_host,
                "--ca-file",
                str(certs.ca),
                "--username",
                "res",
                "--password",
                PASSWORD,
            )
        )
        assert "not valid for 127.0.0.1" in line

        async def python_client() -> int | None:
            async with AsyncClient(server.url, ca_file=certs.ca) as client:
                await client.login("res", PASSWORD)
                return client.organization_id

        assert asyncio.run(python_client()) is not None


def test_plain_http_to_the_tls_port_gets_no_answer(tmp_path: Path) -> None:
    certs = tls_init(tmp_path / "tls", "localhost")
    with tls_server(tmp_path, certs) as server:

        async def plain() -> None:
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.ClientError):
                    async with http.get(f"http://localhost:{server.port}/api/v1/health") as resp:
                        await resp.read()
                async with http.get(f"{server.url}/api/v1/health", ssl=_ctx(certs.ca)) as resp:
                    assert resp.status == 200  # still serving

        asyncio.run(plain())


def _ctx(ca: Path) -> object:
    from vfed.common.tls import client_context

    return client_context(ca)


def test_sighup_serves_the_renewed_certificate_without_dropping_connections(tmp_path: Path) -> None:
    certs = tls_init(tmp_path / "tls", "localhost")
    first = pem_to_der(certs.cert)
    with tls_server(tmp_path, certs) as server:
        assert served_certificate(server.port, certs.ca) == first

        async def keep_alive() -> None:
            import ssl

            reader, writer = await asyncio.open_connection(
                "127.0.0.1",
                server.port,
                ssl=ssl.create_default_context(cafile=str(certs.ca)),
                server_hostname="localhost",
            )
            request = b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n"
            try:
                writer.write(request)
                assert (await _response(reader)).startswith(b"HTTP/1.1 200")
                tls_init(certs.folder, "localhost", force=True)  # renewed: same CA, new key and certificate
                server.reload()
                await asyncio.to_thread(server.wait_for_log, "TLS certificate reloaded")
                writer.write(request)  # the connection opened before the reload still works
                assert (await _response(reader)).startswith(b"HTTP/1.1 200")
            finally:
                writer.close()

        asyncio.run(keep_alive())
        renewed = pem_to_der(certs.cert)
        assert renewed != first
        assert served_certificate(server.port, certs.ca) == renewed

        certs.key.write_text(tls_init(tmp_path / "elsewhere", "localhost").key.read_text())  # a wrong key
        server.reload()
        server.wait_for_log("TLS reload refused")
        assert served_certificate(server.port, certs.ca) == renewed  # the previous pair is kept
        assert server.proc.poll() is None


async def _response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    await asyncio.wait_for(reader.readexactly(length), 10)
    return head


def test_plain_http_off_loopback_is_refused_before_binding(tmp_path: Path) -> None:
    # 198.18.0.0/15 (benchmarking, never routed): the refusal comes before any bind, so nothing listens.
    result = vserver("start", "--host", "198.18.0.1", "--data-dir", str(tmp_path), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "refusing to serve plain HTTP on 198.18.0.1" in lines[0] and "--insecure-http" in lines[0]
    assert not (tmp_path / "vserver.sqlite").exists()

    assert plain_http_refusal(Settings(host="127.0.0.1"), insecure_http=False) is None
    assert plain_http_refusal(Settings(host="0.0.0.0"), insecure_http=False) is not None
    assert plain_http_refusal(Settings(host="0.0.0.0"), insecure_http=True) is None
    behind = Settings(host="0.0.0.0", trusted_proxies=["10.1.2.3/32"], tls={"terminated_by": "proxy"})
    assert plain_http_refusal(behind, insecure_http=False) is None


@pytest.mark.parametrize(
    ("tls", "needle"),
    [
        ({"cert_file": "/nonexistent/server.crt"}, "tls.cert_file and tls.key_file go together"),
        ({"terminated_by": "proxy"}, "trusted_proxies"),
        ({"cert_file": "/nonexistent/server.crt", "key_file": "/nonexistent/server.key"}, "cannot read"),
    ],
)
def test_bad_tls_settings_are_one_line(tmp_path: Path, tls: dict[str, str], needle: str) -> None:
    cfg = tmp_path / "vserver.yaml"
    cfg.write_text(json.dumps({"tls": tls, "data_dir": str(tmp_path / "data")}))
    result = vserver("start", "--config", str(cfg), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and needle in lines[0], result.stderr
