"""The server machine's services for the deployment tests: a real PostgreSQL and a real Mosquitto, each run
inside a test's namespace (`tests/deploy/netns.py`), on the fixed ports a deployment would use (the
namespace's ports are its own, so nothing collides with the host or another test).
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests import infra
from tests.deploy.netns import Machine, Network

POSTGRES_PORT = 5432
MQTT_PORT = 1883


def postgres_bindir() -> str:
    """The newest PostgreSQL server binaries (skip, or fail under `make test`, without them)."""
    found = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)), None)
    if found is None:
        infra.missing("postgresql", "no PostgreSQL server binaries (apt-get install postgresql)")
        raise AssertionError("unreachable")
    return found


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None:
        infra.missing("mosquitto", "no mosquitto binary (apt-get install mosquitto)")
        raise AssertionError("unreachable")
    return found


@contextmanager
def postgres(net: Network, machine: Machine, database: str = "vfed") -> Iterator[str]:
    """A fresh cluster listening on the machine's loopback; yields the server's database URL.

    Its folder is a private temporary one outside pytest's tmp_path (PostgreSQL refuses to run as root, and
    the `postgres` account cannot enter root's pytest folders); it is removed at the end like everything else.
    """
    bindir = postgres_bindir()
    tmp = Path(tempfile.mkdtemp(prefix="vfed-deploy-pg-"))
    data, sock = tmp / "data", tmp / "sock"
    as_postgres = infra._as_postgres_user  # runuser -u postgres when root
    try:
        data.mkdir()
        sock.mkdir()
        for path in (tmp, data, sock):
            shutil.chown(path, "postgres")
        subprocess.run(
            as_postgres([f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"]),
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = f"-p {POSTGRES_PORT} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg_ctl = [f"{bindir}/pg_ctl", "-D", str(data), "-l", str(tmp / "pg.log"), "-w", "-t", "60"]
        started = net.run(machine, as_postgres([*pg_ctl, "-o", options, "start"]))
        assert started.returncode == 0, started.stdout + started.stderr + _tail(tmp / "pg.log")
        psql = ["psql", "-h", "127.0.0.1", "-p", str(POSTGRES_PORT), "-U", "postgres", "-d", "postgres"]
        created = net.run(machine, [*psql, "-q", "-c", f'CREATE DATABASE "{database}"'])
        assert created.returncode == 0, created.stderr
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{POSTGRES_PORT}/{database}"
    finally:
        subprocess.run(
            as_postgres([f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
            check=False,
            timeout=60,
        )
        shutil.rmtree(tmp, ignore_errors=True)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def start_mosquitto(
    net: Network, machine: Machine, config: Path, log: Path, port: int = MQTT_PORT
) -> subprocess.Popen[bytes]:
    """Mosquitto with this configuration on the machine, up once it accepts connections on `port`."""
    proc = net.start(machine, [mosquitto_binary(), "-c", str(config)], log)
    probe = net.run(
        machine,
        ["python3", "-c", _WAIT_PORT, machine.address, str(port)],
        timeout_s=30,
    )
    assert probe.returncode == 0 and proc.poll() is None, f"mosquitto did not start:\n{_tail(log)}"
    return proc


_WAIT_PORT = """
import socket, sys, time
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(1)
"""
