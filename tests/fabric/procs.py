"""Processes of a test Fabric network: long-running servers and one-shot CLI calls, each in its own session.

A server or CLI that outlives its test would hold ports and files for the next one, so every process runs as
the leader of a new session and is stopped by signalling its whole process group.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

LOG_TAIL_CHARS = 3000

# Variables that configure Fabric binaries and fabric-shim: a value inherited from the developer's shell would
# silently override what the fixture sets up.
_SCRUBBED_PREFIXES = ("CORE_", "ORDERER_", "FABRIC_", "CONFIGTX_", "OSNADMIN_", "CHAINCODE_")


class FabricError(Exception):
    """Something in the test Fabric network went wrong."""


class FabricStartError(FabricError):
    """A network process did not start or become ready; the message ends with the tail of its log."""


class PeerCommandError(FabricError):
    """A Fabric CLI call failed; ``message`` is the CLI's own error line (``Error: ...``)."""

    def __init__(self, step: str, returncode: int, message: str, output: str) -> None:
        super().__init__(f"{step} failed (exit {returncode}): {message}")
        self.step = step
        self.returncode = returncode
        self.message = message
        self.output = output


class TransactionInvalid(PeerCommandError):
    """The transaction was ordered but every peer marked it invalid, e.g. ``ENDORSEMENT_POLICY_FAILURE``."""

    def __init__(self, step: str, returncode: int, message: str, output: str, status: str) -> None:
        super().__init__(step, returncode, message, output)
        self.status = status


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The current environment without Fabric settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env.update(extra)
    return env


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-chars:]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on loopback right now (all held open while choosing)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


class Server:
    """A long-running Fabric or chaincode process, its output in ``log``."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log

    @classmethod
    def spawn(cls, name: str, argv: Sequence[str], env: Mapping[str, str], log: Path, cwd: Path) -> Server:
        """Start ``argv`` as the leader of a new session, stdout and stderr appended to ``log``."""
        with log.open("ab") as out:
            proc = subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(name, proc, log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def failure(self, what: str) -> FabricStartError:
        return FabricStartError(f"{self.name}: {what}; last lines of {self.log}:\n{log_tail(self.log)}")

    def wait_ready(self, ports: Sequence[int], healthz_port: int | None, timeout_s: float) -> None:
        """Ready means ``/healthz`` answers 200 *and* every port accepts: Fabric's health check passes a
        moment before its gRPC and admin listeners do."""
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{healthz_port}/healthz" if healthz_port is not None else None
        healthy = url is None
        pending = list(ports)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.failure(f"exited with code {self.proc.returncode} before it was ready")
            if not healthy and url is not None:
                healthy = _healthy(url)
            pending = [p for p in pending if not port_accepts(p)]
            if healthy and not pending:
                return
            time.sleep(0.05)
        raise self.failure(
            f"not ready after {timeout_s} s (healthz ok: {healthy}, ports not accepting: {pending})"
        )

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``: nothing of it is left on return."""
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            self.proc.wait()
        # A child that ignored SIGTERM keeps the group (and so this id) alive after its leader exited.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


@dataclass(frozen=True)
class Cli:
    """One Fabric CLI call to make: what it is for (in errors), its argv and environment."""

    step: str
    argv: Sequence[str]
    env: Mapping[str, str]


_ERROR_LINE = re.compile(r"^Error: (.*)$", re.MULTILINE)
_INVALID = re.compile(r"transaction invalidated with status \((\w+)\)")


def _error_of(call: Cli, returncode: int, output: str) -> PeerCommandError:
    lines = _ERROR_LINE.findall(output)
    message = lines[-1] if lines else (output.strip().splitlines() or ["(no output)"])[-1]
    invalid = _INVALID.search(message)
    if invalid:
        return TransactionInvalid(call.step, returncode, message, output, invalid.group(1))
    return PeerCommandError(call.step, returncode, message, output)


@dataclass(frozen=True)
class CliResult:
    stdout: str
    stderr: str


def run_all(calls: Sequence[Cli], logdir: Path, timeout_s: float = 60.0) -> list[CliResult]:
    """Run the calls at once (they are independent, e.g. one per org) and return each one's output.

    Output goes to files in ``logdir`` (kept for the post-mortem), so a chatty call cannot block on a full
    pipe while another is being waited for. The first failure raises after all calls have ended.
    """
    started: list[tuple[Cli, subprocess.Popen[bytes], Path, Path]] = []
    try:
        for call in calls:
            stem = logdir / f"{time.monotonic_ns()}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', call.step)}"
            out, err = Path(f"{stem}.out"), Path(f"{stem}.err")
            with out.open("wb") as o, err.open("wb") as e:
                proc = subprocess.Popen(
                    list(call.argv),
                    env=dict(call.env),
                    stdin=subprocess.DEVNULL,
                    stdout=o,
                    stderr=e,
                    start_new_session=True,
                )
            started.append((call, proc, out, err))
        deadline = time.monotonic() + timeout_s
        for call, proc, _, _ in started:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise PeerCommandError(call.step, -1, f"no answer after {timeout_s} s", "") from exc
    finally:
        for _, proc, _, _ in started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    results = []
    for call, proc, out, err in started:
        result = CliResult(out.read_text(errors="replace"), err.read_text(errors="replace"))
        if proc.returncode != 0:
            raise _error_of(call, proc.returncode, result.stdout + result.stderr)
        results.append(result)
    return results


def run(call: Cli, logdir: Path, timeout_s: float = 60.0) -> CliResult:
    return run_all([call], logdir, timeout_s)[0]


def stop_all(servers: Sequence[Server], grace_s: float = 10.0) -> None:
    """Stop servers together: SIGTERM every group first, so the grace periods overlap."""
    for server in servers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for server in servers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(max(0.0, deadline - time.monotonic()))
        server.stop(grace_s=0.0)


_PACKAGE_ID = re.compile(r"Chaincode code package identifier: (\S+)")
_PAYLOAD = re.compile(r'payload:"((?:[^"\\]|\\.)*)"')
_HEIGHT = re.compile(r'"height":(\d+)')
_ESCAPES = {"n": b"\n", "r": b"\r", "t": b"\t", '"': b'"', "'": b"'", "\\": b"\\"}


def installed_package_id(result: CliResult) -> str:
    found = _PACKAGE_ID.search(result.stderr + result.stdout)
    if not found:
        raise FabricError(f"peer lifecycle chaincode install printed no package id:\n{result.stderr[-2000:]}")
    return found.group(1)


def channel_height(result: CliResult) -> int:
    found = _HEIGHT.search(result.stdout)
    if not found:
        raise FabricError(f"peer channel getinfo printed no height: {result.stdout!r}")
    return int(found.group(1))


def invoke_payload(result: CliResult) -> str:
    """The response payload the peer CLI logs after a successful invoke, in protobuf text format."""
    found = _PAYLOAD.search(result.stderr)
    return _unescape(found.group(1)) if found else ""


def _unescape(text: str) -> str:
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] != "\\":
            out += text[i].encode()
            i += 1
        elif text[i + 1] in _ESCAPES:
            out += _ESCAPES[text[i + 1]]
            i += 2
        elif text[i + 1] == "x":
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:  # three octal digits
            out.append(int(text[i + 1 : i + 4], 8))
            i += 4
    return out.decode(errors="replace")
