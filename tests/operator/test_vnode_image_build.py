"""`vnode image build` from a pip install, without a checkout: the project wheel is built from this tree,
installed into a fresh virtualenv outside it (from the offline wheelhouse `make images` keeps in
build/wheelhouse), and that installation's `vnode image build` builds the node and algorithm-base images on
the local engine from the Dockerfiles shipped in the wheel, under a test-unique name. The images must run
(`vnode --version`, the algorithm SDK with pandas, as the unprivileged user); they are removed afterwards."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests import infra

ROOT = Path(__file__).resolve().parents[2]
WHEELHOUSE = Path(os.environ.get("VFED_CACHE", ROOT / "build")) / "wheelhouse"
DOCKERFILES = ("base.Dockerfile", "node.Dockerfile", "algorithm-base.Dockerfile")
OFFLINE_BASE = "vfed/debian-python:bookworm"
SHIPPED = [f"vfed/common/image_context/{name}" for name in DOCKERFILES]

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(600)]


@dataclass
class Install:
    """vfed installed from its wheel into a virtualenv outside the checkout, and a wheelhouse without vfed."""

    venv: Path
    wheelhouse: Path
    version: str
    workdir: Path

    def vnode(self, *args: str, timeout_s: float = 480) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "BASE_IMAGE")}
        return subprocess.run(
            [str(self.venv / "bin" / "vnode"), *args],
            cwd=self.workdir,  # not the checkout
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )


def _base_image(client: Any) -> str:
    """The Python base `make images` used: $BASE_IMAGE, python:3.11-slim or the debootstrapped one."""
    import docker.errors

    for name in (os.environ.get("BASE_IMAGE"), "python:3.11-slim", OFFLINE_BASE):
        if not name:
            continue
        try:
            client.images.get(name)
        except docker.errors.ImageNotFound:
            continue
        return name
    infra.missing("docker", "no Python base image on the engine (run: make images)")
    raise AssertionError("unreachable")


def _run(*cmd: str, timeout_s: float = 300) -> str:
    """A command without this session's PYTHONPATH: the installation must answer from its own files."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False, env=env)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory, docker_client: Any) -> Install:
    """Made once for this module's tests (about 25 s)."""
    tmp_path = tmp_path_factory.mktemp("image-build")
    if not any(WHEELHOUSE.glob("*.whl")):
        infra.missing("docker", f"no offline wheelhouse in {WHEELHOUSE} (run: make images)")
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT))
    [wheel] = dist.glob("vfed-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert set(SHIPPED) <= set(zf.namelist()), "the image Dockerfiles are not in the wheel"
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv))
    pip = str(venv / "bin" / "pip")
    _run(pip, "install", "-q", "--no-index", "--find-links", str(WHEELHOUSE), str(wheel))
    # The dependencies only: the project wheel must come from the installed package.
    deps = tmp_path / "wheelhouse"
    deps.mkdir()
    for found in WHEELHOUSE.glob("*.whl"):
        if not found.name.startswith("vfed-"):
            (deps / found.name).symlink_to(found)
    work = tmp_path / "elsewhere"
    work.mkdir()
    python = str(venv / "bin" / "python")
    where = _run(python, "-c", "import vfed.common; print(vfed.common.__file__)")
    assert Path(where.strip()).is_relative_to(venv), where  # the venv's copy, not the checkout's
    version = _run(python, "-c", "import importlib.metadata as m; print(m.version('vfed'))").strip()
    return Install(venv, deps, version, work)


@pytest.fixture
def prefix(docker_client: Any) -> Iterator[str]:
    """A test-unique image name prefix; every image under it is removed afterwards."""
    import docker.errors

    name = f"vfedtest-{secrets.token_hex(4)}/"
    yield name
    for kind in ("algorithm-base", "node", "base"):
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(f"{name}{kind}:t1", force=True)
    left = [t for i in docker_client.images.list() for t in i.tags if t.startswith(name)]
    assert not left, left


def _output(client: Any, image: str, command: list[str], **options: Any) -> str:
    """What a container of the image prints; the container goes with its anonymous volumes (the node
    image declares a VOLUME), which `containers.run(remove=True)` would leave behind."""
    import docker.errors

    container = client.containers.create(image, command, **options)
    volumes = [m["Name"] for m in container.attrs.get("Mounts", []) if m.get("Type") == "volume"]
    try:
        container.start()
        status = container.wait(timeout=120)
        output = container.logs().decode()
        assert status["StatusCode"] == 0, output
        return str(output)
    finally:
        container.reload()
        volumes += [m["Name"] for m in container.attrs.get("Mounts", []) if m.get("Type") == "volume"]
        container.remove(v=True, force=True)
        for name in volumes:
            with pytest.raises(docker.errors.NotFound):
                client.volumes.get(name)


