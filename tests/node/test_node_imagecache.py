"""The image-ID cache: the start path asks the engine no more, yet a retag is what the policy checks next.

Real Docker: images are tagged under one name in turn, tasks go through the real server and agent, and the
image event stream is cut for real (its connection closed) to show the fallback to inspecting.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from tests.node.node_harness import (
    PASSWORD,
    PROBE_DP_IMAGE,
    PROBE_IMAGE,
    ensure_probe_image,
    one_node,
    running_agent,
    wait_run_status,
)

from vfed.client.client import AsyncClient
from vfed.node.runtime.docker import DockerRuntime
from vfed.node.runtime.image_ids import ImageIds

pytestmark = pytest.mark.docker
OTHER_IMAGE = "vfed/base"  # present wherever the probe is (its base); never allowed below


def test_an_event_drops_what_was_asked_before_it() -> None:
    ids = ImageIds()
    found, asked = ids.get("x")
    ids.store("x", "sha256:a", asked)
    assert found is None and ids.get("x")[0] is None  # not live: nothing is cached
    ids.set_live(True)
    _, asked = ids.get("x")
    ids.invalidate()  # an event while the engine was being asked
    ids.store("x", "sha256:a", asked)
    assert ids.get("x")[0] is None
    _, asked = ids.get("x")
    ids.store("x", "sha256:b", asked)
    assert ids.get("x")[0] == "sha256:b"
    ids.set_live(False)  # the stream dropped: forget, and answer nothing from memory
    assert ids.get("x")[0] is None


@pytest.fixture
def retag_name(docker_client: docker.DockerClient) -> Iterator[str]:
    ensure_probe_image()
    name = f"vfed-test/retag-{secrets.token_hex(4)}"
    yield name
    for image in docker_client.images.list(name=name):
        for tag in image.tags:
            if tag.startswith(name):
                docker_client.images.remove(tag)


def tag(client: docker.DockerClient, source: str, name: str) -> str:
    """Put `name:latest` on `source`; answer the image ID now behind the name."""
    image = client.images.get(source)
    assert image.tag(name, "latest")
    return str(image.id)


async def live(runtime: DockerRuntime, want: bool = True, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s * 100)):
        if runtime.image_ids.live == want:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"image event stream live={runtime.image_ids.live}, wanted {want}")


async def from_cache(runtime: DockerRuntime, name: str) -> str:
    """Look the name up until the answer comes from the cache (the tag's own event empties it once)."""
    for _ in range(200):
        hits = runtime.image_ids.hits
        found = await runtime.image_digest(name)
        if runtime.image_ids.hits > hits:
            return found
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} never came from the cache")


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[DockerRuntime]:
    async with DockerRuntime() as rt:
        await live(rt)
        yield rt


async def test_lookups_come_from_the_cache_and_follow_a_retag(
    runtime: DockerRuntime, retag_name: str, docker_client: docker.DockerClient
) -> None:
    first = tag(docker_client, PROBE_IMAGE, retag_name)
    assert await from_cache(runtime, retag_name) == first  # answered without the engine
    second = tag(docker_client, PROBE_DP_IMAGE, retag_name)
    assert second != first
    for _ in range(200):  # Docker's tag event reaches the stream within a few ms
        if runtime.image_ids.get(retag_name)[0] is None:
            break
        await asyncio.sleep(0.005)
    assert await runtime.image_digest(retag_name) == second


async def test_a_dropped_event_stream_falls_back_to_the_engine_and_comes_back(
    runtime: DockerRuntime, retag_name: str, docker_client: docker.DockerClient
) -> None:
    first = tag(docker_client, PROBE_IMAGE, retag_name)
    assert await from_cache(runtime, retag_name) == first
    stream = runtime._image_events
    assert stream is not None
    stream.close()  # the engine connection of the event stream goes away
    await live(runtime, False, timeout_s=2.0)
    second = tag(docker_client, PROBE_DP_IMAGE, retag_name)
    hits = runtime.image_ids.hits
    assert await runtime.image_digest(retag_name) == second  # asked the engine: no stream, no cache
    assert runtime.image_ids.hits == hits
    await live(runtime)  # reconnected with backoff
    assert await from_cache(runtime, retag_name) == second


async def run_task(researcher: AsyncClient, collab: int, image: str) -> dict[str, Any]:
    task = await researcher.create_task(collab, image, "echo", args=[1])
    final = {"completed", "failed", "start-failed", "not-allowed", "crashed"}
    (run,) = await wait_run_status(researcher, task["id"], final, timeout_s=60)
    return dict(run)


async def test_a_retag_under_an_allowed_name_is_checked_and_recorded(
    tmp_path: Path, retag_name: str, docker_client: docker.DockerClient
) -> None:
    """Allowed by digest: the probe and its second build. Each retag of the one name the researcher uses is
    what the next run checks and records, also when the new image is not allowed."""
    first = tag(docker_client, PROBE_IMAGE, retag_name)
    second = str(docker_client.images.get(PROBE_DP_IMAGE).id)
    async with (
        one_node(tmp_path, "ni", poll_interval_s=0.2, policies={"allowed_images": [first, second]}) as (
            server,
            settings,
        ),
        running_agent(settings) as agent,
        AsyncClient(server.url, key_file=settings.key_path) as researcher,
    ):
        await researcher.login("res-alpha", PASSWORD)
        collab = (await researcher.collaborations())[0]["id"]
        runtime = agent.services.runtime if agent.services else None
        assert isinstance(runtime, DockerRuntime)
        await live(runtime)
        image = f"{retag_name}:latest"
        runs = [await run_task(researcher, collab, image) for _ in range(2)]
        assert [(r["status"], r["image_digest"]) for r in runs] == [("completed", first)] * 2
        assert runtime.image_ids.hits >= 1  # the second run's lookup came from the cache
        tag(docker_client, PROBE_DP_IMAGE, retag_name)
        run = await run_task(researcher, collab, image)
        assert (run["status"], run["image_digest"]) == ("completed", second)
        other = tag(docker_client, OTHER_IMAGE, retag_name)
        run = await run_task(researcher, collab, image)
        assert run["status"] == "not-allowed" and other in run["reason"]
