"""`vfed demo` from an installed package, run by a user who is not root: the project wheel is built from this
tree and installed (with its `algorithms` extra) into a fresh virtualenv outside the checkout from the offline
wheelhouse `make images` keeps in build/wheelhouse; a throw-away user in the group of the Docker socket, with
a clean home and temporary folder, runs it from a folder of its own. Whether it ends by itself or is stopped
(Ctrl-C while a run goes, SIGTERM), nothing of it is left: no container or volume of its nodes, no process of
that user, nothing in its temporary folder.

The example image the demo builds when none is there is built once here from the installed package's files,
on the shared algorithm-base, under this module's own name (the shared images stay as they are); the run to
the end uses it (`--image`), the stopped runs the shared example image a plain `vfed demo` finds. A user who
is not root, without images or a base, gets one line saying what to do."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from tests import infra

ROOT = Path(__file__).resolve().parents[2]
WHEELHOUSE = Path(os.environ.get("VFED_CACHE", ROOT / "build")) / "wheelhouse"
SYSTEM_PYTHON = Path("/usr/bin/python3")  # a Python every user may run (the dev venv's lives under /root)
SOCKET = Path("/var/run/docker.sock")
SHIPPED = ("vfed/client/demo_context/Dockerfile", "vfed/client/demo_context/summary_stats.py")
DEMO_TIMEOUT_S = 600

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1500)]


@dataclass
class Installed:
    """vfed in a fresh virtualenv, and a user who is not root and may use Docker."""

    root: Path
    venv: Path
    user: str
    uid: int
    gid: int
    groups: list[int]
    home: Path

    def env(self, tmp: Path) -> dict[str, str]:
        return {
            "HOME": str(self.home),
            "USER": self.user,
            "LOGNAME": self.user,
            "PATH": f"{self.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "TMPDIR": str(tmp),
        }

    def fresh_tmp(self) -> Path:
        tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir=self.home))
        os.chown(tmp, self.uid, self.gid)
        return tmp

    def demo(self, tmp: Path, *args: str, ignore_sigint: bool = False) -> subprocess.Popen[str]:
        """`vfed demo` as the user, from a folder of its own (not the checkout). `ignore_sigint`: started as
        a shell without job control starts a background command (SIGINT ignored, which a child inherits);
        the demo must still hear Ctrl-C."""
        before = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignore_sigint else None
        try:
            return subprocess.Popen(
                [str(self.venv / "bin" / "vfed"), "demo", *args],
                cwd=self.home / "elsewhere",
                env=self.env(tmp),
                user=self.uid,
                group=self.gid,
                extra_groups=self.groups,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        finally:
            if before is not None:
                signal.signal(signal.SIGINT, before)


def _run(*cmd: str, timeout_s: float = 600) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _socket_group() -> grp.struct_group:
    """The group that may use the Docker socket (`docker`)."""
    gid = SOCKET.stat().st_gid
    if gid == 0:
        infra.missing(
            "docker", f"{SOCKET} belongs to group root: no group lets a user who is not root use it"
        )
    return grp.getgrgid(gid)


@pytest.fixture(scope="module")
def installed(docker_client: Any) -> Iterator[Installed]:
    """Made once for this module (a minute or two): the wheel, the virtualenv, the user."""
    if os.geteuid() != 0:
        infra.missing("docker", "making a user who is not root needs root")
    if not any(WHEELHOUSE.glob("*.whl")):
        infra.missing("docker", f"no offline wheelhouse in {WHEELHOUSE} (run: make images)")
    if not SYSTEM_PYTHON.exists():
        infra.missing("docker", f"no {SYSTEM_PYTHON} for a virtualenv every user may run")
    if not SOCKET.is_socket():
        infra.missing("docker", f"no Docker socket at {SOCKET}")
    group = _socket_group()
    root = Path(tempfile.mkdtemp(prefix="vfed-demo-test-"))
    root.chmod(0o755)  # the user runs the virtualenv's files
    user = f"vfeddemo{secrets.token_hex(3)}"
    made_user = False
    try:
        dist = root / "dist"
        _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT))
        [wheel] = dist.glob("vfed-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            assert set(SHIPPED) <= set(zf.namelist()), "the demo's example is not in the wheel"
        venv = root / "venv"
        _run(str(SYSTEM_PYTHON), "-m", "venv", str(venv))
        pip = str(venv / "bin" / "pip")
        _run(pip, "install", "-q", "--no-index", "--find-links", str(WHEELHOUSE), f"{wheel}[algorithms]")
        home = root / "home"
        _run(
            "useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/bin/sh", "--user-group", user
        )
        made_user = True
        info = pwd.getpwnam(user)
        (home / "elsewhere").mkdir(parents=True)
        for path in (home, home / "elsewhere"):
            os.chown(path, info.pw_uid, info.pw_gid)
        home.chmod(0o700)
        yield Installed(root, venv, user, info.pw_uid, info.pw_gid, [group.gr_gid], home)
    finally:
        if made_user:
            uid = pwd.getpwnam(user).pw_uid
            for proc in _processes_of(uid):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            _run("userdel", user)
            with contextlib.suppress(KeyError):  # its own group goes with it (USERGROUPS_ENAB)
                grp.getgrnam(user)
                _run("groupdel", user)
        shutil.rmtree(root)


def _processes_of(uid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["uids"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["uids"] and proc.info["uids"].real == uid:
                found.append(proc)
    return found


def _nodes(stdout: str) -> list[str]:
    """The demo's node names, from its line `node agents started: A, B, C (...)`."""
    for line in stdout.splitlines():
        if "node agents started: " in line:
            names = line.split("node agents started: ", 1)[1].split(" (", 1)[0]
            return [n.strip() for n in names.split(",")]
    raise AssertionError(f"no `node agents started` line:\n{stdout}")


