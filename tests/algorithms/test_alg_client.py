"""AlgorithmClient against a fake of the node's proxy on a real Unix socket (see alg_fake_proxy: the real
proxy is built by another engineer; the fake speaks docs/proxy-api.md)."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import pandas as pd
import pytest
from alg_fake_proxy import FakeProxy, Served, serve_tcp, serve_unix
from alg_helpers import EXAMPLES, example, partitions, sdk_pythonpath
from tests.infra import free_port

from vfed.algorithms import AlgorithmClient, AlgorithmError, ProxyError, ProxyUnavailable, SubtaskFailed
from vfed.algorithms.transport import ProxyConfigError, Transport
from vfed.common.payload import TaskInput, decode_result, encode_error, encode_result


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~107 bytes: pytest's tmp_path can be longer.
    folder = Path(tempfile.mkdtemp(prefix="vfp-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _client(path: Path, **options: float) -> AlgorithmClient:
    return AlgorithmClient(Transport(socket_path=str(path)), **options)  # type: ignore[arg-type]


def delayed(delay_s: float, outcome: Mapping[int, tuple[str, str | None, bytes | None]] | None = None):  # type: ignore[no-untyped-def]
    async def execute(org: int, task_input: TaskInput) -> tuple[str, str | None, bytes | None]:
        await asyncio.sleep(delay_s)
        if outcome and org in outcome:
            return outcome[org]
        return (
            "completed",
            None,
            encode_result({"org": org, "method": task_input.method, **task_input.kwargs}),
        )

    return execute


@pytest.fixture
async def served(socket_dir: Path) -> AsyncIterator[Served]:
    proxy = FakeProxy([11, 12, 13], delayed(0.0))
    server = await serve_unix(proxy, str(socket_dir / "proxy.sock"))
    yield server
    await server.close()


async def test_run_info_and_organizations(served: Served, socket_dir: Path) -> None:
    client = _client(socket_dir / "proxy.sock")
    info = await asyncio.to_thread(client.run_info)
    assert (info.run_id, info.organization_id, info.image) == (1, 11, "img")
    orgs = await asyncio.to_thread(client.organizations)
    assert [(o.id, o.name, o.key_id) for o in orgs] == [
        (11, "org-11", "k11"),
        (12, "org-12", "k12"),
        (13, "org-13", "k13"),
    ]


async def test_shared_input_subtask_and_results(served: Served, socket_dir: Path) -> None:
    client = _client(socket_dir / "proxy.sock")

    def scenario() -> list[object]:
        subtask = client.create_subtask(
            "count", kwargs={"column": "age"}, organizations=[11, 13], datasets=["default"]
        )
        client.wait(subtask.task_id, timeout_s=10)
        return client.results(subtask.task_id)

    results = await asyncio.to_thread(scenario)
    assert results == [
        {"org": 11, "method": "count", "column": "age"},
        {"org": 13, "method": "count", "column": "age"},
    ]
    body = next(iter(served.proxy.tasks.values())).body
    assert body == {
        "name": "count",
        "organizations": [11, 13],
        "input": {"method": "count", "args": [], "kwargs": {"column": "age"}},
        "datasets": ["default"],
    }


async def test_per_organization_inputs(served: Served, socket_dir: Path) -> None:
    client = _client(socket_dir / "proxy.sock")
    inputs = {11: TaskInput(method="m", kwargs={"part": 1}), 12: TaskInput(method="m", kwargs={"part": 2})}

    def scenario() -> dict[int, object]:
        subtask = client.create_subtask("m", per_org_inputs=inputs, name="split")
        client.wait(subtask.task_id, timeout_s=10)
        return client.results_by_organization(subtask.task_id)

    assert await asyncio.to_thread(scenario) == {
        11: {"org": 11, "method": "m", "part": 1},
        12: {"org": 12, "method": "m", "part": 2},
    }
    body = next(iter(served.proxy.tasks.values())).body
    assert body["name"] == "split" and set(body["inputs"]) == {"11", "12"} and "input" not in body
    with pytest.raises(ValueError, match=r"no input for organizations \[13\]"):
        client.create_subtask("m", organizations=[11, 13], per_org_inputs=inputs)
    with pytest.raises(ValueError, match="JSON compliant"):
        client.create_subtask("m", kwargs={"x": float("nan")}, organizations=[11])


async def test_wait_long_polls_without_spinning(socket_dir: Path) -> None:
    proxy = FakeProxy([1, 2, 3], delayed(1.5))
    server = await serve_unix(proxy, str(socket_dir / "p.sock"))
    try:
        client = _client(socket_dir / "p.sock", long_poll_s=30)
        subtask = await asyncio.to_thread(client.create_subtask, "m", organizations=[1, 2, 3])
        started = time.monotonic()
        state = await asyncio.to_thread(client.wait, subtask.task_id, 20)
        elapsed = time.monotonic() - started
    finally:
        await server.close()
    assert state.finished and all(run.status == "completed" for run in state.runs)
    assert 1.4 < elapsed < 5
    waits = [path for _, _, path in proxy.requests if "/wait" in path]
    assert len(waits) <= 3, f"one long poll should cover the wait, saw {waits}"


async def test_wait_times_out_with_few_requests(socket_dir: Path) -> None:
    proxy = FakeProxy([1])  # runs never finish
    server = await serve_unix(proxy, str(socket_dir / "p.sock"))
    try:
        client = _client(socket_dir / "p.sock", long_poll_s=1)
        subtask = await asyncio.to_thread(client.create_subtask, "m", organizations=[1])
        with pytest.raises(TimeoutError, match=f"subtask {subtask.task_id} not finished after 3 s"):
            await asyncio.to_thread(client.wait, subtask.task_id, 3)
    finally:
        await server.close()
    waits = [path for _, _, path in proxy.requests if "/wait" in path]
    assert 2 <= len(waits) <= 4 and all(path.endswith("timeout_s=1") for path in waits)


async def test_wait_backs_off_when_the_proxy_answers_early(socket_dir: Path) -> None:
    proxy = FakeProxy([1], answer_wait_early=True)
    server = await serve_unix(proxy, str(socket_dir / "p.sock"))
    try:
        client = _client(socket_dir / "p.sock", long_poll_s=30)
        subtask = await asyncio.to_thread(client.create_subtask, "m", organizations=[1])
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(client.wait, subtask.task_id, 3)
    finally:
        await server.close()
    waits = [when for when, _, path in proxy.requests if "/wait" in path]
    gaps = [b - a for a, b in itertools.pairwise(waits)]
    assert len(waits) <= 6, "an early answer must not make the client spin"
    assert gaps == sorted(gaps), "delays between polls grow"


async def test_wait_survives_a_proxy_restart(socket_dir: Path) -> None:
    path = str(socket_dir / "p.sock")
    proxy = FakeProxy([1], delayed(0.3))
    server = await serve_unix(proxy, path)
    client = _client(socket_dir / "p.sock", long_poll_s=30)
    subtask = await asyncio.to_thread(client.create_subtask, "m", organizations=[1])
    await server.close()
    waiting = asyncio.create_task(asyncio.to_thread(client.wait, subtask.task_id, 20))
    await asyncio.sleep(1.0)
    assert not waiting.done()
    server = await serve_unix(proxy, path)  # same state: the subtask finished meanwhile
    try:
        state = await asyncio.wait_for(waiting, 15)
        results = await asyncio.to_thread(client.results, subtask.task_id)
    finally:
        await server.close()
    assert state.finished and results == [{"org": 1, "method": "m"}]


async def test_results_decode_tables_and_raise_on_failure(socket_dir: Path) -> None:
    table = pd.DataFrame({"x": [1.5, 2.5], "y": ["a", "b"]})
    outcome = {
        1: ("completed", None, encode_result(table)),
        2: (
            "failed",
            "DisclosureError: dataset 'default' has 4 records",
            encode_error("DisclosureError", "4 rows"),
        ),
    }
    proxy = FakeProxy([1, 2], delayed(0.0, outcome))
    server = await serve_unix(proxy, str(socket_dir / "p.sock"))
    try:
        client = _client(socket_dir / "p.sock")

        def scenario() -> SubtaskFailed:
            subtask = client.create_subtask("m", organizations=[1])
            client.wait(subtask.task_id, 10)
            pd.testing.assert_frame_equal(client.results(subtask.task_id)[0], table)
            failing = client.create_subtask("m", organizations=[1, 2])
            client.wait(failing.task_id, 10)
            with pytest.raises(SubtaskFailed) as caught:
                client.results(failing.task_id)
            return caught.value

        failure = await asyncio.to_thread(scenario)
    finally:
        await server.close()
    assert failure.run.organization_id == 2 and failure.run.status == "failed"
    assert "organization 2 failed: DisclosureError: dataset 'default' has 4 records" in str(failure)


async def test_result_not_ready_is_a_subtask_failure_with_the_proxy_reason(socket_dir: Path) -> None:
    proxy = FakeProxy([1])  # never finishes
    server = await serve_unix(proxy, str(socket_dir / "p.sock"))
    try:
        client = _client(socket_dir / "p.sock")
        subtask = await asyncio.to_thread(client.create_subtask, "m", organizations=[1])
        with pytest.raises(SubtaskFailed, match="active"):
            await asyncio.to_thread(client.results, subtask.task_id)
        with pytest.raises(ProxyError) as caught:
            await asyncio.to_thread(client.task, 999)
    finally:
        await server.close()
    assert (caught.value.status, caught.value.error) == (403, "forbidden")


async def test_tcp_with_bearer_token(socket_dir: Path) -> None:
    port = free_port()
    server = await serve_tcp(FakeProxy([5], token="s3cret"), port)
    try:
        good = AlgorithmClient.from_env({"PROXY_URL": f"http://127.0.0.1:{port}", "PROXY_TOKEN": "s3cret"})
        assert [o.id for o in await asyncio.to_thread(good.organizations)] == [5]
        bad = AlgorithmClient.from_env({"PROXY_URL": f"http://127.0.0.1:{port}", "PROXY_TOKEN": "wrong"})
        with pytest.raises(ProxyError, match="401 unauthorized: bad run token"):
            await asyncio.to_thread(bad.organizations)
        # A pod's token is a file its Secret mounts (PROXY_TOKEN_FILE), read at each request, never copied.
        token_file = socket_dir / "token"
        token_file.write_text("wrong")
        env = {"PROXY_URL": f"http://127.0.0.1:{port}", "PROXY_TOKEN_FILE": str(token_file)}
        from_file = AlgorithmClient.from_env(env)
        with pytest.raises(ProxyError, match="401 unauthorized"):
            await asyncio.to_thread(from_file.organizations)
        token_file.write_text("s3cret\n")
        assert [o.id for o in await asyncio.to_thread(from_file.organizations)] == [5]
        token_file.unlink()
        with pytest.raises(ProxyConfigError, match=r"PROXY_TOKEN_FILE .*token: No such file"):
            await asyncio.to_thread(from_file.organizations)
    finally:
        await server.close()


def test_unreachable_proxy_is_reported_after_retries(socket_dir: Path) -> None:
    client = _client(socket_dir / "absent.sock", get_attempts=3)
    started = time.monotonic()
    with pytest.raises(ProxyUnavailable, match="proxy unreachable"):
        client.organizations()
    assert time.monotonic() - started >= 0.2 + 0.4


@pytest.mark.parametrize(
    ("env", "message"),
    [({}, "no proxy configured"), ({"PROXY_URL": "ftp://x"}, "must be an http:// URL")],
)
def test_proxy_configuration_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ProxyConfigError, match=message):
        AlgorithmClient.from_env(env)


# --- a central function through the real wrapper, subtasks through real wrapper subprocesses -------------


def wrapper_executor(module: str, folder: Path, data: dict[int, Path]):  # type: ignore[no-untyped-def]
    """Runs each subtask as the node would: `python -m vfed.algorithms` on the organization's CSV."""

    async def execute(org: int, task_input: TaskInput) -> tuple[str, str | None, bytes | None]:
        run_dir = Path(tempfile.mkdtemp(prefix=f"run-{org}-", dir=data[org].parent))
        (run_dir / "input").write_bytes(task_input.to_json())
        env = {
            "PATH": os.environ["PATH"],
            "PYTHONPATH": sdk_pythonpath(folder),
            "VFED_ALGORITHM_MODULE": module,
            "INPUT_FILE": str(run_dir / "input"),
            "OUTPUT_FILE": str(run_dir / "output"),
            "DATASETS": "default",
            "DATASET_DEFAULT_URI": str(data[org]),
            "DATASET_DEFAULT_TYPE": "csv",
        }
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "vfed.algorithms", env=env)
        code = await process.wait()
        output = (run_dir / "output").read_bytes()
        if code == 0:
            return "completed", None, output
        try:
            decode_result(output)
        except AlgorithmError as exc:
            return "failed", str(exc), output
        return "failed", f"exit code {code}", output

    return execute


