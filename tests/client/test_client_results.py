"""`results()` as a ResultSet against the real server app (SQLite and PostgreSQL), with this test doing the
nodes' side through the API as tests/client/test_client_paths.py does: real crypto, real descriptors, real
run tokens for subtasks. Per organization values in organization order, tables joined with an
`organization` column, a clear refusal for non-tables, the list behaviour older callers rely on, and a failed
task naming the failed run of every organization through two levels of subtasks."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from tests.client.test_client_paths import _chains, _publish, _researcher
from tests.client.trustkit import open_input, seal_result
from tests.server.s3_testkit import blob_backend, blobs_settings
from tests.server.vserver_testkit import World, client, db_url, settings, world

from vfed.client.errors import ClientError, NotTables, RunFailed, TaskFailed
from vfed.client.results import OrganizationResult, ResultSet
from vfed.common.crypto import Keyring

__all__ = ["blob_backend", "blobs_settings", "client", "db_url", "settings", "world"]


async def _claimed_run(world: World, node: str, task_id: int) -> int:
    org_id = world.orgs[node[0].upper()]
    _, runs = await world.call(node, "GET", f"/runs?task_id={task_id}&organization_id={org_id}")
    run_id = int(runs["data"][0]["id"])
    status, _ = await world.call(node, "POST", f"/runs/{run_id}/claim")
    assert status == 200
    return run_id


async def _complete(world: World, node: str, ring: Keyring, task: dict[str, Any], value: Any) -> int:
    """The node's side of a top-level run: claim, verify and open the input, seal `value` to the initiator
    bound to the run, report it completed."""
    org_id = world.orgs[node[0].upper()]
    run_id = await _claimed_run(world, node, int(task["id"]))
    _, run = await world.call(node, "GET", f"/runs/{run_id}")
    _, sealed = await world.call(node, "GET", f"/blobs/{run['input_blob_id']}")
    _, stored = await world.call(node, "GET", f"/tasks/{task['id']}")
    opened = await open_input(stored["descriptor"], sealed, ring, org_id, _chains(world, node))
    blob = await world.upload(node, seal_result(value, ring, opened.verified, org_id, run_id))
    status, _ = await world.call(
        node, "PATCH", f"/runs/{run_id}", json={"status": "completed", "result_blob_id": blob}
    )
    assert status == 200
    return run_id


async def _end(world: World, node: str, run_id: int, status: str, reason: str | None = None) -> None:
    patch = {"status": status} if reason is None else {"status": status, "reason": reason}
    answer, body = await world.call(node, "PATCH", f"/runs/{run_id}", json=patch)
    assert answer == 200, body


async def _subtask(world: World, node: str, run_id: int, orgs: list[str]) -> int:
    """A subtask created by the claimed run `run_id` through its run token, as a node's proxy does."""
    status, token = await world.call(node, "POST", f"/runs/{run_id}/token")
    assert status == 200, token
    who = f"run-{run_id}"
    world._tokens[who] = token["token"]
    targets = [
        {"id": world.orgs[o], "input_blob_id": await world.upload(who, b"sub-" + o.encode())} for o in orgs
    ]
    status, sub = await world.call(
        who, "POST", "/tasks", json={"image": "alpine:3", "organizations": targets}
    )
    assert status == 201, sub
    return int(sub["id"])


