"""The researcher guide's notebook (docs/researchers.ipynb), executed headless by nbclient in a real Jupyter
kernel against a real federation: the server app, two node agents running the summary_stats example in
Docker, `vfed login` saved by the real CLI. Only the notebook's parameters cell is replaced (the
collaboration's name); every other cell runs as the guide shows it. Its DataFrame must hold the pooled
statistics, and no terminal escape code may reach the notebook."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nbclient
import nbformat
import numpy as np
import pandas as pd
import pytest
from tests.client.test_client_saved_login import vfed
from tests.node.node_harness import PASSWORD, Server, csv_nodes

pytestmark = [pytest.mark.docker, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "docs" / "researchers.ipynb"
IMAGE = "vfed-examples/summary_stats:latest"
ORGS = ("north", "south")


def _frames() -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(7)
    return {
        org: pd.DataFrame({"age": rng.integers(20, 80, rows), "bmi": rng.normal(26, 4, rows).round(1)})
        for org, rows in zip(ORGS, (200, 260), strict=True)  # 3 histogram bins of 5 or more each
    }


@contextlib.asynccontextmanager
async def federation(tmp_path: Path, frames: dict[str, pd.DataFrame]) -> AsyncIterator[Server]:
    """Server with collaboration `study` of north and south, each with a node offering its frame as the
    `default` dataset; north's researcher logged in with `vfed login` (the saved login the notebook uses)."""
    server = Server(tmp_path / "server", mqtt_url=None)
    keys = await server.seed(list(ORGS), collaboration="study")
    await server.start()
    files = {org: tmp_path / f"{org}.csv" for org in frames}
    for org, frame in frames.items():
        frame.to_csv(files[org], index=False)
    try:
        async with csv_nodes(tmp_path, server, keys, files, "nb") as settings:
            key = str(settings["north"].key_path)
            login = await asyncio.to_thread(
                vfed, "login", "--url", server.url, "--username", "res-north", "--password", PASSWORD,
                "--key-file", key,
            )  # fmt: skip
            assert login.returncode == 0, login.stderr
            yield server
    finally:
        await server.stop()


def _outputs(nb: Any) -> list[dict[str, Any]]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def _text(output: dict[str, Any]) -> str:
    if output["output_type"] == "stream":
        return str(output["text"])
    data = output.get("data", {})
    return str(data.get("text/plain", "")) + str(data.get("text/html", ""))


async def test_the_researcher_notebook_runs_headless_from_login_to_a_dataframe(
    tmp_path: Path, docker_client: Any
) -> None:
    docker_client.images.get(IMAGE)  # made by `make images` (algorithms/examples/build.sh)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (parameters,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert 'COLLABORATION = "study"' in parameters.source and IMAGE in parameters.source
    parameters.source = f'COLLABORATION = "study"\nIMAGE = "{IMAGE}"\nCOLUMNS = ["age", "bmi"]\n'
    nb.cells.insert(-1, nbformat.v4.new_code_cell('print(stats.to_json(orient="index"))'))
    frames = _frames()
    async with federation(tmp_path, frames):
        runner = nbclient.NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        )
        await runner.async_execute(env={**os.environ, "NO_COLOR": "1"})

    outputs = _outputs(nb)
    assert not [o for o in outputs if o["output_type"] == "error"], outputs
    assert not [o for o in outputs if "\x1b" in _text(o)], "a terminal escape code reached the notebook"
    shown = "".join(_text(o) for o in outputs)
    assert "collaboration study" in shown and "you are at north" in shown
    assert "'completed'" in shown  # the status cell's value
    assert re.search(r"task \d+: 1 of 1 runs finished", shown), shown  # wait's plain lines, no widget here
    printed = [o["text"] for o in outputs if o["output_type"] == "stream" and o["text"].startswith("{")]
    stats = json.loads(printed[-1])
    pooled = pd.concat(frames.values())
    for column in ("age", "bmi"):
        assert stats[column]["count"] == len(pooled)
        assert stats[column]["mean"] == pytest.approx(pooled[column].mean())
        assert stats[column]["variance"] == pytest.approx(pooled[column].var(ddof=1))
        assert stats[column]["min"] == pooled[column].min() and stats[column]["max"] == pooled[column].max()
