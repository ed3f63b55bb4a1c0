"""A hostile image that writes small cells of its dataset without the SDK is refused by the node itself.

A real server, a real agent, real containers (tests/images/smallcells, standard library only): organization
beta's researcher runs it on organization alpha's dataset, whose values include a secret. The node decodes
each output before sealing it: a count table with cells of 1 (labelled with the values), a "model" that
smuggles the records as one parameter over 10,000 rows, and a plain result all end failed with their
classified reason; nothing of the output, the secret included, reaches the server or the initiator. A count
that keeps the rules is released and decodes to plain values.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from tests import imagebuild
from tests.node.node_harness import ensure_probe_image
from tests.node.test_node_log_sealing import (
    LEAKY_IMAGE,
    Federation,
    federation,
    initiator_view,
    server_storage,
)

pytestmark = [pytest.mark.docker]

SMALLCELLS_IMAGE = "vfed-test/smallcells"


@pytest.fixture(scope="module", autouse=True)
def images() -> None:
    imagebuild.ensure("smallcells", SMALLCELLS_IMAGE)
    imagebuild.ensure("leaky", LEAKY_IMAGE)
    ensure_probe_image()


async def _run(fed: Federation, method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    task = await fed.beta.create_task(
        fed.collaboration, SMALLCELLS_IMAGE, method, organizations=[fed.alpha_id], datasets=["default"]
    )
    return task, await fed.final_run(task)


async def test_the_node_refuses_small_cells_the_image_wrote_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vfed.node.finish")
    # the image's own rule refuses unchecked outputs (the test harness allows them for the other test images)
    policies = {"allowed_images": [{"image": SMALLCELLS_IMAGE, "unchecked_outputs": "refuse"}]}
    async with federation(tmp_path, policies=policies) as fed:
        expected = {
            "counts": "disclosure-refused: min-cell-count",
            "model_lie": "bad-output: malformed structured output",
            "plain": "disclosure-refused: unchecked-output",
        }
        for method, reason in expected.items():
            task, run = await _run(fed, method)
            assert (run["status"], run["reason"], run["exit_code"]) == ("failed", reason, 0), method
            assert run["result_blob_id"] is None, method  # nothing sealed, nothing uploaded
            view = await initiator_view(fed, task, run)
            assert fed.secret not in view and "10.5" not in view, method
        assert fed.secret.encode() not in server_storage(fed.server)
        # the node's own log says what it refused, for alpha's operator
        refused = [r.getMessage() for r in caplog.records if "output refused" in r.getMessage()]
        assert any("min-cell-count" in line and "part 'value'" in line for line in refused), refused

        task, run = await _run(fed, "total")
        assert (run["status"], run["reason"]) == ("completed", None)
        [released] = await fed.beta.results(task)
        assert released == {"records": {"records": 12}}
