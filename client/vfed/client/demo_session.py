"""What one `vfed demo` started, and its removal however the demo ends (done, failed, or Ctrl-C).

The demo's processes (the server, the node agents) each run in a session of their own: a Ctrl-C in the
terminal reaches the demo alone, which then stops them in order (SIGTERM to each process group, so the
server's embedded broker goes too), removes the containers and volumes its nodes made on the Docker engine,
and its work folder when it made that folder itself. The children's configuration, data, cache and
temporary folders all lie in the work folder: nothing is written to the user's own config or data folders.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

STOP_GRACE_S = 30


class DemoError(Exception):
    """A reason the demo cannot go on, in one line for the user."""


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP: the demo stops as on Ctrl-C and exits 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stopped(signum: int, _frame: object) -> None:
    raise Stopped(signum)


def listen() -> None:
    """Ctrl-C raises KeyboardInterrupt (even when the demo was started with SIGINT ignored, as a shell
    without job control starts background commands), SIGTERM and SIGHUP raise Stopped."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stopped)


def shield() -> None:
    """While the demo cleans up: a second Ctrl-C (or SIGTERM) must not cut the clean-up short."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def restore() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


class Session:
    """The demo's work folder, child processes and node names."""

    def __init__(self, work_dir: Path | None) -> None:
        self.temporary = work_dir is None
        self.tag = secrets.token_hex(3)  # in the node names: two demos on one engine stay apart
        if work_dir is None:
            self.work = Path(tempfile.mkdtemp(prefix="vfed-demo-"))
        else:
            self.work = work_dir.resolve()
            shutil.rmtree(self.work, ignore_errors=True)
            self.work.mkdir(parents=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.nodes: list[str] = []
        for sub in ("config", "data", "cache", "tmp", "client"):
            (self.work / sub).mkdir(exist_ok=True)
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "XDG_CONFIG_HOME": str(self.work / "config"),  # where `vnode NAME` finds the demo's nodes
            "XDG_DATA_HOME": str(self.work / "data"),
            "XDG_CACHE_HOME": str(self.work / "cache"),
            "TMPDIR": str(self.work / "tmp"),  # the agents' job folders (runtime.jobs_dir's default)
            "VFED_CONFIG_DIR": str(self.work / "client"),
        }
        for name in ("VFED_KEY_FILE", "VFED_TOKEN", "VFED_TRUST", "VFED_TRUST_FILE"):
            self.env.pop(name, None)

    def start(self, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        """A child in a session of its own, its output appended to `log`."""
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def stop_processes(self) -> None:
        """SIGTERM to each child's process group, the agents first and the server last; SIGKILL after
        the grace."""
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # what the child left in its group (the server's embedded broker)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()

    def remove_engine_objects(self) -> None:
        """The algorithm containers (label vfed.node=<node>) and volumes (vfed-<node>-...) of the demo's
        nodes."""
        if not self.nodes:
            return
        import docker
        import docker.errors

        try:
            engine = docker.from_env(timeout=60)
        except docker.errors.DockerException:
            return  # no engine: nothing of ours on it
        try:
            for node in self.nodes:
                for container in engine.containers.list(all=True, filters={"label": f"vfed.node={node}"}):
                    with contextlib.suppress(docker.errors.NotFound):
                        container.remove(force=True, v=True)
            for volume in engine.volumes.list():
                name = str(volume.name)
                if any(name.startswith(f"vfed-{node}-") for node in self.nodes):
                    with contextlib.suppress(docker.errors.NotFound):
                        volume.remove(force=True)
        finally:
            engine.close()

    def close(self) -> None:
        """Everything the demo started is stopped and removed; a work folder it made itself, too."""
        self.stop_processes()
        self.remove_engine_objects()
        if self.temporary:
            shutil.rmtree(self.work, onerror=_writable_and_retry)


def _writable_and_retry(func: Any, path: str, _exc: Any) -> None:
    """A folder the algorithm's user left without write permission for us: make it writable, try again."""
    with contextlib.suppress(OSError):
        os.chmod(os.path.dirname(path), 0o700)
        func(path)
