"""The budget step reads the algorithm's manifest through the runtime's `image_labels`, on a real Docker
engine: the declared epsilon of the DP probe image, and a clear refusal (the engine's words kept in the node's
log) when the labels cannot be read."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import pytest
from tests.node.node_harness import PROBE_DP_IMAGE, PROBE_IMAGE, ensure_probe_image

from vfed.common.payload import TaskInput
from vfed.node import budget
from vfed.node.privacy import BudgetRefused
from vfed.node.run_input import RunInput
from vfed.node.runtime.docker import DockerRuntime
from vfed.node.runtime.docker_config import DockerRuntimeConfig

pytestmark = pytest.mark.docker


@pytest.fixture
async def runtime(tmp_path: Path, docker_client: docker.DockerClient) -> AsyncIterator[DockerRuntime]:
    ensure_probe_image()
    async with DockerRuntime(DockerRuntimeConfig(jobs_dir=str(tmp_path / "jobs"))) as rt:
        yield rt


async def test_the_manifest_comes_from_the_runtimes_image_labels(runtime: DockerRuntime) -> None:
    plaintext = TaskInput(method="echo", kwargs={"epsilon": 0.25}).to_json()
    dp_image = await runtime.image_digest(PROBE_DP_IMAGE)
    assert await budget.spent_epsilon(runtime, image=dp_image, run_input=RunInput.of(plaintext)) == 0.25
    plain_image = await runtime.image_digest(PROBE_IMAGE)  # no manifest: nothing declared
    assert await budget.spent_epsilon(runtime, image=plain_image, run_input=RunInput.of(plaintext)) is None


async def test_labels_that_cannot_be_read_refuse_the_run(
    runtime: DockerRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=budget.__name__)
    missing = "sha256:" + "0" * 64
    plaintext = TaskInput(method="echo").to_json()
    with pytest.raises(BudgetRefused) as caught:
        await budget.spent_epsilon(runtime, image=missing, run_input=RunInput.of(plaintext))
    assert str(caught.value) == "the image's labels cannot be read, so its manifest is unknown"
    assert any(missing in r.getMessage() for r in caplog.records)  # the engine's words: in the log only