def _assert_nothing_left(install: Installed, docker_client: Any, nodes: list[str], tmp: Path) -> None:
    assert len(nodes) == 3 and all(n.startswith("demo-") for n in nodes), nodes
    for node in nodes:
        containers = docker_client.containers.list(all=True, filters={"label": f"vfed.node={node}"})
        assert not containers, [c.name for c in containers]
    volumes = [
        v.name for v in docker_client.volumes.list() if any(v.name.startswith(f"vfed-{n}-") for n in nodes)
    ]
    assert not volumes, volumes
    deadline = time.monotonic() + 10  # a process the demo reaped may still show for a moment
    while _processes_of(install.uid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_of(install.uid), [p.cmdline() for p in _processes_of(install.uid)]
    assert list(tmp.iterdir()) == [], list(tmp.iterdir())


def _read_until(proc: subprocess.Popen[str], needle: str, timeout_s: float) -> str:
    """The demo's standard output up to and including the first line containing `needle`."""
    assert proc.stdout is not None
    out = ""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while needle not in out:
            left = deadline - time.monotonic()
            assert left > 0, f"no {needle!r} within {timeout_s} s:\n{out}"
            if sel.select(left):
                line = proc.stdout.readline()
                assert line, f"the demo ended before {needle!r} (exit {proc.wait()}):\n{out}"
                out += line
    return out


def test_vfed_demo_from_an_installed_package_as_a_user(
    installed: Installed, own_image: tuple[str, str], docker_client: Any
) -> None:
    """To the end, with the example image built from this installation (the shared one may come from another
    branch's tree); the stop tests below use the shared one, as a plain `vfed demo` finds it."""
    _, image = own_image
    tmp = installed.fresh_tmp()
    proc = installed.demo(tmp, "--image", image)
    try:
        stdout, stderr = proc.communicate(timeout=DEMO_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"{stdout}\n{stderr}"
    assert f"algorithm image {image} (--image)" in stdout, stdout
    assert "federated result equals the pooled computation: yes" in stdout, stdout
    assert json.loads(stdout.strip().splitlines()[-1]) == {"organizations": [1, 2, 3]}
    assert "Traceback" not in stdout + stderr
    _assert_nothing_left(installed, docker_client, _nodes(stdout), tmp)
    # nothing written to the user's own folders, nor where it ran
    home = [
        p.name for p in installed.home.iterdir() if p.name != "elsewhere" and not p.name.startswith("tmp-")
    ]
    assert home == [], home
    assert list((installed.home / "elsewhere").iterdir()) == []


def _wait_for_a_run(proc: subprocess.Popen[str], docker_client: Any, nodes: list[str]) -> None:
    deadline = time.monotonic() + 300
    running = [{"label": f"vfed.node={n}", "status": "running"} for n in nodes]
    while not any(docker_client.containers.list(filters=f) for f in running):
        assert proc.poll() is None, f"the demo ended (exit {proc.returncode}) before a run started"
        assert time.monotonic() < deadline, "no algorithm container ran within 300 s"
        time.sleep(0.2)


@pytest.mark.parametrize(
    ("signum", "code", "mid_run"),
    [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)],
    ids=["ctrl-c-while-a-run-goes", "sigterm-once-the-agents-started"],
)
def test_a_stopped_demo_removes_all_it_made(
    installed: Installed, docker_client: Any, signum: int, code: int, mid_run: bool
) -> None:
    tmp = installed.fresh_tmp()
    proc = installed.demo(tmp, ignore_sigint=True)
    try:
        out = _read_until(proc, "node agents started: ", timeout_s=DEMO_TIMEOUT_S)
        assert "algorithm image vfed-examples/summary_stats:latest (present)" in out, out
        nodes = _nodes(out)
        if mid_run:  # while an algorithm container runs: the demo's clean-up must remove it
            _wait_for_a_run(proc, docker_client, nodes)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, f"{out}{stdout}\n{stderr}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vfed: demo interrupted"), stderr
    assert "its files too" in lines[0], lines[0]
    assert "Traceback" not in stdout
    _assert_nothing_left(installed, docker_client, nodes, tmp)


