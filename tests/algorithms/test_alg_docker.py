"""Example images on the real Docker engine: built from vfed/algorithm-base by algorithms/examples/build.sh,
run like the node runs them (no network, all capabilities dropped, read-only root, bind-mounted files)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from alg_helpers import EXAMPLES, example, partitions
from tests import infra

from vfed.common.manifest import MANIFEST_LABEL, Manifest
from vfed.common.payload import AlgorithmError, TaskInput, decode_result, encode_result

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def example_images(docker_client: Any) -> dict[str, Any]:
    try:
        docker_client.images.get("vfed/algorithm-base")
    except Exception:
        infra.missing("docker", "no vfed/algorithm-base image (run: make images)")
    build = subprocess.run(
        ["bash", str(EXAMPLES / "build.sh")], capture_output=True, text=True, timeout=600, check=False
    )
    assert build.returncode == 0, build.stderr + build.stdout
    return {
        name: docker_client.images.get(f"vfed-examples/{name}:latest")
        for name in ("summary_stats", "dp_stats")
    }


def _run(
    docker_client: Any, image: Any, folder: Path, task: TaskInput, data: Path, min_rows: int = 10
) -> tuple[int, str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o777)  # the algorithm runs as uid 10001
    (folder / "input").write_bytes(task.to_json())
    container = docker_client.containers.run(
        image.id,
        detach=True,
        network_mode="none",
        cap_drop=["ALL"],
        read_only=True,
        security_opt=["no-new-privileges"],
        environment={
            "INPUT_FILE": "/mnt/run/input",
            "OUTPUT_FILE": "/mnt/run/output",
            "DATASETS": "default",
            "DATASET_DEFAULT_URI": "/mnt/data/default",
            "DATASET_DEFAULT_TYPE": "csv",
            "VFED_MIN_ROWS": str(min_rows),
        },
        volumes={
            str(folder): {"bind": "/mnt/run", "mode": "rw"},
            str(data): {"bind": "/mnt/data/default", "mode": "ro"},
        },
    )
    try:
        status = container.wait(timeout=120)
        log = container.logs().decode()
    finally:
        container.remove(force=True)
    return int(status["StatusCode"]), log, (folder / "output").read_bytes()


def test_summary_image_runs_without_network(
    docker_client: Any, example_images: dict[str, Any], tmp_path: Path
) -> None:
    frame = partitions()[0]
    data = tmp_path / "data.csv"
    frame.to_csv(data, index=False)
    task = TaskInput(method="partial_stats", kwargs={"columns": ["age", "bmi", "site"]})
    code, log, output = _run(docker_client, example_images["summary_stats"], tmp_path / "run1", task, data)
    assert code == 0, log
    result = decode_result(output)
    released = example("summary_stats").partial_stats(frame, columns=["age", "bmi", "site"])
    expected = decode_result(encode_result(released))  # the structured parts, as released
    assert result["site"] == expected["site"]
    for column in ("age", "bmi"):
        for key in ("n", "missing", "min", "max"):
            assert result[column][key] == expected[column][key]
        assert result[column]["mean"] == pytest.approx(expected[column]["mean"], rel=1e-12)
        assert result[column]["m2"] == pytest.approx(expected[column]["m2"], rel=1e-12)

    code, log, output = _run(
        docker_client, example_images["summary_stats"], tmp_path / "run2", task, data, min_rows=500
    )
    assert code == 3, log
    assert f"has {len(frame)} records; this node shares aggregates over at least 500" in log
    with pytest.raises(AlgorithmError) as caught:
        decode_result(output)
    assert caught.value.type == "DisclosureError"


def test_images_carry_their_manifest(example_images: dict[str, Any]) -> None:
    manifests = {
        name: Manifest.model_validate(json.loads(image.labels[MANIFEST_LABEL]))
        for name, image in example_images.items()
    }
    assert manifests["dp_stats"].functions["dp_sum"].epsilon_kwarg == "epsilon"
    assert set(manifests["summary_stats"].functions) == {"partial_stats", "partial_histogram", "summary"}
    assert all(image.labels.get("vfed.inputs") for image in example_images.values())


def test_build_reuses_unchanged_images(example_images: dict[str, Any]) -> None:
    again = subprocess.run(
        ["bash", str(EXAMPLES / "build.sh"), "dp_stats"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "vfed-examples/dp_stats:latest: reused (inputs unchanged)" in again.stdout
