"""A real `vserver start` over HTTPS (or behind a TLS-terminating proxy) in a subprocess, with certificates
from `vserver tls init`, seeded by `vserver import`; shared by the TLS tests."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tests import infra
from tests.server.vserver_proc import VSERVER, vserver

PASSWORD = "long password"
IMPORT = """
organizations: [{name: alpha}]
collaborations: [{name: study, organizations: [alpha]}]
users:
  - {username: boss, password: "long password", organization: alpha, roles: [root]}
  - {username: res, password: "long password", organization: alpha, roles: [researcher]}
nodes:
  - {name: alpha-node, organization: alpha, collaboration: study}
"""


@dataclass
class Certs:
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def key(self) -> Path:
        return self.folder / "server.key"


def tls_init(folder: Path, *names: str, force: bool = False) -> Certs:
    """`vserver tls init --dir FOLDER --hostname NAME...` (a CA already there is kept)."""
    args = ["tls", "init", "--dir", str(folder), "--data-dir", str(folder.parent / "unused-data")]
    for name in names:
        args += ["--hostname", name]
    vserver(*args, *(["--force"] if force else []))
    return Certs(folder)


@dataclass
class TlsServer:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    config: Path
    api_key: str

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, text: str, count: int = 1, timeout_s: float = 20.0) -> None:
        """Until `text` is in the server's log `count` times (bounded)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.log_text().count(text) >= count:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"vserver exited ({self.proc.returncode}):\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(
            f"{text!r} not in the server log after {timeout_s} s:\n{self.log_text()[-3000:]}"
        )

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)


@contextmanager
def tls_server(tmp_path: Path, certs: Certs | None, **config: Any) -> Iterator[TlsServer]:
    """`vserver start` on a free loopback port serving `certs` (None: plain HTTP, e.g. behind a proxy),
    its database seeded with IMPORT first; stopped (and waited for) afterwards."""
    cfg: dict[str, Any] = {
        "port": infra.free_port(),
        "data_dir": str(tmp_path / "data"),
        "jwt_secret": "subprocess-secret-long-enough-for-hs256",
        "mqtt": {"embedded_port": infra.free_port()},
        "metrics": {"port": None},
        **config,
    }
    if certs is not None:
        cfg["tls"] = {"cert_file": str(certs.cert), "key_file": str(certs.key)}
    path = tmp_path / "vserver.yaml"
    path.write_text(yaml.safe_dump(cfg))
    spec = tmp_path / "import.yaml"
    spec.write_text(IMPORT)
    out = vserver("import", str(spec), "--config", str(path)).stdout
    api_key = next(line.rsplit(" ", 1)[1] for line in out.splitlines() if "API key" in line)
    log_path = tmp_path / "vserver.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*VSERVER, "start", "--config", str(path)], stdout=log, stderr=log, env=os.environ
        )
    server = TlsServer(int(cfg["port"]), proc, log_path, path, api_key)
    try:
        infra.wait_for_port(server.port, 30, lambda: proc.poll() is None)
        server.wait_for_log("serving on")
        yield server
    finally:
        infra.stop(proc)


def served_certificate(port: int, ca: Path, host: str = "localhost") -> bytes:
    """The DER certificate the server presents to a new connection (verified against `ca`)."""
    import socket

    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def pem_to_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())