def _installed_python(installed: Installed, script: str) -> str:
    """A script run by the installed package's Python, as root (it builds an image), outside the checkout."""
    done = subprocess.run(
        [str(installed.venv / "bin" / "python"), "-c", script],
        cwd=installed.root,
        env={"PATH": "/usr/bin:/bin", "HOME": str(installed.root), "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def own_image(installed: Installed, docker_client: Any) -> Iterator[tuple[str, str]]:
    """The demo's example image as `vfed demo` builds it when none is there: from the installed package's
    files, on the shared algorithm-base, under this module's own name (removed afterwards). Answers the
    folder the example came from and the image."""
    import docker.errors

    image = f"vfed-test-tmp-{secrets.token_hex(3)}/summary_stats:t1"
    script = (
        "import docker; from vfed.client import demo_images as d; "
        "print(d.example_context()); "
        f"print(d.build_example(docker.from_env(), 'vfed/algorithm-base:latest', {image!r}))"
    )
    try:
        # the first line and the last: the builder says what it builds in between
        context, *_, built = _installed_python(installed, script).strip().splitlines()
        assert built == image
        yield context, image
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(image, force=True)
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(image)


def test_the_demo_image_builds_from_the_installed_package(
    installed: Installed, own_image: tuple[str, str], docker_client: Any
) -> None:
    context, image = own_image
    assert Path(context).is_relative_to(installed.venv), context  # the wheel's copy, not the checkout's
    manifest = json.loads(docker_client.images.get(image).labels["vfed.manifest"])
    assert manifest["functions"]["summary"]["kind"] == "central", manifest
    assert manifest["functions"]["partial_stats"]["kind"] == "federated", manifest
    for left in docker_client.images.list():
        assert not [t for t in left.tags if t.startswith(f"{image}-stage")], left.tags


def test_without_images_or_base_a_user_is_told_what_to_do(installed: Installed) -> None:
    absent = f"vfed-test-tmp-{secrets.token_hex(3)}/absent"
    script = (
        "import docker; from vfed.client import demo_images as d\n"
        "from vfed.client.demo_session import DemoError\n"
        "e = docker.from_env()\n"
        "for asked in (None, '" + absent + ":asked'):\n"
        "    try:\n"
        "        d.python_base(e, asked, False, ('" + absent + ":registry', '" + absent + ":offline'))\n"
        "    except DemoError as exc:\n"
        "        print(exc)\n"
        "print(d.python_base(e, None, True, ('" + absent + ":registry', '" + absent + ":offline')))\n"
    )
    no_base, asked, as_root = _installed_python(installed, script).strip().splitlines()
    for line in (no_base, asked):
        assert "`make images` as root" in line and "`vnode image build --base-image IMAGE`" in line, line
    assert f"{absent}:registry cannot be pulled" in no_base and "needs root" in no_base, no_base
    assert f"the base image {absent}:asked (BASE_IMAGE) is not present and cannot be pulled" in asked, asked
    assert as_root == "None"  # root may bootstrap one: `vnode image build` does, without --base-image
