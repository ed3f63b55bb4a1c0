"""`results()` per organization and a failure traced through two levels of subtasks, end to end: the real
server app, two real node agents (alpha and beta) running real containers of the nesting test image
(tests/images/nesting), their proxies creating the subtasks, real crypto. Nothing is faked."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tests import imagebuild
from tests.node.node_harness import (
    PASSWORD,
    running_pair,
)

from vfed.client.client import AsyncClient
from vfed.client.errors import NotTables, TaskFailed

pytestmark = [pytest.mark.docker, pytest.mark.slow]
IMAGE = "vfed-test/nesting"


@contextlib.asynccontextmanager
async def two_orgs(tmp_path: Path) -> AsyncIterator[tuple[AsyncClient, dict[str, int]]]:
    """Organizations alpha and beta with a running node each; alpha's researcher, logged in with alpha's
    keyring; the organization ids by name."""
    async with (
        running_pair(tmp_path, "rs") as (server, settings),
        AsyncClient(server.url, key_file=settings["alpha"].key_path) as researcher,
    ):
        await researcher.login("res-alpha", PASSWORD)
        orgs = {str(o["name"]): int(o["id"]) for o in await researcher.organizations()}
        yield researcher, orgs


async def _run(researcher: AsyncClient, method: str, orgs: list[int], **kwargs: Any) -> dict[str, Any]:
    task = await researcher.create_task(1, IMAGE, method, kwargs=kwargs, organizations=orgs)
    done: dict[str, Any] = await researcher.wait(task, timeout_s=180, progress=False)
    return done


async def test_results_per_organization_and_failures_through_subtasks(
    tmp_path: Path, docker_client: object
) -> None:
    await asyncio.to_thread(imagebuild.ensure, "nesting", IMAGE)
    async with two_orgs(tmp_path) as (researcher, orgs):
        alpha, beta = orgs["alpha"], orgs["beta"]
        both = sorted([alpha, beta])

        done = await _run(researcher, "rows", both)
        assert done["status"] == "completed", await researcher.runs(done["id"])
        found = await researcher.results(done)
        assert list(found.by_organization) == both
        assert [(r.organization_id, r.organization) for r in found.organizations] == sorted(
            [(alpha, "alpha"), (beta, "beta")]
        )
        table = found.to_dataframe()
        assert table.columns.tolist() == ["organization", "organization_id", "n"]
        # each row is tagged with the organization whose node computed it
        assert table["organization"].tolist() == [both[0], both[0], both[1], both[1]]
        assert table["organization"].tolist() == table["organization_id"].tolist()
        assert table["n"].tolist() == [0, 1, 0, 1]

        done = await _run(researcher, "scalar", both)
        found = await researcher.results(done)
        assert found.by_organization == {alpha: alpha, beta: beta} and found == both
        with pytest.raises(NotTables, match="is a int, not a table"):
            found.to_dataframe()

        # alpha's run creates a subtask at alpha, whose run creates one at alpha and beta; beta's run fails
        done = await _run(researcher, "nest", [alpha], levels=[[alpha], [alpha, beta]], fail_at=beta)
        assert done["status"] == "failed"
        with pytest.raises(TaskFailed) as caught:
            await researcher.results(done)
        failures = caught.value.failures
        assert [(f.organization, f.depth, f.message) for f in failures] == [
            ("alpha", 0, "algorithm-error: SubtaskFailed"),
            ("alpha", 1, "algorithm-error: SubtaskFailed"),
            ("beta", 2, "algorithm-error: ValueError"),
        ]
        top, middle, leaf = failures
        assert middle.parent_run_id == top.run_id and leaf.parent_run_id == middle.run_id
        assert leaf.path == (done["id"], middle.task_id, leaf.task_id) and leaf.code == "algorithm-error"
        [middle_task] = await researcher.tasks(parent_id=done["id"])
        assert middle.task_id == middle_task["id"]
        # alpha's researcher holds alpha's keyring: the log of alpha's own run opens, beta's does not
        assert "SubtaskFailed" in top.log_tail and leaf.log_tail == ""
        assert f"beta ({beta}): run {leaf.run_id} of subtask {leaf.task_id} (depth 2" in str(caught.value)