async def _vfed(world: World, key_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`vfed` in a child process (in a thread: the server runs on this test's loop), as researcher a_res."""
    env = {
        **os.environ,
        "NO_COLOR": "1",
        "VFED_SERVER_URL": str(world.client.make_url("")).rstrip("/"),
        "VFED_TOKEN": await world.token("a_res"),
        "VFED_KEY_FILE": str(key_file),
    }
    command = [sys.executable, "-m", "vfed.client.cli", *args]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, env=env, timeout=120, check=False
    )


async def test_results_per_organization_and_as_one_table(world: World) -> None:
    ring_a, ring_b = await _publish(world, "a_node", "A"), await _publish(world, "b_node", "B")
    org_a, org_b = world.orgs["A"], world.orgs["B"]
    records = [{"x": 1, "y": "p"}, {"x": 2, "y": "q"}]
    columns = {"x": [3], "y": ["r"]}
    async with await _researcher(world) as researcher:
        researcher.use_keyring(ring_a)
        task = await researcher.create_task(world.collabs["ab"], "alpine:3", "m")
        run_b = await _complete(world, "b_node", ring_b, task, columns)  # B reports first
        run_a = await _complete(world, "a_node", ring_a, task, records)
        found = await researcher.results(task)

        assert isinstance(found, ResultSet) and found.failures == ()
        assert sorted([org_a, org_b]) == [org_a, org_b]  # the seeded ids: A before B
        assert list(found.by_organization) == [org_a, org_b]
        assert found.by_organization == {org_a: records, org_b: columns}
        shown = [
            (r.organization_id, r.organization, r.run_id, r.task_id, r.status) for r in found.organizations
        ]
        assert shown == [
            (org_a, "org-A", run_a, task["id"], "completed"),
            (org_b, "org-B", run_b, task["id"], "completed"),
        ]
        # what a plain list of values did: equality, length, indexing, unpacking, iteration
        assert found == [records, columns] and [records, columns] == found and found != [columns, records]
        assert len(found) == 2 and found[0] == records and found[-1] == columns and found[:1] == [records]
        first, second = found
        assert (first, second) == (records, columns) and list(found) == [records, columns]

        table = found.to_dataframe()
        expected = pd.DataFrame({"organization": [org_a, org_a, org_b], "x": [1, 2, 3], "y": ["p", "q", "r"]})
        pd.testing.assert_frame_equal(table, expected)

        # a DataFrame result (Parquet on the wire, as the SDK sends tables) joins the same way
        frames = await researcher.create_task(world.collabs["ab"], "alpine:3", "m")
        await _complete(world, "a_node", ring_a, frames, pd.DataFrame({"x": [7.5]}))
        await _complete(world, "b_node", ring_b, frames, [{"x": 8.5}])
        joined = (await researcher.results(frames)).to_dataframe()
        assert joined["organization"].tolist() == [org_a, org_b] and joined["x"].tolist() == [7.5, 8.5]

        # results that are not tables: to_dataframe refuses in one line naming whose result it is
        scalars = await researcher.create_task(world.collabs["ab"], "alpine:3", "m")
        await _complete(world, "a_node", ring_a, scalars, [{"x": 1}])
        run_b = await _complete(world, "b_node", ring_b, scalars, 42)
        got = await researcher.results(scalars)
        assert got.by_organization == {org_a: [{"x": 1}], org_b: 42}
        with pytest.raises(NotTables) as refused:
            got.to_dataframe()
        assert str(refused.value) == (
            f"the result of org-B ({org_b}) (run {run_b}) is a int, not a table (a DataFrame, a list of "
            "records or a dict of equally long columns): use .by_organization"
        )


async def test_failure_names_each_organization_through_two_levels_of_subtasks(
    world: World, tmp_path: Path
) -> None:
    """Task T at A; its run at A creates subtask S1 at A, whose run creates S2 at A and B; B's run of S2
    fails, so S1's run and T's run fail too. A completed sibling subtask is not a cause and is not named."""
    ring_a = await _publish(world, "a_node", "A")
    await _publish(world, "b_node", "B")
    org_a, org_b = world.orgs["A"], world.orgs["B"]
    async with await _researcher(world) as researcher:
        researcher.use_keyring(ring_a)
        task = await researcher.create_task(world.collabs["ab"], "alpine:3", "m", organizations=[org_a])
        run_t = await _claimed_run(world, "a_node", task["id"])
        s1 = await _subtask(world, "a_node", run_t, ["A"])
        fine = await _subtask(world, "a_node", run_t, ["B"])
        await _end(world, "b_node", await _claimed_run(world, "b_node", fine), "completed")
        run_s1 = await _claimed_run(world, "a_node", s1)
        s2 = await _subtask(world, "a_node", run_s1, ["A", "B"])
        run_s2a = await _claimed_run(world, "a_node", s2)
        run_s2b = await _claimed_run(world, "b_node", s2)
        await _end(world, "a_node", run_s2a, "completed")
        await _end(world, "b_node", run_s2b, "failed", "algorithm-error: ValueError")
        await _end(world, "a_node", run_s1, "failed", "algorithm-error: SubtaskFailed")
        await _end(world, "a_node", run_t, "failed", "algorithm-error: SubtaskFailed")

        with pytest.raises(TaskFailed) as caught:
            await researcher.results(task)
        failed = caught.value
        assert isinstance(failed, RunFailed) and failed.run_id == run_t and failed.organization_id == org_a
        assert failed.reason == "algorithm-error: SubtaskFailed"
        named = [(f.organization_id, f.run_id, f.task_id, f.depth, f.parent_run_id) for f in failed.failures]
        assert named == [
            (org_a, run_t, task["id"], 0, None),
            (org_a, run_s1, s1, 1, run_t),
            (org_b, run_s2b, s2, 2, run_s1),
        ]
        leaf = failed.failures[-1]
        assert (leaf.organization, leaf.code, leaf.message) == (
            "org-B",
            "algorithm-error",
            "algorithm-error: ValueError",
        )
        assert leaf.path == (task["id"], s1, s2)
        lines = str(failed).splitlines()
        assert lines[0] == f"task {task['id']}: 1 organization(s) failed"
        assert lines[1:4] == [
            f"  org-A ({org_a}): run {run_t} failed: algorithm-error: SubtaskFailed",
            f"  org-A ({org_a}): run {run_s1} of subtask {s1} (depth 1, created by run {run_t}) failed: "
            "algorithm-error: SubtaskFailed",
            f"  org-B ({org_b}): run {run_s2b} of subtask {s2} (depth 2, created by run {run_s1}) failed: "
            "algorithm-error: ValueError",
        ]

        # without raising: the failed run's value is its RunFailed, and the same failures are listed
        found = await researcher.results(task, raise_on_failure=False)
        assert len(found) == 1 and isinstance(found[0], RunFailed) and found[0].run_id == run_t
        assert [f.run_id for f in found.failures] == [run_t, run_s1, run_s2b]
        with pytest.raises(NotTables, match=f"run {run_t} failed: .*skip_failed=True"):
            found.to_dataframe()
        assert found.to_dataframe(skip_failed=True).columns.tolist() == ["organization"]

        # the CLI: one line per failed run, the task's own and those of subtasks below it
        key_file = tmp_path / "a-key.json"
        ring_a.save(key_file)
        expected = [line.strip() for line in lines[1:4]]
        res = await _vfed(world, key_file, "task", "show", str(task["id"]))
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines()[-3:] == expected
        res = await _vfed(world, key_file, "task", "show", str(task["id"]), "--format", "json")
        shown = json.loads(res.stdout)["failures"]
        assert [(f["run_id"], f["depth"], f["code"]) for f in shown] == [
            (run_t, 0, "algorithm-error"),
            (run_s1, 1, "algorithm-error"),
            (run_s2b, 2, "algorithm-error"),
        ]
        res = await _vfed(world, key_file, "task", "results", str(task["id"]))
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert [line.strip() for line in res.stderr.splitlines()[1:4]] == expected
        assert res.stderr.startswith(f"vfed: error: task {task['id']}: 1 organization(s) failed")
        res = await _vfed(
            world, key_file, "task", "results", str(task["id"]), "--output", str(tmp_path / "out")
        )
        assert res.returncode == 1 and res.stderr.splitlines()[:3] == expected, res.stderr
        assert (
            res.stderr.splitlines()[-1]
            == f"vfed: error: 1 of 1 organizations have no result for task {task['id']}"
        )


def test_to_dataframe_without_pandas_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """pandas cannot be uninstalled for one test, so its absence is simulated: a None entry in sys.modules
    makes `import pandas` raise ImportError, as on an install without the algorithms extra."""
    found = ResultSet(1, [OrganizationResult(3, "org-C", 9, 1, "completed", value=[{"x": 1}])], [])
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ClientError) as missing:
        found.to_dataframe()
    assert str(missing.value) == (
        "to_dataframe() needs pandas: install the algorithms extra (pip install 'vfed[algorithms]')"
    )
    assert found.by_organization == {3: [{"x": 1}]}  # everything else works without it