async def test_central_summary_through_wrapper_and_proxy(socket_dir: Path, tmp_path: Path) -> None:
    frames = partitions(seed=21)
    data = {}
    for org, frame in zip((1, 2, 3), frames, strict=True):
        data[org] = tmp_path / f"org{org}.csv"
        frame.to_csv(data[org], index=False)
    folder = EXAMPLES / "summary_stats"
    proxy = FakeProxy([1, 2, 3], wrapper_executor("summary_stats", folder, data))
    server = await serve_unix(proxy, str(socket_dir / "p.sock"))
    (tmp_path / "input").write_bytes(
        TaskInput(method="summary", kwargs={"columns": ["age", "cost"], "bins": 2}).to_json()
    )
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": sdk_pythonpath(folder),
        "VFED_ALGORITHM_MODULE": "summary_stats",
        "INPUT_FILE": str(tmp_path / "input"),
        "OUTPUT_FILE": str(tmp_path / "output"),
        "PROXY_SOCKET": str(socket_dir / "p.sock"),
    }
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vfed.algorithms", env=env, stderr=asyncio.subprocess.PIPE
        )
        _, stderr = await asyncio.wait_for(process.communicate(), 120)
    finally:
        await server.close()
    assert process.returncode == 0, stderr.decode()
    result = decode_result((tmp_path / "output").read_bytes())
    expected = example("summary_stats").summary(_local(frames), columns=["age", "cost"], bins=2)
    assert result == expected
    pooled = pd.concat(frames)
    assert result["columns"]["cost"]["mean"] == pytest.approx(pooled["cost"].mean(), rel=1e-12)
    assert len(proxy.tasks) == 2
    assert all(task.body["datasets"] == ["default"] for task in proxy.tasks.values()), (
        "declared datasets asked"
    )


def _local(frames: list[pd.DataFrame]):  # type: ignore[no-untyped-def]
    from vfed.algorithms.testing import LocalClient

    return LocalClient(example("summary_stats"), {i + 1: {"default": f} for i, f in enumerate(frames)})
