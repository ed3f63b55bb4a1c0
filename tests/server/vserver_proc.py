"""Run a real `vserver start` in a subprocess (for tests that measure the server process itself)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tests import infra

VSERVER = [sys.executable, "-m", "vfed.server.cli"]


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen[bytes]
    config: Path
    mqtt_port: int


def vserver(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the CLI once."""
    return subprocess.run(
        [*VSERVER, "--log-level", "WARNING", *args], capture_output=True, text=True, check=check
    )


@contextmanager
def server_process(tmp_path: Path, **config: Any) -> Iterator[ServerProcess]:
    """Start `vserver start --config` on a free port with an embedded broker (`config` overrides any of
    these, e.g. the port and data folder of a database seeded beforehand); stop it afterwards."""
    mqtt_port = infra.free_port()
    cfg = {
        "port": infra.free_port(),
        "data_dir": str(tmp_path / "data"),
        "jwt_secret": "subprocess-secret-long-enough-for-hs256",
        "mqtt": {"embedded_port": mqtt_port},
        **config,
    }
    port = int(cfg["port"])
    path = tmp_path / "vserver.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = (tmp_path / "vserver.log").open("wb")
    proc = subprocess.Popen(
        [*VSERVER, "start", "--config", str(path)], stdout=log, stderr=log, env=os.environ
    )
    try:
        infra.wait_for_port(port, 30, lambda: proc.poll() is None)
        yield ServerProcess(f"http://127.0.0.1:{port}", proc, path, mqtt_port)
    finally:
        infra.stop(proc)
        log.close()
