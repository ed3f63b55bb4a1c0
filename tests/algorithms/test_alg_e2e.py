"""The example algorithms end to end: the real server app, three real node agents, real Docker, real crypto.

Each organization holds one generated partition as a CSV dataset labelled `default`; the researcher runs a
central function at organization a, which creates subtasks at all three through its proxy. Results must equal
the pooled computation on the concatenated data.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from alg_helpers import EXAMPLES, partitions
from tests.node.node_harness import (
    PASSWORD,
    Server,
    run_containers_cleared,
    running_agent,
    write_node_config,
)

from vfed.client.client import AsyncClient
from vfed.client.errors import RunFailed
from vfed.node.config import NodeSettings, load_settings

pytestmark = [pytest.mark.docker, pytest.mark.slow]
NAMES = ("a", "b", "c")


@dataclass
class Federation:
    """Server, three agents (restartable), researcher a and the generated partitions."""

    server: Server
    settings: dict[str, NodeSettings]
    researcher: AsyncClient
    collaboration: int
    org_a: int
    frames: list[pd.DataFrame]
    agents: contextlib.AsyncExitStack

    async def run(
        self,
        example: str,
        method: str,
        timeout_s: float = 180,
        researcher: AsyncClient | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """A central task at the researcher's own organization; returns the task after it finished."""
        who = researcher or self.researcher
        task = await who.create_task(
            self.collaboration,
            f"vfed-examples/{example}:latest",
            method,
            kwargs=kwargs,
            organizations=[who.organization_id or self.org_a],
        )
        done: dict[str, Any] = await who.wait(task, timeout_s=timeout_s, progress=False)
        return done

    async def start_agents(self) -> None:
        for name in NAMES:
            await self.agents.enter_async_context(running_agent(self.settings[name]))

    async def restart_agents(self) -> None:
        await self.agents.aclose()
        await self.start_agents()


@pytest.fixture(scope="module")
def example_images(docker_client: Any) -> None:
    build = subprocess.run(
        ["bash", str(EXAMPLES / "build.sh")], capture_output=True, text=True, timeout=900, check=False
    )
    assert build.returncode == 0, build.stderr + build.stdout


@contextlib.asynccontextmanager
async def federated(
    tmp_path: Path, frames: list[pd.DataFrame], epsilon_budget: float | None = None, **node_config: Any
) -> AsyncIterator[Federation]:
    server = Server(tmp_path / "server", mqtt_url=None)
    keys = await server.seed(list(NAMES))
    await server.start()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(server.stop)
        settings = {}
        for name, frame in zip(NAMES, frames, strict=True):
            data = tmp_path / f"{name}.csv"
            frame.to_csv(data, index=False)
            dataset: dict[str, Any] = {"uri": str(data), "type": "csv"}
            if epsilon_budget is not None:
                dataset["epsilon_budget"] = epsilon_budget
            config = write_node_config(
                tmp_path / f"{name}.yaml",
                name=f"alg-{name}",
                api_key=keys[name],
                server_url=server.url,
                mqtt_url=None,
                poll_interval_s=0.5,
                datasets={"default": dataset},
                trust="tofu",  # the organizations pin each other at first sight (tests/trust pins by hand)
                **node_config,
            )
            settings[name] = load_settings(config)
        agents = await stack.enter_async_context(contextlib.AsyncExitStack())
        stack.push_async_callback(run_containers_cleared, [f"alg-{name}" for name in NAMES])
        researcher = AsyncClient(server.url, key_file=settings["a"].key_path)
        federation = Federation(server, settings, researcher, 0, 0, frames, agents)
        await federation.start_agents()
        await stack.enter_async_context(researcher)
        await researcher.login("res-a", PASSWORD)
        federation.collaboration = (await researcher.collaborations())[0]["id"]
        assert researcher.organization_id is not None
        federation.org_a = researcher.organization_id
        yield federation


@pytest.fixture
async def federation(tmp_path: Path, example_images: None) -> AsyncIterator[Federation]:
    frames = partitions(seed=99)
    frames[2]["rare"] = np.where(np.arange(len(frames[2])) < 5, 1.0, np.nan)  # 5 values at c only
    for frame in frames[:2]:
        frame["rare"] = np.arange(len(frame), dtype=float)
    async with federated(tmp_path, frames) as federation:
        yield federation


