"""Bad input ends a run with a clear status and reason, and the agent keeps serving; bad config fails fast."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.node.node_harness import (
    PASSWORD,
    PROBE_DP_IMAGE,
    PROBE_IMAGE,
    VNODE,
    Server,
    ensure_probe_image,
    one_node,
    post_signed_task,
    running_agent,
    wait_run_status,
    write_node_config,
)

from vfed.client.client import AsyncClient
from vfed.common.crypto import Keyring
from vfed.common.trust import fingerprint
from vfed.node.agent import Agent
from vfed.node.config import load_settings
from vfed.node.keys import KeyMismatch

FINAL = {"completed", "failed", "start-failed", "not-allowed", "killed", "crashed"}


@pytest.fixture(scope="module", autouse=True)
def probe_image() -> None:
    ensure_probe_image()


async def submit(researcher: AsyncClient, collab: int, image: str, method: str, *args: Any) -> int:
    task = await researcher.create_task(collab, image, method, args=list(args))
    return int(task["id"])


async def final_run(researcher: AsyncClient, task_id: int) -> dict[str, Any]:
    (run,) = await wait_run_status(researcher, task_id, FINAL, timeout_s=60)
    return dict(run)


@pytest.mark.docker
@pytest.mark.slow
async def test_bad_runs_end_clearly_and_the_agent_keeps_serving(tmp_path: Path) -> None:
    async with (
        one_node(
            tmp_path,
            "nb",
            poll_interval_s=0.5,
            max_output_bytes=1000,
            policies={"allowed_images": [PROBE_IMAGE, "vfed-test/no-such-image*"]},
        ) as (server, settings),
        running_agent(settings),
        AsyncClient(server.url, key_file=settings.key_path) as researcher,
    ):
        await researcher.login("res-alpha", PASSWORD)
        collab = (await researcher.collaborations())[0]["id"]
        org = researcher.organization_id
        # input sealed for a key that is not this organization's (under a valid signed descriptor)
        stranger = Keyring.generate().current.public
        signer = Keyring.load(settings.key_path).current
        undecryptable = await post_signed_task(
            researcher, signer, collaboration=collab, targets={org: stranger}, image=PROBE_IMAGE
        )
        unsigned = await post_signed_task(
            researcher,
            signer,
            collaboration=collab,
            targets={org: signer.public},
            image=PROBE_IMAGE,
            signed=False,
        )
        cases = {
            "undecryptable": int(undecryptable["id"]),
            "unsigned": int(unsigned["id"]),
            "unknown image": await submit(researcher, collab, "vfed-test/no-such-image:never", "echo"),
            "not allowed": await submit(researcher, collab, "vfed/base", "echo"),
            "no output": await submit(researcher, collab, PROBE_IMAGE, "no_output"),
            "too big": await submit(researcher, collab, PROBE_IMAGE, "big_output", 5000),
            "exit 3": await submit(researcher, collab, PROBE_IMAGE, "fail", 3),
            "symlink": await submit(
                researcher, collab, PROBE_IMAGE, "symlink_output", str(settings.key_path)
            ),
            "unknown dataset": int(
                (await researcher.create_task(collab, PROBE_IMAGE, "echo", datasets=["nothere"]))["id"]
            ),
        }
        runs = {name: await final_run(researcher, task_id) for name, task_id in cases.items()}
        good = await submit(researcher, collab, PROBE_IMAGE, "echo", 4)
        assert (await final_run(researcher, good))["status"] == "completed"
    expected = {
        "undecryptable": ("failed", "bad-input: the input does not decrypt"),
        "unsigned": ("not-allowed", "unsigned-task: "),
        "unknown image": ("start-failed", "image-unavailable: image "),
        "not allowed": ("not-allowed", "allowed_images"),
        "no output": ("failed", "bad-output: the algorithm wrote no output"),
        "too big": ("failed", "bad-output: output is"),
        "exit 3": ("failed", "disclosure-refused"),  # the SDK's exit code for a refused disclosure
        "symlink": ("failed", "wrote no output"),  # the link to the node's key file was removed unread
        "unknown dataset": ("not-allowed", "no dataset labelled nothere"),
    }
    for name, (status, reason) in expected.items():
        assert runs[name]["status"] == status, (name, runs[name])
        assert reason in (runs[name]["reason"] or ""), (name, runs[name])
    assert runs["exit 3"]["exit_code"] == 3
    assert "failing on purpose" not in str(runs["exit 3"])  # the log is sealed, the reason classified
    assert runs["exit 3"]["reason"] == "disclosure-refused"
    assert runs["too big"]["result_blob_id"] is None
    assert runs["symlink"]["result_blob_id"] is None


def run_vnode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VNODE, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"api_key": "a.b", "data_dir": "d", "max_concurrent_runs": 0},
            "max_concurrent_runs: Input should be",
        ),
        ({"api_key": "a.b", "data_dir": "d", "runtime": {"kind": "docker", "bogus": 1}}, "runtime.bogus"),
        ({"api_key": "a.b", "data_dir": "d", "runtime": {"kind": "k9s"}}, "runtime.kind: unknown runtime"),
        ({"data_dir": "d"}, "api_key: Field required"),
    ],
)
def test_malformed_config_one_clear_line(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"server_url": "http://127.0.0.1:9", **config}))
    result = run_vnode("run", "--config", str(path))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vnode: error: ") and message in lines[0], lines[0]


def test_unreachable_server_and_wrong_api_key_fail_clearly(tmp_path: Path) -> None:
    path = write_node_config(
        tmp_path / "n.yaml",
        name="n",
        api_key="k.s",
        server_url="http://127.0.0.1:9",
        mqtt_url=None,
        startup_timeout_s=1,
    )
    result = run_vnode("run", "--config", str(path))
    assert result.returncode == 1
    assert "does not answer" in result.stderr.strip().splitlines()[-1]


@pytest.mark.docker
async def test_a_key_file_that_does_not_match_the_servers_chain_is_refused(tmp_path: Path) -> None:
    server = Server(tmp_path / "server", mqtt_url=None)
    keys = await server.seed(["alpha"])
    await server.start()
    try:
        first = load_settings(
            write_node_config(
                tmp_path / "one.yaml",
                name=f"no{secrets.token_hex(3)}",
                api_key=keys["alpha"],
                server_url=server.url,
                mqtt_url=None,
                runtime={"kind": "docker"},
            )
        )
        async with Agent(first):
            pass
        first_root = fingerprint(Keyring.load(first.key_path).keys[0].public)
        # Another key file (a new data folder): the server's chain does not start at its first key.
        other = first.model_copy(update={"data_dir": tmp_path / "other-data"})
        with pytest.raises(KeyMismatch, match=first_root) as refused:
            async with Agent(other):
                pass
        assert fingerprint(Keyring.load(other.key_path).keys[0].public) in str(refused.value)
        with pytest.raises(KeyMismatch, match=first_root):  # a rotation cannot join a foreign chain
            async with Agent(other, rotate_key=True):
                pass
        assert len(Keyring.load(other.key_path).keys) == 1  # refused before the key file changed
        # The organization's own key file rotates: the rotation record joins the chain, the old key stays.
        async with Agent(first, rotate_key=True) as agent:
            assert agent.services is not None
            org = await agent.services.client.get_organization(agent.services.organization_id)
            assert org.key_id == agent.services.keyring.current.key_id
            records = await agent.services.client.key_records(agent.services.organization_id)
            assert [r["kind"] for r in records] == ["key.genesis", "key.rotation"]
        assert len(Keyring.load(first.key_path).keys) == 2  # the old key stays for decrypting
        # A copy of the key file from before the rotation: the server's chain ends at a key it lacks.
        stale = first.model_copy(update={"data_dir": tmp_path / "stale-data"})
        stale.key_path.parent.mkdir(parents=True)
        Keyring(Keyring.load(first.key_path).keys[:1]).save(stale.key_path)
        with pytest.raises(KeyMismatch, match="does not hold"):
            async with Agent(stale):
                pass
        bad = write_node_config(
            tmp_path / "bad.yaml",
            name="bad",
            api_key="nope.nope",
            server_url=server.url,
            mqtt_url=None,
        )
        # the server runs in this event loop: the CLI must run without blocking it
        proc = await asyncio.create_subprocess_exec(
            VNODE, "run", "--config", str(bad), stderr=asyncio.subprocess.PIPE
        )
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 1, stderr
        assert stderr.decode().strip().splitlines()[-1].startswith("vnode: error: the server refused")
    finally:
        await server.stop()


@pytest.mark.docker
@pytest.mark.slow
async def test_privacy_budget_is_charged_before_start_and_refuses_when_spent(tmp_path: Path) -> None:
    """The dataset is mounted read-only, the granted epsilon is passed on, the third run finds it spent."""
    data = tmp_path / "patients.csv"
    data.write_text("age,weight\n40,70\n")
    async with (
        one_node(
            tmp_path,
            "nb",
            poll_interval_s=0.5,
            datasets={"patients": {"uri": str(data), "type": "csv", "epsilon_budget": 1.0}},
        ) as (server, settings),
        running_agent(settings),
        AsyncClient(server.url, key_file=settings.key_path) as researcher,
    ):
        await researcher.login("res-alpha", PASSWORD)
        collab = (await researcher.collaborations())[0]["id"]
        outcomes = []
        for image in (PROBE_DP_IMAGE, PROBE_DP_IMAGE, PROBE_DP_IMAGE, PROBE_IMAGE):
            task = await researcher.create_task(
                collab, image, "echo", kwargs={"epsilon": 0.4}, datasets=["patients"]
            )
            run = await final_run(researcher, int(task["id"]))
            result = (await researcher.results(task))[0] if run["status"] == "completed" else None
            outcomes.append((run["status"], run["reason"] or "", result))
    for status, _, result in outcomes[:2]:
        assert status == "completed" and result is not None
        assert result["datasets"] == {"patients": "age,weight"}
        assert result["epsilon_granted"] == "0.4"
    assert outcomes[2][0] == "not-allowed" and "exhausted" in outcomes[2][1]
    assert outcomes[3][0] == "not-allowed" and "does not declare the epsilon" in outcomes[3][1]


@pytest.mark.docker
@pytest.mark.slow
async def test_memory_and_fork_bombs_end_in_their_limits_and_the_agent_keeps_serving(tmp_path: Path) -> None:
    async with (
        one_node(
            tmp_path,
            "nb",
            poll_interval_s=0.5,
            runtime={"kind": "docker", "memory_bytes": 128 * 1024 * 1024, "pids_limit": 64},
        ) as (server, settings),
        running_agent(settings),
        AsyncClient(server.url, key_file=settings.key_path) as researcher,
    ):
        await researcher.login("res-alpha", PASSWORD)
        collab = (await researcher.collaborations())[0]["id"]
        mem = await submit(researcher, collab, PROBE_IMAGE, "membomb")
        fork = await submit(researcher, collab, PROBE_IMAGE, "forkbomb")
        mem_run, fork_run = await final_run(researcher, mem), await final_run(researcher, fork)
        (forks,) = await researcher.results(fork) if fork_run["status"] == "completed" else [None]
        good = await submit(researcher, collab, PROBE_IMAGE, "echo", 1)
        assert (await final_run(researcher, good))["status"] == "completed"
    assert mem_run["status"] == "failed" and mem_run["reason"] == "out-of-memory: limit 128 MiB", mem_run
    assert fork_run["status"] == "completed", fork_run
    assert forks is not None and 0 < forks["forks"] < 64


def test_unwritable_data_dir_fails_with_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    path = write_node_config(
        tmp_path / "n.yaml",
        name="n",
        api_key="k.s",
        server_url="http://127.0.0.1:9",
        mqtt_url=None,
        data_dir=str(blocker / "data"),
        startup_timeout_s=0,
    )
    result = run_vnode("run", "--config", str(path))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("vnode: error: ") and "Not a directory" in last, result.stderr
