"""`vnode new` writes a deny-by-default image policy; `--allow-image` and `--allow-organization` open it up;
`vnode list` warns about nodes (older configs) that allow every image. The node made with the flags runs the
allowed image and refuses another, with a real server, agent and Docker."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.node.node_harness import (
    PASSWORD,
    PROBE_DP_IMAGE,
    PROBE_IMAGE,
    Server,
    ensure_probe_image,
    run_containers_gone,
    running_agent,
    server_sql,
    wait_run_status,
)
from vnode_testlib import Dirs, dirs, new_node, unique, vnode

from vfed.client.client import AsyncClient
from vfed.node.config import load_settings
from vfed.node.policy import ALLOWS_EVERY_IMAGE, IMAGE_REFUSED, check_run, image_gate

__all__ = ["dirs"]

DIGEST = "sha256:" + "5e" * 32
FINAL = {"completed", "failed", "start-failed", "not-allowed", "killed", "crashed"}


def config_of(dirs: Dirs, name: str) -> Path:
    return Path(dirs.user_config) / "vfed" / "nodes" / f"{name}.yaml"


def test_new_allows_no_image_by_default(dirs: Dirs) -> None:
    result = new_node("plain", "1.a", "--no-generate-key")
    assert "no image allowed yet" in result.output
    written = yaml.safe_load(config_of(dirs, "plain").read_text())
    # written out, not left to a default
    assert written["policies"] == {"allowed_images": [], "unchecked_outputs": "refuse"}
    settings = load_settings(config_of(dirs, "plain"))
    assert not image_gate(settings, "vfed-test/node-probe").lookup
    refused = check_run(settings, image="vfed-test/node-probe", digest=DIGEST, initiators=[(1, 1)])
    assert not refused.allowed and refused.reason.startswith(IMAGE_REFUSED)


def test_new_allow_flags_are_written_and_enforced(dirs: Dirs) -> None:
    result = new_node(
        "opened", "1.a", "--no-generate-key",
        "--allow-image", "vfed-test/*", "--allow-image", DIGEST, "--allow-image", "vfed-test/*",
        "--allow-organization", "3", "--allow-organization", "5",
    )  # fmt: skip
    assert "no image allowed yet" not in result.output
    written = yaml.safe_load(config_of(dirs, "opened").read_text())
    assert written["policies"] == {
        "allowed_images": ["vfed-test/*", DIGEST],
        "allowed_organizations": [3, 5],
        "unchecked_outputs": "refuse",
    }
    settings = load_settings(config_of(dirs, "opened"))
    assert check_run(settings, image="vfed-test/x", digest=None, initiators=[(3, 1)]).allowed
    assert check_run(settings, image="any/tag", digest=DIGEST, initiators=[(5, 1)]).allowed
    assert not check_run(settings, image="evil/x", digest=None, initiators=[(3, 1)]).allowed
    assert not check_run(settings, image="vfed-test/x", digest=None, initiators=[(4, 1)]).allowed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--allow-image", ""], "an allowed image cannot be empty"),
        (["--allow-image", "sha256:abc"], "a digest is sha256: and 64 lowercase hex digits"),
        (["--allow-organization", "three"], "'three' is not a valid integer"),
        (["--allow-organization", "0"], "--allow-organization"),
    ],
)
def test_new_bad_allow_values_are_usage_errors(dirs: Dirs, flags: list[str], message: str) -> None:
    result = vnode("new", "bad", "--api-key", "1.x", "--no-generate-key", *flags)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not config_of(dirs, "bad").exists()


def test_list_warns_about_a_node_that_allows_every_image(dirs: Dirs) -> None:
    new_node("closed", "1.a", "--no-generate-key")
    new_node("open", "1.b", "--no-generate-key")
    path = config_of(dirs, "open")
    older = yaml.safe_load(path.read_text())
    del older["policies"]  # as configs written before `vnode new` wrote a policy
    path.write_text(yaml.safe_dump(older))

    rows = {r["name"]: r for r in yaml.safe_load(vnode("list", "--format", "json").stdout)}
    assert rows["open"]["warnings"] == [ALLOWS_EVERY_IMAGE]
    assert rows["closed"]["warnings"] == []
    table = vnode("list")
    assert table.exit_code == 0
    assert f"warning: node open (user): {ALLOWS_EVERY_IMAGE}" in table.stderr
    assert "node closed" not in table.stderr
    assert "warning: node open" not in table.stdout  # the table itself keeps its shape


@pytest.mark.docker
async def test_a_node_made_with_the_flags_runs_the_allowed_image_and_refuses_another(
    dirs: Dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ensure_probe_image()
    # The node's data (and the runs' proxy sockets in it) under a short path: Unix socket paths are capped.
    data = Path(tempfile.mkdtemp(prefix="vfd-", dir="/tmp"))
    monkeypatch.setenv("XDG_DATA_HOME", str(data))
    server = Server(tmp_path / "server", mqtt_url=None)
    keys = await server.seed(["alpha"])
    await server.start()
    try:
        ((org,),) = await server_sql(server, "SELECT id FROM organizations")
        name = unique("np")
        made = vnode(
            "new", name, "--server-url", server.url, "--api-key", keys["alpha"],
            "--allow-image", PROBE_IMAGE, "--allow-organization", str(org),
        )  # fmt: skip
        assert made.exit_code == 0, made.output  # it generated the organization key too
        settings = load_settings(config_of(dirs, name)).model_copy(update={"poll_interval_s": 0.3})
        async with (
            running_agent(settings),
            AsyncClient(server.url, key_file=settings.key_path) as researcher,
        ):
            await researcher.login("res-alpha", PASSWORD)
            collab = (await researcher.collaborations())[0]["id"]
            runs: dict[str, Any] = {}
            for image in (PROBE_IMAGE, PROBE_DP_IMAGE):
                task = await researcher.create_task(collab, image, "echo", args=[1])
                (runs[image],) = await wait_run_status(researcher, task["id"], FINAL, timeout_s=60)
            await run_containers_gone(settings.name)
    finally:
        await server.stop()
        shutil.rmtree(data, ignore_errors=True)
    assert runs[PROBE_IMAGE]["status"] == "completed", runs[PROBE_IMAGE]
    refused = runs[PROBE_DP_IMAGE]
    assert refused["status"] == "not-allowed" and refused["reason"].startswith(IMAGE_REFUSED), refused
