"""Machines for one test: Linux network namespaces joined by veth pairs on a bridge, addresses from
198.18.0.0/15.

Why: issue 18 deploys the server, the nodes and the researcher on different machines. A network namespace is
a machine's network as far as a program can tell (its own interfaces, loopback, addresses and ports), so one
test can put each party on a "machine" of its own and let them meet only through the addresses they would use
across a real network. The bridge lives in a namespace of its own too and every veth end is created directly
inside a test namespace: the host's own network is never touched, and 198.18.0.0/15 (set aside for benchmark
networks) exists only inside these namespaces, so no packet can leave the machine. The filesystem and Unix
sockets are shared: a node agent in a namespace still drives the host's Docker engine through
/var/run/docker.sock, and its algorithm containers (no network of their own) reach the run's proxy socket.

Every namespace, and every process started in one, goes when the test ends, on every exit path: processes
are stopped by their ids (those the test started, then whatever `ip netns pids` still finds in the test's own
namespaces, e.g. a daemonized PostgreSQL), then the namespaces are deleted (their veth ends and the bridge
with them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests import infra

NETWORK_PREFIX = "198.18.0"
"""A /24 of 198.18.0.0/15; every test's namespaces are separate networks, so tests may use the same one."""
PREFIX_LEN = 24


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def can_make_namespaces() -> str | None:
    """None when this process can make and delete a network namespace; else why not (for the skip line)."""
    if shutil.which("ip") is None:
        return "no `ip` command (apt-get install iproute2)"
    probe = f"vfed-probe-{uuid.uuid4().hex[:8]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip() or made.returncode}"
    gone = _ip("netns", "del", probe, check=False)
    if gone.returncode != 0:
        return f"`ip netns del` failed: {gone.stderr.strip()}"
    return None


@dataclass(frozen=True)
class Machine:
    """One party's machine: a namespace with one interface on the test's bridge."""

    role: str
    netns: str
    address: str

    def argv(self, *command: str) -> list[str]:
        """The command as run on this machine."""
        return ["ip", "netns", "exec", self.netns, *command]


@dataclass
class Network:
    """The test's namespaces on one bridge; `machine` adds one, `close` removes everything."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    machines: dict[str, Machine] = field(default_factory=dict)
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)
    _switch: str | None = None

    def _new_namespace(self, role: str) -> str:
        name = f"vfed-{self.tag}-{role}"
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def machine(self, role: str, host: int) -> Machine:
        """A namespace with address 198.18.0.<host>/24 on eth0, its peer plugged into the bridge."""
        if self._switch is None:
            self._switch = self._new_namespace("sw")
            _ip("-n", self._switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self._switch, "link", "set", "br0", "up")
        netns = self._new_namespace(role)
        port = f"p-{role}"[:15]
        _ip("-n", self._switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("-n", self._switch, "link", "set", port, "master", "br0")
        _ip("-n", self._switch, "link", "set", port, "up")
        address = f"{NETWORK_PREFIX}.{host}"
        _ip("-n", netns, "addr", "add", f"{address}/{PREFIX_LEN}", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        found = Machine(role, netns, address)
        self.machines[role] = found
        return found

    def start(
        self, machine: Machine, command: Sequence[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """A long-running process on the machine, its output appended to log; stopped by close()."""
        with log.open("ab") as out:
            proc = subprocess.Popen(
                machine.argv(*command),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        self._processes.append(proc)
        return proc

    def run(
        self,
        machine: Machine,
        command: Sequence[str],
        *,
        input: str | None = None,
        timeout_s: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """One command on the machine, to its end (output captured; the exit code is the caller's)."""
        return subprocess.run(
            machine.argv(*command),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            env={**os.environ, **(env or {})},
        )

    def close(self) -> None:
        """Stop the processes, then delete the namespaces (the veths and the bridge go with them)."""
        for proc in reversed(self._processes):
            _stop(proc)
        for netns in self._namespaces:
            _kill_namespace_pids(netns)
        for netns in reversed(self._namespaces):
            _ip("netns", "del", netns, check=False)
        self._namespaces.clear()
        self._processes.clear()

    def namespaces(self) -> list[str]:
        """The test's namespaces still there (for the test's own leak check)."""
        listed = _ip("netns", "list").stdout.split()
        return [n for n in listed if n.startswith(f"vfed-{self.tag}-")]


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _kill_namespace_pids(netns: str, timeout_s: float = 10.0) -> None:
    """Whatever still runs in one of the test's own namespaces (started by the test: nothing else enters
    them): SIGTERM, then SIGKILL after a grace period."""

    def pids() -> list[int]:
        found = _ip("netns", "pids", netns, check=False).stdout.split()
        return [int(p) for p in found if p.isdigit()]

    left = pids()
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = pids()
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def network() -> Iterator[Network]:
    """A Network for one test; skips (fails under `make test`) when namespaces cannot be made here."""
    why = can_make_namespaces()
    if why is not None:
        infra.missing("netns", why)
    net = Network()
    try:
        yield net
    finally:
        net.close()