def test_vnode_image_build_from_a_pip_install(install: Install, prefix: str, docker_client: Any) -> None:
    base = _base_image(docker_client)
    args = ["--wheelhouse", str(install.wheelhouse), "--prefix", prefix, "--tag", "t1"]
    if base == OFFLINE_BASE:  # no registry here: the default finds the debootstrapped base `make images` made
        says = f"base image: {base} (built earlier with debootstrap)"
    else:
        args += ["--base-image", base]
        says = f"base image: {base} (present)"
    done = install.vnode("image", "build", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert says in out, out
    assert f"made from the installed vfed {install.version} ({install.venv}" in out, out
    node, algorithm_base = f"{prefix}node:t1", f"{prefix}algorithm-base:t1"
    assert f"built {prefix}base:t1, {node}, {algorithm_base}" in out
    for image in (node, algorithm_base):
        assert docker_client.images.get(image).labels.get("vfed.built-by") == "vnode image build"

    # The node image runs vnode, at the installed version; the Dockerfiles travelled with it.
    version = _output(docker_client, node, ["--version"]).strip()
    assert version == f"vnode, version {install.version}"
    # The agent extracts sql datasets itself (the `sql` extra), without pandas (not in the node image).
    extras = (
        "import importlib.util as u; print([bool(u.find_spec(m)) for m in ('asyncpg', 'pyarrow', 'pandas')])"
    )
    assert _output(docker_client, node, ["-c", extras], entrypoint="python3").strip() == "[True, True, False]"
    script = (
        "import os, pathlib, pandas, vfed.algorithms, vfed.common, vfed.node; "
        "d = pathlib.Path(vfed.common.__file__).parent / 'image_context'; "
        "print(os.getuid(), sorted(p.name for p in d.iterdir()))"
    )
    answer = _output(docker_client, algorithm_base, ["-c", script], entrypoint="python3")
    assert answer.split(" ", 1)[0] == "10001", answer  # algorithms run unprivileged
    assert "'node.Dockerfile'" in answer


def test_vnode_image_build_refuses_bad_input_in_one_line(install: Install, prefix: str) -> None:
    absent = f"{prefix.rstrip('/')}-absent:none"
    cases = [
        (["--wheelhouse", str(install.workdir / "nowhere")], 2, "--wheelhouse"),
        (["--prefix", "Not A Name/"], 2, "not a valid image name"),
        (["--base-image", absent, "--prefix", prefix], 1, f"base image {absent} is not present"),
    ]
    for args, code, says in cases:
        done = install.vnode("image", "build", *args, timeout_s=180)
        assert done.returncode == code, (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and says in lines[0], done.stderr
        assert "Traceback" not in done.stdout + done.stderr


def test_the_algorithm_template_ships_in_the_wheel(install: Install, tmp_path: Path) -> None:
    """`vfed algorithm new` of the pip install (no checkout) writes the template's every file, and its test
    passes with that installation's SDK once the `algorithms` extra is installed, as the command says."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    made = subprocess.run(
        [str(install.venv / "bin" / "vfed"), "algorithm", "new", "shipped", "--dir", str(tmp_path)],
        cwd=install.workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    assert "pip install 'vfed[algorithms]'" in made.stdout  # this installation has no pandas yet
    folder = tmp_path / "shipped"
    assert sorted(p.name for p in folder.iterdir()) == [
        "Dockerfile",
        "README.md",
        "build.sh",
        "data",
        "shipped.py",
        "test_shipped.py",
    ]
    python = str(install.venv / "bin" / "python")
    extra = ("install", "-q", "--no-index", "--find-links", str(install.wheelhouse), "vfed[algorithms]")
    _run(python, "-m", "pip", *extra)
    # pytest is no dependency of vfed (not in the wheelhouse): this session's, beside the installation's vfed
    runner = tmp_path / "pytest-only"
    runner.mkdir()
    for name in ("pytest", "_pytest", "pluggy", "iniconfig", "py.py"):
        (runner / name).symlink_to(Path(pytest.__file__).parents[1] / name)
    tested = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=folder,
        env={**env, "PYTHONPATH": str(runner)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert tested.returncode == 0 and "3 passed" in tested.stdout, tested.stdout + tested.stderr
