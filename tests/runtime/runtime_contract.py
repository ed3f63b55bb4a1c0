"""The runtime contract, written once: every runtime's test module subclasses RuntimeContract.

The runtime under test supplies what the contract cannot know, through a small protocol (RuntimeTarget): a new
unopened runtime, an image it can start, a label that image carries, and a handle of its form that names no
run. A subclass sets `__test__ = True` and those; every test here is runtime-neutral. Runtime-specific tests
(the container definition, the engine's own view) live beside the subclass, using `make_spec` and `node_name`
with a `run_image` fixture of their own.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import pytest

from vfed.node.runtime import (
    DatasetMount,
    NotFound,
    PermanentStartError,
    RunLimits,
    RunSpec,
    RunState,
    Runtime,
    RuntimeUnavailable,
    algorithm_env,
)
from vfed.node.runtime.base import START_STEPS

SpecFactory = Callable[..., RunSpec]
FOREIGN_HANDLE = "elsewhere:vfed-n-run-1"
"""A handle no runtime here gives out: each runtime must treat it as a run it does not have."""


def py(code: str) -> list[str]:
    return ["python3", "-c", code]


class RuntimeTarget(Protocol):
    """What a runtime's test class gives the contract."""

    image: str
    """An image with python3 that the runtime can start (present: nothing is pulled)."""
    image_label: str
    """A label `image` carries (any value)."""

    def make_runtime(self) -> Runtime:
        """A new, unopened runtime; a restarted agent builds one too."""
        ...

    def absent_handle(self) -> str:
        """A handle of this runtime's own form that names no run."""
        ...