async def test_examples_equal_the_pooled_computation(federation: Federation) -> None:
    pooled = pd.concat(federation.frames, ignore_index=True)

    # 3 bins: each organization's bins hold 0 or at least 5 records (finer ones are refused, see below)
    done = await federation.run("summary_stats", "summary", columns=["age", "bmi"], bins=3)
    assert done["status"] == "completed", await federation.researcher.runs(done["id"])
    (summary,) = await federation.researcher.results(done)
    assert len(summary["organizations"]) == 3
    for name in ("age", "bmi"):
        column, got = pooled[name].dropna(), summary["columns"][name]
        assert (got["count"], got["missing"], got["min"], got["max"]) == (
            len(column),
            int(pooled[name].isna().sum()),
            column.min(),
            column.max(),
        )
        assert got["mean"] == pytest.approx(column.mean(), rel=1e-12)
        assert got["variance"] == pytest.approx(column.var(), rel=1e-10)
        assert got["histogram"]["counts"] == np.histogram(column, bins=3)[0].tolist()

    done = await federation.run("federated_glm", "glm", outcome="event", predictors=["age", "bmi"])
    assert done["status"] == "completed", await federation.researcher.runs(done["id"])
    (fit,) = await federation.researcher.results(done)
    data = pooled[["event", "age", "bmi"]].dropna()
    reference = sm.Logit(data["event"], sm.add_constant(data[["age", "bmi"]])).fit(
        method="newton", tol=1e-14, disp=0
    )
    np.testing.assert_allclose(
        list(fit["coefficients"].values()), reference.params.to_numpy(), atol=1e-6, rtol=0
    )
    subtasks = await federation.researcher.tasks(parent_id=done["id"])
    # one round for the levels of categorical predictors, then one per Newton iteration
    assert len(subtasks) == fit["iterations"] + 1 and all(t["datasets"] == ["default"] for t in subtasks)


async def _refused_subtask_runs(federation: Federation, done: dict[str, Any]) -> list[dict[str, Any]]:
    """The failed runs of a central task's subtasks (the central run itself fails with SubtaskFailed)."""
    assert done["status"] == "failed"
    runs = []
    for subtask in await federation.researcher.tasks(parent_id=done["id"]):
        runs += [r for r in await federation.researcher.runs(subtask["id"]) if r["status"] == "failed"]
    return runs


async def test_disclosure_rules_refuse_small_cells_and_unbudgeted_releases(federation: Federation) -> None:
    """Each example on real nodes: the histogram with small bins and a differentially private release no
    node charged epsilon for are refused, each run naming its rule and nothing of the data."""
    done = await federation.run("summary_stats", "summary", columns=["age", "bmi"], bins=12)
    refused = await _refused_subtask_runs(federation, done)
    assert refused and {r["reason"] for r in refused} == {"disclosure-refused: min-cell-count"}
    assert all(r["result_blob_id"] is None for r in refused)

    done = await federation.run("dp_stats", "dp_total", statistic="count", epsilon=1.0)
    refused = await _refused_subtask_runs(federation, done)
    assert len(refused) == 3 and {r["reason"] for r in refused} == {"disclosure-refused: dp-budget"}


async def test_glm_saturation_is_refused_per_node(tmp_path: Path, example_images: None) -> None:
    """With max_glm_saturation 0.02, three parameters need 150 rows: a (120) and b (80) refuse the model
    part, c (200) releases it."""
    frames = partitions(seed=99)
    async with federated(tmp_path, frames, max_glm_saturation=0.02) as federation:
        kwargs = {"outcome": "event", "predictors": ["age", "bmi"]}
        done = await federation.run("federated_glm", "glm", **kwargs)
        refused = await _refused_subtask_runs(federation, done)
        assert {r["reason"] for r in refused} == {"disclosure-refused: glm-saturation"}
        names = {o["id"]: o["name"] for o in await federation.researcher.organizations()}
        assert sorted(names[r["organization_id"]] for r in refused) == ["a", "b"]
        c = next(org for org, name in names.items() if name == "c")
        done = await federation.run("federated_glm", "glm", organizations=[c], **kwargs)
        assert done["status"] == "completed", await federation.researcher.runs(done["id"])
        (fit,) = await federation.researcher.results(done)
        assert fit["n"] == len(frames[2][["event", "age", "bmi"]].dropna())


