"""The Docker runtime: the shared contract, plus what only Docker shows (the hardened definition)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import docker
import pytest
from runtime_contract import RuntimeContract, SpecFactory, make_spec, node_name, py
from tests.imagebuild import LABEL as BUILD_LABEL

from vfed.node.runtime import DatasetMount, RunLimits, Runtime, RuntimeUnavailable
from vfed.node.runtime.docker import DockerRuntime, parse_handle
from vfed.node.runtime.docker_config import DockerRuntimeConfig

pytestmark = pytest.mark.docker
__all__ = ["make_spec", "node_name"]  # shared fixtures, used by name

CONFIG = DockerRuntimeConfig(
    memory_bytes=256 << 20, pids_limit=50, nano_cpus=500_000_000, tmpfs_bytes=8 << 20
)
IMAGE = "vfed/base"
"""Built by the test session (tests/imagebuild, which labels it with BUILD_LABEL)."""


@pytest.fixture(autouse=True)
def _engine(docker_client: docker.DockerClient) -> None:
    """Skips (or fails under `make test`) when no Docker engine answers; see tests/conftest.py."""


class TestDockerRuntime(RuntimeContract):
    __test__ = True
    image = IMAGE
    image_label = BUILD_LABEL

    def make_runtime(self) -> Runtime:
        return DockerRuntime(CONFIG)

    def absent_handle(self) -> str:
        return "docker:vfed-nosuchnode-run-nosuchrun"


@pytest.fixture
def run_image() -> str:
    return IMAGE


@pytest.fixture
async def runtime() -> AsyncIterator[DockerRuntime]:
    async with DockerRuntime(CONFIG) as rt:
        yield rt


@pytest.fixture
def proxy_socket(tmp_path: Path) -> Iterator[Path]:
    """A real listening Unix socket (nothing answers on it; these tests only look at the mount)."""
    path = tmp_path / "proxy" / "proxy.sock"
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        sock.listen()
        yield path


async def test_container_is_hardened(
    runtime: DockerRuntime,
    make_spec: SpecFactory,
    proxy_socket: Path,
    tmp_path: Path,
    docker_client: docker.DockerClient,
) -> None:
    data = tmp_path / "data.csv"
    data.write_text("x\n1\n")
    spec = make_spec(
        py("import time; time.sleep(60)"),
        proxy_socket=str(proxy_socket),
        datasets=[DatasetMount(label="d1", host_path=str(data), type="csv")],
        limits=RunLimits(memory_bytes=128 << 20),
    )
    handle = await runtime.start(spec)
    attrs = docker_client.containers.get(parse_handle(handle)).attrs
    host = attrs["HostConfig"]
    assert host["NetworkMode"] == "none" and host["Privileged"] is False
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Init"] is True and host["IpcMode"] == "private"
    assert (host["Memory"], host["MemorySwap"]) == (128 << 20, 128 << 20)  # spec overrides the config
    assert (host["PidsLimit"], host["NanoCpus"]) == (50, 500_000_000)  # config defaults
    assert host["Tmpfs"] == {"/tmp": f"rw,noexec,nosuid,nodev,size={8 << 20}"}
    assert attrs["Config"]["User"] == "10001:10001"
    assert attrs["Config"]["Labels"]["vfed.run_id"] == spec.run_id
    mounts = {m["Destination"]: (m["Type"], m.get("Name") or m["Source"], m["RW"]) for m in attrs["Mounts"]}
    assert mounts == {
        "/mnt/run": ("bind", spec.run_dir, True),
        "/mnt/job": ("volume", f"vfed-{spec.node_name}-job1-tmp", True),
        "/run/vfed": ("bind", str(proxy_socket.parent), False),
        "/mnt/data/d1": ("bind", str(data), False),
    }
    assert attrs["Config"]["Env"].count("PROXY_SOCKET=/run/vfed/proxy.sock") == 1


async def test_host_path_map_names_host_paths(
    make_spec: SpecFactory, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """The agent sees /agent-view/...; Docker must be told the host's path (here: a different folder)."""
    view, host = tmp_path / "agent-view", tmp_path / "host"
    spec = make_spec(py("import os; print(open(os.environ['INPUT_FILE']).read())"), input_text="agent's copy")
    run_name = Path(spec.run_dir).name
    (host / run_name).mkdir(parents=True)
    (host / run_name / "input").write_text("host's copy")
    view.mkdir()
    Path(spec.run_dir).rename(view / run_name)  # noqa: ASYNC240 - test setup
    spec = spec.model_copy(update={"run_dir": str(view / run_name)})
    async with DockerRuntime(CONFIG.model_copy(update={"host_path_map": {str(view): str(host)}})) as rt:
        handle = await rt.start(spec)
        try:
            assert (await rt.wait(handle, timeout_s=60)).exit_code == 0
            assert "host's copy" in await rt.logs(handle)
        finally:
            await rt.cleanup(handle)


async def test_unreachable_engine_is_unavailable(tmp_path: Path) -> None:
    rt = DockerRuntime(DockerRuntimeConfig(base_url=f"unix://{tmp_path}/no-docker.sock"))
    with pytest.raises(RuntimeUnavailable):
        await rt.open()
    await rt.close()


async def test_first_run_of_a_job_owns_its_folder(runtime: DockerRuntime, make_spec: SpecFactory) -> None:
    """A fresh Docker volume belongs to root; concurrent first runs of a job must all be able to write it."""
    code = (
        "import os; open(os.path.join(os.environ['TEMPORARY_FOLDER'], os.environ['RUN_ID']), 'w').write('x')"
    )
    specs = [make_spec(py(code), job_id="fresh") for _ in range(3)]
    handles = await asyncio.gather(*(runtime.start(s) for s in specs))
    statuses = await asyncio.gather(*(runtime.wait(h, timeout_s=60) for h in handles))
    assert [s.exit_code for s in statuses] == [0, 0, 0], [await runtime.logs(h) for h in handles]
