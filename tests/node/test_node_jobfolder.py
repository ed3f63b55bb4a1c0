"""The job's temporary volume is a local volume bound to an agent-owned folder (no archive call on start).

What docs/security.md promises of it: runs of the job share `tmp`, an algorithm cannot swap or add to the
volume's root, removal takes the folder along without following links left in it, and a plain volume an older
agent left under the same name is replaced rather than used.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import pytest

from vfed.node.runtime import RunSpec, algorithm_env
from vfed.node.runtime.base import RuntimeUnavailable, job_volume_name
from vfed.node.runtime.docker import DockerRuntime
from vfed.node.runtime.docker_config import DockerRuntimeConfig
from vfed.node.runtime.engine_http import EngineHttp, unix_socket

pytestmark = pytest.mark.docker

PROBE = """
import json, os
tmp = os.environ["TEMPORARY_FOLDER"]
seen = sorted(os.listdir(tmp))
open(os.path.join(tmp, os.environ["RUN_ID"]), "w").write("x")
if not seen:
    os.symlink(os.environ["CANARY"], os.path.join(tmp, "link"))  # a host folder, for the agent's rmtree
tries = {}
for name, step in {
    "rename-tmp": lambda: os.rename(tmp, "/mnt/job/moved"),
    "add-to-root": lambda: open("/mnt/job/planted", "w").write("x"),
    "chmod-root": lambda: os.chmod("/mnt/job", 0o777),
}.items():
    try:
        step()
        tries[name] = "ok"
    except OSError as exc:
        tries[name] = exc.strerror
open(os.environ["OUTPUT_FILE"], "w").write(json.dumps([seen, tries]))
"""


@pytest.fixture
async def runtime(tmp_path: Path, docker_client: docker.DockerClient) -> AsyncIterator[DockerRuntime]:
    config = DockerRuntimeConfig(memory_bytes=256 << 20, jobs_dir=str(tmp_path / "jobs"))
    async with DockerRuntime(config) as rt:
        yield rt


def spec_for(tmp_path: Path, node: str, job_id: str) -> RunSpec:
    run_id = uuid.uuid4().hex[:10]
    run_dir = tmp_path / f"run-{run_id}"
    run_dir.mkdir()
    (run_dir / "input").write_text("x")
    env = algorithm_env(run_id=run_id, job_id=job_id, organization_id="1", datasets=[], with_proxy=False)
    return RunSpec(
        run_id=run_id,
        job_id=job_id,
        node_name=node,
        organization_id="1",
        image="vfed/base",
        env={**env, "CANARY": str(tmp_path / "canary")},
        run_dir=str(run_dir),
        command=["python3", "-c", PROBE],
    )


def exists(path: Path) -> bool:
    return path.exists()


async def run_once(runtime: DockerRuntime, spec: RunSpec) -> str:
    handle = await runtime.start(spec)
    status = await runtime.wait(handle, timeout_s=60)
    logs = await runtime.logs(handle)
    await runtime.cleanup(handle)
    assert status.exit_code == 0, logs
    return (Path(spec.run_dir) / "output").read_text()


async def test_job_folder_is_shared_by_its_runs_and_only_tmp_is_theirs(
    runtime: DockerRuntime, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    node = f"t{uuid.uuid4().hex[:8]}"
    (tmp_path / "canary").mkdir()
    (tmp_path / "canary" / "keep").write_text("host file")
    first, second = spec_for(tmp_path, node, "j1"), spec_for(tmp_path, node, "j1")
    out1 = await run_once(runtime, first)
    out2 = await run_once(runtime, second)
    seen1, tries1 = json.loads(out1)
    seen2, tries2 = json.loads(out2)
    assert seen1 == [] and seen2 == sorted([first.run_id, "link"])
    assert set(tries1) == {"rename-tmp", "add-to-root", "chmod-root"}
    assert "ok" not in tries1.values() and "ok" not in tries2.values(), (tries1, tries2)

    folder = tmp_path / "jobs" / node / "j1"
    volume = docker_client.volumes.get(job_volume_name(node, "j1"))
    assert volume.attrs["Options"] == {"type": "none", "o": "bind", "device": str(folder)}
    root, tmp = os.lstat(folder), os.lstat(folder / "tmp")
    assert (stat.S_IMODE(root.st_mode), root.st_uid) == (0o755, os.geteuid())
    expected_tmp = (0o700, 10001) if os.geteuid() == 0 else (0o777, os.geteuid())
    assert (stat.S_IMODE(tmp.st_mode), tmp.st_uid) == expected_tmp
    assert await runtime.list_job_volumes(node) == ["j1"]

    await runtime.remove_job_volume(node, "j1")
    assert not exists(folder) and exists(tmp_path / "canary" / "keep")  # the link was not followed
    assert await runtime.list_job_volumes(node) == []
    with pytest.raises(docker.errors.NotFound):
        docker_client.volumes.get(job_volume_name(node, "j1"))


async def test_a_plain_volume_of_the_same_name_is_replaced(
    runtime: DockerRuntime, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    node = f"t{uuid.uuid4().hex[:8]}"
    docker_client.volumes.create(job_volume_name(node, "old"))  # what an older agent made
    try:
        await run_once(runtime, spec_for(tmp_path, node, "old"))
        options = docker_client.volumes.get(job_volume_name(node, "old")).attrs["Options"]
        assert options["device"] == str(tmp_path / "jobs" / node / "old")
    finally:
        await runtime.remove_job_volume(node, "old")


def test_the_loop_path_is_for_unix_sockets_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    assert unix_socket(None) == "/var/run/docker.sock"
    assert unix_socket("unix:///run/user/1000/docker.sock") == "/run/user/1000/docker.sock"
    assert unix_socket("tcp://10.0.0.2:2376") is None
    monkeypatch.setenv("DOCKER_HOST", "ssh://admin@host")
    assert unix_socket(None) is None


async def test_an_engine_that_does_not_answer_is_unavailable(tmp_path: Path) -> None:
    engine = EngineHttp(str(tmp_path / "no.sock"), "1.41")
    try:
        with pytest.raises(RuntimeUnavailable, match="unreachable"):
            await engine.create_volume("vfed-x-1-tmp", {"type": "none"}, {})
    finally:
        await engine.close()
