"""The algorithm template end to end: `vfed algorithm new` in a fresh folder, `vfed algorithm build` on the
engine (offline, on the existing vfed/algorithm-base, under a private tag), and the image run by two real node
agents against the real server app: the central `mean` at one organization, its subtasks at both, the result
decrypted by the researcher. An image whose `vfed.sdk` label declares a payload format the node does not speak
is refused before it starts, with the classified reason and a line in the node's log."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from tests.node.node_harness import PASSWORD, Server, csv_nodes

from vfed.client.client import AsyncClient
from vfed.client.errors import RunFailed
from vfed.common.manifest import MANIFEST_LABEL
from vfed.common.payload import FORMAT_VERSION
from vfed.common.sdk import PROXY_API_VERSION, SDK_LABEL
from vfed.node.config import NodeSettings
from vfed.node.image_sdk import SdkVerdicts
from vfed.node.runtime.docker import DockerRuntime
from vfed.node.runtime.docker_config import DockerRuntimeConfig

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(600)]
ORGS = ("alpha", "beta")


def vfed(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The researcher CLI of this tree, offline (no proxy settings, no package index needed)."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    return subprocess.run(
        [sys.executable, "-m", "vfed.client.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@dataclass
class Built:
    folder: Path
    tag: str
    future: str
    """The same image labelled as built by an SDK speaking a payload format from the future."""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, docker_client: Any) -> Iterator[Built]:
    import docker.errors

    try:
        docker_client.images.get("vfed/algorithm-base")
    except docker.errors.ImageNotFound:
        pytest.fail("no vfed/algorithm-base image (run: make images)")
    name = f"tpl_{secrets.token_hex(3)}"
    repository = f"vfed-test-tpl/{name}"
    tag, future = f"{repository}:test", f"{repository}:future"
    work = tmp_path_factory.mktemp("template")
    try:
        made = vfed("algorithm", "new", name, "--dir", str(work), cwd=work)
        assert made.returncode == 0, made.stderr
        done = vfed("algorithm", "build", name, "--tag", tag, cwd=work)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"built {tag} (" in done.stdout and "mean (central), partial (federated)" in done.stdout
        declared = json.dumps({"version": "99.0", "payload": FORMAT_VERSION + 98, "proxy": PROXY_API_VERSION})
        docker_client.images.build(
            fileobj=_dockerfile(f"FROM {tag}\n"), tag=future, labels={SDK_LABEL: declared}, rm=True
        )
        yield Built(work / name, tag, future)
    finally:
        for image in (future, tag):
            with contextlib.suppress(docker.errors.ImageNotFound):
                docker_client.images.remove(image, force=True)
        left = [t for i in docker_client.images.list() for t in i.tags if t.startswith(repository)]
        assert not left, left  # the stage image went with the build


def _dockerfile(text: str) -> Any:
    import io

    return io.BytesIO(text.encode())


def test_the_image_carries_the_manifest_and_the_sdk_it_was_built_with(
    built: Built, docker_client: Any
) -> None:
    labels = docker_client.images.get(built.tag).labels
    manifest = json.loads(labels[MANIFEST_LABEL])
    assert manifest["functions"]["partial"] == {
        "kind": "federated",
        "datasets": ["default"],
        "epsilon_kwarg": None,
    }
    assert manifest["functions"]["mean"]["kind"] == "central"
    sdk = json.loads(labels[SDK_LABEL])
    # what the base image's vfed says: the shared base is built from this tree's vfed
    assert sdk["payload"] == FORMAT_VERSION and sdk["proxy"] == PROXY_API_VERSION
    assert sdk["version"] and labels["vfed.built-by"] == "vfed algorithm build"


@dataclass
class Federation:
    server: Server
    settings: dict[str, NodeSettings]
    researcher: AsyncClient
    collaboration: int
    org: int


@contextlib.asynccontextmanager
async def federation(tmp_path: Path, data: Path) -> AsyncIterator[Federation]:
    """Server, two agents each offering one of the template's CSV files as `default`, researcher alpha."""
    server = Server(tmp_path / "server", mqtt_url=None)
    keys = await server.seed(list(ORGS))
    await server.start()
    files = dict(zip(ORGS, (data / "org1.csv", data / "org2.csv"), strict=True))
    try:
        async with (
            csv_nodes(tmp_path, server, keys, files, "tpl") as settings,
            AsyncClient(server.url, key_file=settings["alpha"].key_path) as researcher,
        ):
            await researcher.login("res-alpha", PASSWORD)
            collaboration = (await researcher.collaborations())[0]["id"]
            assert researcher.organization_id is not None
            yield Federation(server, settings, researcher, collaboration, researcher.organization_id)
    finally:
        await server.stop()


async def test_the_template_image_runs_through_real_nodes(
    built: Built, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = built.folder / "data"
    pooled = pd.concat([pd.read_csv(data / "org1.csv"), pd.read_csv(data / "org2.csv")])
    caplog.set_level(logging.WARNING, logger="vfed.node.image_sdk")
    async with federation(tmp_path, data) as fed:
        task = await fed.researcher.create_task(
            fed.collaboration, built.tag, "mean", kwargs={"column": "value"}, organizations=[fed.org]
        )
        done = await fed.researcher.wait(task, timeout_s=180, progress=False)
        assert done["status"] == "completed", await fed.researcher.runs(done["id"])
        (result,) = await fed.researcher.results(done)
        assert result["organizations"] == 2
        assert result["n"] == pooled["value"].count()
        assert result["mean"] == pytest.approx(pooled["value"].mean(), rel=1e-12)

        # The same image, labelled as speaking a payload format from the future: refused before it starts.
        task = await fed.researcher.create_task(
            fed.collaboration,
            built.future,
            "partial",
            kwargs={"column": "value"},
            datasets=["default"],
            organizations=[fed.org],
        )
        done = await fed.researcher.wait(task, timeout_s=120, progress=False)
        (run,) = await fed.researcher.runs(done["id"])
        expected = (
            f"image-incompatible: the image's SDK speaks payload format {FORMAT_VERSION + 98} "
            f"(this node speaks {FORMAT_VERSION})"
        )
        assert (run["status"], run["reason"]) == ("not-allowed", expected)
        with pytest.raises(RunFailed) as caught:
            await fed.researcher.results(done)
        assert caught.value.reason == expected
    logged = [r.getMessage() for r in caplog.records if r.name == "vfed.node.image_sdk"]
    assert any("refused" in line and "vfed 99.0 in the image" in line for line in logged), logged


async def test_the_verdict_is_read_from_the_labels_once_per_image(
    built: Built, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vfed.node.image_sdk")
    verdicts = SdkVerdicts()
    async with DockerRuntime(DockerRuntimeConfig(jobs_dir=str(tmp_path / "jobs"))) as runtime:
        current = await runtime.image_digest(built.tag, pull=False)
        future = await runtime.image_digest(built.future, pull=False)
        assert await verdicts.refusal(runtime, current) is None
        refusal = await verdicts.refusal(runtime, future)
        assert refusal is not None and refusal.startswith("image-incompatible: ")
        assert await verdicts.refusal(runtime, future) == refusal
        # an image the engine does not have: refused, and the engine's words stay in the log
        missing = "sha256:" + "0" * 64
        assert await verdicts.refusal(runtime, missing) == (
            "image-incompatible: the image's labels cannot be read"
        )
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1, refusals  # the second answer came from memory
    assert any(missing in r.getMessage() for r in caplog.records)