@pytest.fixture
async def node_name(runtime: Runtime) -> AsyncIterator[str]:
    """A node name of our own, so tests never see each other's runs; everything of it is removed after."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    for run in await runtime.list_runs(name):
        await runtime.cleanup(run.handle)
    for job in await runtime.list_job_volumes(name):
        await runtime.remove_job_volume(name, job)


@pytest.fixture
def make_spec(node_name: str, tmp_path: Path, run_image: str) -> SpecFactory:
    """RunSpecs of this test's node; the image is `run_image` (the runtime's test module supplies it)."""

    def make(command: list[str], *, job_id: str = "job1", input_text: str = "hello", **kw: Any) -> RunSpec:
        run_id = kw.pop("run_id", uuid.uuid4().hex[:12])
        run_dir = tmp_path / f"run-{run_id}"
        run_dir.mkdir()
        (run_dir / "input").write_text(input_text)
        datasets = kw.pop("datasets", [])
        env = algorithm_env(
            run_id=run_id,
            job_id=job_id,
            organization_id="org-1",
            datasets=datasets,
            with_proxy=kw.get("proxy_socket") is not None,
        )
        return RunSpec(
            run_id=run_id,
            job_id=job_id,
            node_name=node_name,
            organization_id="org-1",
            image=kw.pop("image", run_image),
            env={**env, **kw.pop("env", {})},
            run_dir=str(run_dir),
            datasets=datasets,
            command=command,
            **kw,
        )

    return make


class RuntimeContract:
    """Behaviour the agent relies on, whatever runs the containers. Subclasses implement RuntimeTarget."""

    __test__ = False
    image: str
    image_label: str

    def make_runtime(self) -> Runtime:
        """See RuntimeTarget."""
        raise NotImplementedError

    def absent_handle(self) -> str:
        """See RuntimeTarget."""
        raise NotImplementedError

    @pytest.fixture
    def run_image(self) -> str:
        return self.image

    @pytest.fixture
    async def runtime(self) -> AsyncIterator[Runtime]:
        async with self.make_runtime() as runtime:
            yield runtime

    # -- a run from start to exit

    async def test_run_reads_input_and_writes_output(self, runtime: Runtime, make_spec: SpecFactory) -> None:
        code = (
            "import os; d=open(os.environ['INPUT_FILE']).read(); "
            "open(os.environ['OUTPUT_FILE'],'w').write(d.upper())"
        )
        spec = make_spec(py(code), input_text="federated")
        handle = await runtime.start(spec)
        status = await runtime.wait(handle, timeout_s=60)
        assert status.succeeded, (status, await runtime.logs(handle))
        assert (status.exit_code, status.oom_killed, status.timed_out, status.reason) == (
            0,
            False,
            False,
            None,
        )
        assert (Path(spec.run_dir) / "output").read_text() == "FEDERATED"

    async def test_environment_is_the_specs(self, runtime: Runtime, make_spec: SpecFactory) -> None:
        code = (
            "import os,json; print(json.dumps({k: os.environ.get(k) for k in ['RUN_ID','JOB_ID','EXTRA']}))"
        )
        spec = make_spec(py(code), env={"EXTRA": "x=1"})
        handle = await runtime.start(spec)
        assert (await runtime.wait(handle, timeout_s=60)).exit_code == 0
        logs = await runtime.logs(handle)
        assert (
            f'"RUN_ID": "{spec.run_id}"' in logs and '"JOB_ID": "job1"' in logs and '"EXTRA": "x=1"' in logs
        )

    async def test_failing_run_reports_exit_code(self, runtime: Runtime, make_spec: SpecFactory) -> None:
        handle = await runtime.start(
            make_spec(py("import sys; print('bad input', file=sys.stderr); sys.exit(3)"))
        )
        status = await runtime.wait(handle, timeout_s=60)
        assert (status.exit_code, status.succeeded, status.reason) == (3, False, "exit code 3")
        assert "bad input" in await runtime.logs(handle)

    async def test_wait_timeout_leaves_run_alone(self, runtime: Runtime, make_spec: SpecFactory) -> None:
        spec = make_spec(py("import time; print('up', flush=True); time.sleep(60)"))
        handle = await runtime.start(spec)
        status = await runtime.wait(handle, timeout_s=0.5)
        assert status.timed_out and status.exit_code is None and not status.succeeded
        runs = {r.run_id: r for r in await runtime.list_runs(spec.node_name)}
        assert runs[spec.run_id].state is RunState.RUNNING
        await runtime.kill(handle, grace_s=0)
        status = await runtime.wait(handle, timeout_s=30)
        assert status.exit_code in (137, 143) and not status.timed_out  # SIGKILL, or SIGTERM killed it

    async def test_kill_sends_term_then_waits_grace(self, runtime: Runtime, make_spec: SpecFactory) -> None:
        code = (
            "import signal,sys,time\n"
            "def bye(*_): print('terminating', flush=True); sys.exit(5)\n"
            "signal.signal(signal.SIGTERM, bye); print('ready', flush=True); time.sleep(60)"
        )
        handle = await runtime.start(make_spec(py(code)))
        await _wait_for_log(runtime, handle, "ready")
        await runtime.kill(handle, grace_s=10)
        status = await runtime.wait(handle, timeout_s=30)
        assert status.exit_code == 5
        assert "terminating" in await runtime.logs(handle)

    async def test_gone_runs_are_killed_and_cleaned(self, runtime: Runtime, make_spec: SpecFactory) -> None:
        handle = await runtime.start(make_spec(py("pass")))
        await runtime.wait(handle, timeout_s=60)
        await runtime.kill(handle)  # already exited: fine
        await runtime.cleanup(handle)
        await runtime.cleanup(handle)  # idempotent
        await runtime.kill(handle)  # gone: fine
        with pytest.raises(NotFound):
            await runtime.wait(handle, timeout_s=1)
        with pytest.raises(NotFound):
            await runtime.logs(handle)
        await runtime.kill(self.absent_handle())
        await runtime.cleanup(self.absent_handle())

    async def test_foreign_handles_name_no_run(self, runtime: Runtime) -> None:
        await runtime.kill(FOREIGN_HANDLE)
        await runtime.cleanup(FOREIGN_HANDLE)
        with pytest.raises(NotFound):
            await runtime.wait(FOREIGN_HANDLE, timeout_s=1)
        with pytest.raises(NotFound):
            await runtime.logs(FOREIGN_HANDLE)

    async def test_logs_are_a_bounded_tail(self, runtime: Runtime, make_spec: SpecFactory) -> None:
        handle = await runtime.start(make_spec(py("for i in range(20000): print(f'line {i:05d}')")))
        await runtime.wait(handle, timeout_s=60)
        tail = await runtime.logs(handle, max_bytes=1000)
        assert 900 <= len(tail.encode()) <= 1000
        assert tail.rstrip().endswith("line 19999")
        assert "line 00000" in await runtime.logs(handle, max_bytes=10_000_000)

    async def test_list_runs_finds_runs_after_a_restart(
        self, runtime: Runtime, make_spec: SpecFactory, node_name: str
    ) -> None:
        done, running = make_spec(py("import sys; sys.exit(7)")), make_spec(py("import time; time.sleep(60)"))
        h_done, h_running = await runtime.start(done), await runtime.start(running)
        await runtime.wait(h_done, timeout_s=60)
        async with self.make_runtime() as fresh:  # what a restarted agent has: no memory, only labels
            runs = {r.run_id: r for r in await fresh.list_runs(node_name)}
            assert set(runs) == {done.run_id, running.run_id}
            assert (runs[done.run_id].state, runs[done.run_id].exit_code) == (RunState.EXITED, 7)
            assert (runs[done.run_id].handle, runs[running.run_id].handle) == (h_done, h_running)
            assert runs[running.run_id].state is RunState.RUNNING and runs[running.run_id].exit_code is None
            assert (await fresh.wait(h_done, timeout_s=5)).exit_code == 7
        assert await runtime.list_runs(f"other{node_name}") == []

    # -- created ahead, started after the checks

    async def test_created_run_runs_only_once_started(self, runtime: Runtime, make_spec: SpecFactory) -> None:
        code = "import os; open(os.environ['OUTPUT_FILE'], 'w').write('ran')"
        spec = make_spec(py(code))
        if not runtime.creates_ahead:
            with pytest.raises(NotImplementedError):
                await runtime.create(spec)
            return
        handle = await runtime.create(spec)
        runs = {r.run_id: r for r in await runtime.list_runs(spec.node_name)}
        assert (runs[spec.run_id].handle, runs[spec.run_id].state) == (handle, RunState.CREATED)
        await asyncio.sleep(0.5)
        assert not (Path(spec.run_dir) / "output").exists()  # nothing ran
        await runtime.start_created(handle, spec)
        status = await runtime.wait(handle, timeout_s=60)
        assert status.succeeded, (status, await runtime.logs(handle))
        assert (Path(spec.run_dir) / "output").read_text() == "ran"

    async def test_created_run_is_removed_unstarted(self, runtime: Runtime, make_spec: SpecFactory) -> None:
        spec = make_spec(py("pass"))
        if not runtime.creates_ahead:
            pytest.skip("covered by test_created_run_runs_only_once_started: create is refused")
        handle = await runtime.create(spec)
        with pytest.raises(PermanentStartError):
            await runtime.create(spec)  # one container per run, as with start
        await runtime.cleanup(handle)
        assert await runtime.list_runs(spec.node_name) == []
        with pytest.raises(NotFound):
            await runtime.wait(handle, timeout_s=1)

    async def test_created_run_that_cannot_start_is_removed(
        self, runtime: Runtime, make_spec: SpecFactory, tmp_path: Path
    ) -> None:
        if not runtime.creates_ahead:
            pytest.skip("covered by test_created_run_runs_only_once_started: create is refused")
        missing = f"vfed-test/no-such-image-{uuid.uuid4().hex[:8]}:latest"
        with pytest.raises(PermanentStartError):
            await runtime.create(make_spec(py("pass"), image=missing))
        spec = make_spec(py("pass"))
        handle = await runtime.create(spec)
        shutil.rmtree(spec.run_dir)  # gone by the start: the local checks refuse it
        with pytest.raises(PermanentStartError, match="run_dir"):
            await runtime.start_created(handle, spec)
        assert await runtime.list_runs(spec.node_name) == []
        respawned = make_spec(py("pass"), run_id=spec.run_id)  # the run can start again, the usual way
        assert (await runtime.wait(await runtime.start(respawned), timeout_s=60)).exit_code == 0

    async def test_start_steps_reach_the_hook(self, runtime: Runtime, make_spec: SpecFactory) -> None:
        """The steps are told through `on_step` (from any thread), named as START_STEPS, in that order."""
        steps: list[str] = []
        runtime.on_step = steps.append
        try:
            handle = await runtime.start(make_spec(py("pass")))
            assert steps and steps[0] == "runtime_start" and set(steps) <= set(START_STEPS)
            assert steps == sorted(steps, key=START_STEPS.index)
            await runtime.wait(handle, timeout_s=60)
            if runtime.creates_ahead:
                steps.clear()
                spec = make_spec(py("pass"))
                created = await runtime.create(spec)
                await runtime.start_created(created, spec)
                assert "runtime_start" in steps and set(steps) <= set(START_STEPS)
                await runtime.wait(created, timeout_s=60)
        finally:
            runtime.on_step = None

    # -- images

    async def test_image_digest_of_a_present_image(self, runtime: Runtime) -> None:
        digest = await runtime.image_digest(self.image)
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
        assert await runtime.image_digest(digest) == digest  # the digest names the same image

    async def test_image_labels(self, runtime: Runtime) -> None:
        by_name = await runtime.image_labels(self.image)
        assert self.image_label in by_name
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in by_name.items())
        assert await runtime.image_labels(await runtime.image_digest(self.image)) == by_name

    async def test_unknown_image_fails_permanently(self, runtime: Runtime, make_spec: SpecFactory) -> None:
        missing = f"vfed-test/no-such-image-{uuid.uuid4().hex[:8]}:latest"
        with pytest.raises(PermanentStartError):
            await runtime.image_digest(missing)
        with pytest.raises(PermanentStartError):
            await runtime.image_labels(missing)
        spec = make_spec(py("pass"), image=missing)
        with pytest.raises(PermanentStartError):
            await runtime.start(spec)
        assert await runtime.list_runs(spec.node_name) == []

    # -- bad specs

    async def test_same_run_twice_is_refused(self, runtime: Runtime, make_spec: SpecFactory) -> None:
        spec = make_spec(py("pass"))
        await runtime.start(spec)
        with pytest.raises(PermanentStartError):
            await runtime.start(spec)

    async def test_missing_paths_fail_permanently(
        self, runtime: Runtime, make_spec: SpecFactory, tmp_path: Path
    ) -> None:
        spec = make_spec(py("pass"))
        with pytest.raises(PermanentStartError, match="run_dir"):
            await runtime.start(spec.model_copy(update={"run_dir": str(tmp_path / "absent")}))
        not_a_socket = tmp_path / "proxy.sock"
        not_a_socket.write_text("")
        with pytest.raises(PermanentStartError, match="not a Unix socket"):
            await runtime.start(spec.model_copy(update={"proxy_socket": str(not_a_socket)}))
        with pytest.raises(PermanentStartError):
            await runtime.start(
                make_spec(py("pass"), datasets=[_dataset("absent", tmp_path / "nothing.csv")])
            )
        assert await runtime.list_runs(spec.node_name) == []

    async def test_missing_program_fails_the_run(self, runtime: Runtime, make_spec: SpecFactory) -> None:
        """Either start refuses it, or the run fails: an init process in front of it exits 127, or the
        runtime ends the run because its container cannot start (Kubernetes retries that forever)."""
        try:
            handle = await runtime.start(make_spec(["/no/such/program"]))
        except PermanentStartError:
            return
        status = await runtime.wait(handle, timeout_s=60)
        assert not status.succeeded
        assert status.exit_code == 127 or (
            status.exit_code is None and "no/such/program" in str(status.reason)
        )
        assert "no/such/program" in await runtime.logs(handle)

    # -- volumes and datasets

    async def test_job_volume_is_shared_within_a_job_only(
        self, runtime: Runtime, make_spec: SpecFactory, node_name: str
    ) -> None:
        write = py("import os; open(os.environ['TEMPORARY_FOLDER'] + '/state', 'w').write('job1 state')")
        read = py("import os; print(sorted(os.listdir(os.environ['TEMPORARY_FOLDER'])))")
        first = await runtime.start(make_spec(write, job_id="job1"))
        assert (await runtime.wait(first, timeout_s=60)).exit_code == 0, await runtime.logs(first)
        same_job = await runtime.start(make_spec(read, job_id="job1"))
        other_job = await runtime.start(make_spec(read, job_id="job2"))
        assert (await runtime.wait(same_job, timeout_s=60)).exit_code == 0
        assert (await runtime.wait(other_job, timeout_s=60)).exit_code == 0
        assert "['state']" in await runtime.logs(same_job)
        assert "[]" in await runtime.logs(other_job)
        assert await runtime.list_job_volumes(node_name) == ["job1", "job2"]

    async def test_job_volume_in_use_is_not_removed(
        self, runtime: Runtime, make_spec: SpecFactory, node_name: str
    ) -> None:
        handle = await runtime.start(make_spec(py("import time; time.sleep(60)"), job_id="busy"))
        with pytest.raises(RuntimeUnavailable):
            await runtime.remove_job_volume(node_name, "busy")
        await runtime.cleanup(handle)
        await runtime.remove_job_volume(node_name, "busy")
        await runtime.remove_job_volume(node_name, "busy")  # gone: fine
        assert await runtime.list_job_volumes(node_name) == []

    async def test_datasets_are_readable_not_writable(
        self, runtime: Runtime, make_spec: SpecFactory, tmp_path: Path
    ) -> None:
        data = tmp_path / "cohort.csv"
        data.write_text("age\n41\n")
        data.chmod(0o666)  # only the read-only mount may stop the write
        code = (
            "import os; uri=os.environ['DATASET_COHORT_URI']; "
            "print(os.environ['DATASET_COHORT_TYPE'], repr(open(uri).read()))\n"
            "try:\n open(uri, 'a').write('x')\nexcept OSError as e: print('refused', e)"
        )
        handle = await runtime.start(make_spec(py(code), datasets=[_dataset("cohort", data)]))
        assert (await runtime.wait(handle, timeout_s=60)).exit_code == 0
        logs = await runtime.logs(handle)
        assert "csv 'age\\n41\\n'" in logs and "refused" in logs and "Read-only file system" in logs
        assert data.read_text() == "age\n41\n"

    async def test_memory_limit_is_reported_as_oom(self, runtime: Runtime, make_spec: SpecFactory) -> None:
        hog = py("b=[]\nwhile True: b.append(bytearray(8 << 20))")
        handle = await runtime.start(make_spec(hog, limits=RunLimits(memory_bytes=48 << 20)))
        status = await runtime.wait(handle, timeout_s=60)
        assert status.oom_killed and not status.succeeded
        assert status.reason == "out of memory (limit 48 MiB)"


def _dataset(label: str, path: Path) -> DatasetMount:
    return DatasetMount(label=label, host_path=str(path), type="csv")


async def _wait_for_log(runtime: Runtime, handle: str, text: str, timeout_s: float = 30) -> None:
    async with asyncio.timeout(timeout_s):
        while text not in await runtime.logs(handle):  # noqa: ASYNC110 - polling a container, not a task
            await asyncio.sleep(0.05)
