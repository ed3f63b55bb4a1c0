"""Real infrastructure for the test session: Mosquitto, PostgreSQL, moto's S3 server on free loopback ports.

Each service gets a throwaway directory and is stopped at the end of the session. Nothing here is a fake.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REQUIRE_ENV = "VFED_REQUIRE_COMPONENTS"


def missing(component: str, why: str) -> None:
    """Skip when a component is absent, or fail when the run requires it (``make test`` does)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{component} is required by this run but unavailable: {why}", pytrace=False)
    pytest.skip(f"{component} unavailable: {why}")


def json_child(module: str, argument: str, what: str, timeout_s: float | None = None) -> dict[str, Any]:
    """`python -m module argument` from the repository root, in a process of its own (so its memory is its
    own); its last line of output as JSON. AssertionError with the child's stderr when it fails."""
    done = subprocess.run(
        [sys.executable, "-m", module, argument],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout_s,
        cwd=Path(__file__).resolve().parents[1],
    )
    if done.returncode != 0:
        raise AssertionError(f"{what} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def free_port() -> int:
    """A TCP port free on loopback right now (a port in use is never chosen)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("process exited before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after grace_s: a test's server process is gone when this returns."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def mqtt_answers(port: int, timeout_s: float = 3.0) -> bool:
    """True when an MQTT broker (not just any listener) answers a CONNECT with a CONNACK."""
    client_id = b"vfed-probe"
    variable = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    packet = bytes([0x10, len(variable)]) + variable
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(packet)
            return s.recv(1)[:1] == b"\x20"
    except OSError:
        return False


@dataclass(frozen=True)
class Broker:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def _find(name: str, extra: list[str]) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for pattern in extra:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


class Mosquitto:
    """A Mosquitto broker on a free loopback port; ``stop``/``start`` let tests take it away and back."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, attempts: int = 5) -> Broker:
        keep_port = self.port
        for _ in range(attempts):
            self.port = keep_port or free_port()
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "set_tcp_nodelay true\n"  # as `vserver broker config` writes it: PUBACKs leave at once
                "log_dest stderr\nlog_type error\nlog_type warning\n"
            )
            log = (self.workdir / "mosquitto.log").open("ab")
            self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=log, stderr=log)
            try:
                wait_for_port(self.port, 10, lambda: self.proc is not None and self.proc.poll() is None)
                if not mqtt_answers(self.port):  # something else holds the port
                    raise RuntimeError(f"port {self.port} does not answer MQTT")
                return Broker("127.0.0.1", self.port)
            except (RuntimeError, TimeoutError):
                self.stop()
        tail = (self.workdir / "mosquitto.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"mosquitto did not start after {attempts} attempts:\n{tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextmanager
def mosquitto() -> Iterator[Mosquitto]:
    binary = _find("mosquitto", ["/usr/sbin/mosquitto"])
    if binary is None:
        missing("mosquitto", "no mosquitto binary (apt-get install mosquitto)")
        raise AssertionError("unreachable")
    with tempfile.TemporaryDirectory(prefix="vfed-mqtt-") as d:
        broker = Mosquitto(binary, Path(d))
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()


@dataclass(frozen=True)
class Postgres:
    port: int
    socket_dir: str

    def url(self, database: str = "postgres", driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the ``postgres`` account when we are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@contextmanager
def postgres() -> Iterator[Postgres]:
    bindir = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)), None)
    if bindir is None:
        missing("postgresql", "no PostgreSQL server binaries (apt-get install postgresql)")
        raise AssertionError("unreachable")
    tmp = Path(tempfile.mkdtemp(prefix="vfed-pg-"))
    data, sock = tmp / "data", tmp / "sock"
    data.mkdir()
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres")
        shutil.chown(data, "postgres")
        shutil.chown(sock, "postgres")
    log = tmp / "pg.log"
    try:
        subprocess.run(
            _as_postgres_user(
                [f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"]
            ),
            check=True,
            capture_output=True,
        )
        port = _start_postgres(bindir, data, sock, log)
        yield Postgres(port, str(sock))
    finally:
        subprocess.run(
            _as_postgres_user([f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
            check=False,
        )
        shutil.rmtree(tmp, ignore_errors=True)


def _start_postgres(bindir: str, data: Path, sock: Path, log: Path, attempts: int = 5) -> int:
    for _ in range(attempts):
        port = free_port()
        opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        res = subprocess.run(
            _as_postgres_user(
                [f"{bindir}/pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "30", "-o", opts, "start"]
            ),
            capture_output=True,
            check=False,
        )
        if res.returncode == 0:
            return port
    raise RuntimeError(f"postgres did not start: {log.read_text(errors='replace')[-2000:]}")


def create_database(pg: Postgres) -> str:
    """A fresh, empty database; returns its name."""
    name = "t_" + uuid.uuid4().hex[:12]
    subprocess.run(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(pg.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-q",
            "-c",
            f'CREATE DATABASE "{name}"',
        ],
        check=True,
        capture_output=True,
    )
    return name


@dataclass(frozen=True)
class S3Server:
    """moto's standalone S3 server: any key pair is accepted, buckets live in its memory."""

    port: int
    access_key: str = "vfed-test-key"
    secret_key: str = "vfed-test-secret"
    region: str = "us-east-1"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


MOTO_VENV = Path(__file__).resolve().parent.parent / ".venv-moto"


def _moto_binary() -> str | None:
    """`moto_server` from VFED_MOTO_SERVER, PATH, or the project's .venv-moto (scripts/ensure-infra.sh makes
    it: moto needs botocore, whose python-dateutil cap the kubernetes client of the main venv cannot meet)."""
    named = os.environ.get("VFED_MOTO_SERVER")
    if named:
        return named if os.access(named, os.X_OK) else None
    return _find("moto_server", [str(MOTO_VENV / "bin" / "moto_server")])


@contextmanager
def moto_s3(attempts: int = 5) -> Iterator[S3Server]:
    """moto_server on a free loopback port in a process group of its own, killed with it at the end."""
    binary = _moto_binary()
    if binary is None:
        missing("moto", "no moto_server (make infra puts moto[server] into .venv-moto)")
        raise AssertionError("unreachable")
    with tempfile.TemporaryDirectory(prefix="vfed-moto-") as d:
        log_path = Path(d) / "moto.log"
        for _ in range(attempts):
            port = free_port()
            with log_path.open("ab") as log:
                proc = subprocess.Popen(
                    [binary, "-H", "127.0.0.1", "-p", str(port)],
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            try:
                wait_for_port(port, 30, lambda p=proc: p.poll() is None)
            except (RuntimeError, TimeoutError):
                _kill_group(proc)
                continue
            try:
                yield S3Server(port)
            finally:
                _kill_group(proc)
            return
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"moto_server did not start after {attempts} attempts:\n{tail}")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group, SIGKILL after 5 s: nothing moto started outlives the session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