async def test_disclosure_control_and_failures_reach_the_researcher(federation: Federation) -> None:
    done = await federation.run("summary_stats", "summary", columns=["rare"])
    assert done["status"] == "failed"
    with pytest.raises(RunFailed) as caught:
        await federation.researcher.results(done)
    failure = caught.value
    # the central run is organization a's: its researcher, holding a's keyring, opens its sealed log
    assert "SubtaskFailed" in failure.log_tail and "failed: disclosure-refused" in failure.log_tail
    subtask = (await federation.researcher.tasks(parent_id=done["id"]))[0]
    runs = await federation.researcher.runs(subtask["id"])
    refused = [r for r in runs if r["status"] == "failed"]
    assert len(refused) == 1 and refused[0]["exit_code"] == 3
    assert refused[0]["reason"] == "disclosure-refused: min-rows"  # the count stays in the sealed log
    assert "has 5 records" not in str(runs) and "has 5 records" not in failure.log_tail

    # A crashing algorithm: the researcher gets the reason and the traceback's tail.
    task = await federation.researcher.create_task(
        federation.collaboration,
        "vfed-examples/summary_stats:latest",
        "partial_stats",
        kwargs={"columns": ["no_such_column"]},
        datasets=["default"],
        organizations=[federation.org_a],
    )
    done = await federation.researcher.wait(task, timeout_s=120, progress=False)
    with pytest.raises(RunFailed) as caught:
        await federation.researcher.results(done)
    assert caught.value.reason == "algorithm-error: KeyError"
    assert (
        "KeyError" in caught.value.log_tail and "no such columns: ['no_such_column']" in caught.value.log_tail
    )


async def test_privacy_budget_is_spent_across_jobs_researchers_and_restarts(
    tmp_path: Path, example_images: None
) -> None:
    frames = partitions(seed=5)
    async with federated(tmp_path, frames, epsilon_budget=1.0) as federation:
        done = await federation.run("dp_stats", "dp_total", statistic="count", epsilon=0.6)
        assert done["status"] == "completed", await federation.researcher.runs(done["id"])
        (count,) = await federation.researcher.results(done)
        assert abs(count["value"] - sum(len(f) for f in frames)) < 60

        await federation.restart_agents()  # the ledger is a file: spending survives
        async with AsyncClient(federation.server.url, key_file=federation.settings["b"].key_path) as other:
            await other.login("res-b", PASSWORD)
            done = await federation.run(
                "dp_stats", "dp_total", researcher=other, statistic="count", epsilon=0.6
            )
            assert done["status"] == "failed"
            subtask = (await other.tasks(parent_id=done["id"]))[0]
            runs = await other.runs(subtask["id"])
            assert {r["status"] for r in runs} == {"not-allowed"}
            for run in runs:
                assert run["reason"] == (
                    "disclosure-refused: privacy budget of dataset 'default' exhausted: 0.6 of 1 epsilon "
                    "spent, this run asks 0.6 (0.4 left)"
                )
            with pytest.raises(RunFailed) as caught:
                await other.results(done)
            assert "SubtaskFailed" in caught.value.log_tail and "exhausted" in caught.value.log_tail

            # A method that spends no declared epsilon may not read a budgeted dataset at all.
            done = await federation.run("summary_stats", "summary", researcher=other, columns=["age"])
            runs = await other.runs((await other.tasks(parent_id=done["id"]))[0]["id"])
            assert all("does not declare the epsilon it spends" in (r["reason"] or "") for r in runs)

        done = await federation.run("dp_stats", "dp_total", statistic="count", epsilon=0.4)
        assert done["status"] == "completed", "exactly the rest of the budget still fits"
