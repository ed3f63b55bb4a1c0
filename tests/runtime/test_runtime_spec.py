"""The runtime's plain-data parts: run specs, host path translation, the hardened container definition, image
references, the Kubernetes runtime's kept outcomes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from vfed.node.runtime import (
    DatasetMount,
    ExitStatus,
    NotFound,
    PermanentStartError,
    RunLimits,
    RunSpec,
    algorithm_env,
)
from vfed.node.runtime.base import container_name, job_volume_name
from vfed.node.runtime.docker import exit_reason, parse_handle
from vfed.node.runtime.docker_config import DockerRuntimeConfig
from vfed.node.runtime.docker_spec import check_local_paths, container_kwargs, grant_container_user
from vfed.node.runtime.kubernetes_config import RegistryEndpoint
from vfed.node.runtime.kubernetes_ended import EndedRuns
from vfed.node.runtime.oci_registry import parse_reference


def spec(tmp_path: Path, **kw: object) -> RunSpec:
    fields: dict[str, object] = {
        "run_id": "r1",
        "job_id": "j1",
        "node_name": "n1",
        "organization_id": "o1",
        "image": "img",
        "run_dir": str(tmp_path),
    }
    return RunSpec.model_validate(fields | kw)


@pytest.mark.parametrize(
    ("mapping", "path", "expected"),
    [
        ({}, "/var/lib/vnode/runs/1", "/var/lib/vnode/runs/1"),
        ({"/var/lib/vnode": "/srv/vnode"}, "/var/lib/vnode/runs/1", "/srv/vnode/runs/1"),
        ({"/var/lib/vnode": "/srv/vnode"}, "/var/lib/vnode", "/srv/vnode"),
        ({"/data": "/host/data"}, "/database/x", "/database/x"),  # a prefix of the name is not a parent
        ({"/d": "/h1", "/d/sub": "/h2"}, "/d/sub/x", "/h2/x"),  # the longest prefix wins
        ({"/d/": "/h1/"}, "/d/x", "/h1/x"),
    ],
)
def test_host_path_map(mapping: dict[str, str], path: str, expected: str) -> None:
    assert DockerRuntimeConfig(host_path_map=mapping).to_host_path(path) == expected


def test_host_path_map_needs_absolute_paths() -> None:
    with pytest.raises(ValidationError, match="absolute"):
        DockerRuntimeConfig(host_path_map={"relative": "/x"})


def test_config_rejects_unknown_keys_and_root() -> None:
    with pytest.raises(ValidationError):
        DockerRuntimeConfig.model_validate({"memory": "1g"})
    with pytest.raises(ValidationError):
        DockerRuntimeConfig(uid=0)


@pytest.mark.parametrize("field", ["run_id", "job_id", "node_name"])
@pytest.mark.parametrize("bad", ["", "Upper", "a/b", "../x", "x" * 64, "a b"])
def test_names_that_end_up_in_docker_names_are_checked(tmp_path: Path, field: str, bad: str) -> None:
    with pytest.raises(ValidationError):
        spec(tmp_path, **{field: bad})


def test_dataset_labels_and_paths_are_checked() -> None:
    for label, path in [("a/b", "/x"), ("", "/x"), ("ok", "relative")]:
        with pytest.raises(ValidationError):
            DatasetMount(label=label, host_path=path, type="csv")


def test_limits_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        RunLimits(memory_bytes=0)


def test_names() -> None:
    assert container_name("n1", "42") == "vfed-n1-run-42"
    assert job_volume_name("n1", "7") == "vfed-n1-7-tmp"


def test_algorithm_environment() -> None:
    env = algorithm_env(
        run_id="1",
        job_id="2",
        organization_id="3",
        datasets=[DatasetMount(label="my-cohort", host_path="/d", type="parquet")],
        with_proxy=True,
        extra={"X": "y"},
    )
    assert env == {
        "INPUT_FILE": "/mnt/run/input",
        "OUTPUT_FILE": "/mnt/run/output",
        "TEMPORARY_FOLDER": "/mnt/job/tmp",
        "RUN_ID": "1",
        "JOB_ID": "2",
        "ORGANIZATION_ID": "3",
        "DATASETS": "my-cohort",
        "DATASET_MY_COHORT_URI": "/mnt/data/my-cohort",
        "DATASET_MY_COHORT_TYPE": "parquet",
        "PROXY_SOCKET": "/run/vfed/proxy.sock",
        "X": "y",
    }
    assert "PROXY_SOCKET" not in algorithm_env(
        run_id="1", job_id="2", organization_id="3", datasets=[], with_proxy=False
    )


def test_container_definition_is_hardened(tmp_path: Path) -> None:
    config = DockerRuntimeConfig(host_path_map={str(tmp_path): "/host"}, pids_limit=99)
    s = spec(
        tmp_path,
        proxy_socket=str(tmp_path / "sock" / "proxy.sock"),
        datasets=[DatasetMount(label="d", host_path="/srv/d.csv", type="csv")],
        env={"HOME": "/mnt/tmp", "A": "b"},
        labels={"vfed.node": "spoofed", "team": "x"},
    )
    kw = container_kwargs(s, config)
    assert kw["network_mode"] == "none" and kw["read_only"] and kw["cap_drop"] == ["ALL"]
    assert kw["security_opt"] == ["no-new-privileges"] and kw["privileged"] is False
    assert kw["user"] == "10001:10001" and kw["pids_limit"] == 99
    assert kw["mem_limit"] == kw["memswap_limit"] == config.memory_bytes
    assert kw["environment"] == {"HOME": "/mnt/tmp", "A": "b"}
    own = {"vfed.node": "n1", "vfed.run_id": "r1", "vfed.job_id": "j1"}
    assert kw["labels"] == {"team": "x", **own}
    mounts = {m["Target"]: (m["Source"], m["ReadOnly"], m["Type"]) for m in kw["mounts"]}
    assert mounts == {
        "/mnt/run": ("/host", False, "bind"),
        "/mnt/job": ("vfed-n1-j1-tmp", False, "volume"),
        "/run/vfed": ("/host/sock", True, "bind"),  # the socket's folder, so a new socket shows up
        "/mnt/data/d": ("/srv/d.csv", True, "bind"),
    }


def test_local_paths_are_checked(tmp_path: Path) -> None:
    with pytest.raises(PermanentStartError, match="not a folder"):
        check_local_paths(spec(tmp_path, run_dir=str(tmp_path / "missing")))
    with pytest.raises(PermanentStartError, match="proxy socket"):
        check_local_paths(spec(tmp_path, proxy_socket=str(tmp_path / "missing.sock")))
    (tmp_path / "sock").mkdir()
    sock_path = tmp_path / "sock" / "proxy.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        check_local_paths(spec(tmp_path, proxy_socket=str(sock_path)))
        # The container gets the whole folder: anything else in it would be shown to the run.
        (tmp_path / "sock" / "journal.sqlite3").write_text("")
        with pytest.raises(PermanentStartError, match="must hold only the socket; it also holds journal"):
            check_local_paths(spec(tmp_path, proxy_socket=str(sock_path)))
    other_name = tmp_path / "ok.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(other_name))
        with pytest.raises(PermanentStartError, match=r"must be named proxy\.sock"):
            check_local_paths(spec(tmp_path, proxy_socket=str(other_name)))


def test_container_user_gets_the_run_folder_and_socket(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    (run_dir / "input").write_text("x")
    (tmp_path / "sock").mkdir(mode=0o700)
    sock_path = tmp_path / "sock" / "proxy.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        sock_path.chmod(0o600)
        grant_container_user(
            spec(tmp_path, run_dir=str(run_dir), proxy_socket=str(sock_path)), DockerRuntimeConfig()
        )
        assert sock_path.stat().st_mode & 0o777 == 0o666
        assert sock_path.parent.stat().st_mode & 0o777 == 0o755  # the mounted folder can be entered
    if os.geteuid() == 0:
        assert (run_dir.stat().st_uid, (run_dir / "input").stat().st_uid) == (10001, 10001)
    else:
        assert run_dir.stat().st_mode & 0o777 == 0o777


def test_handles() -> None:
    assert parse_handle("docker:vfed-n-run-1") == "vfed-n-run-1"
    for bad in ("docker:", "k8s:ns/job", "vfed-n-run-1"):
        with pytest.raises(NotFound):
            parse_handle(bad)


@pytest.mark.parametrize(
    ("code", "oom", "error", "expected"),
    [
        (0, False, None, None),
        (3, False, None, "exit code 3"),
        (137, False, None, "killed (SIGKILL)"),
        (143, False, None, "terminated (SIGTERM)"),
        (137, True, None, "out of memory (limit 64 MiB)"),
        (None, False, None, None),
        (1, False, "mount failed", "mount failed"),
    ],
)
def test_exit_reasons(code: int | None, oom: bool, error: str | None, expected: str | None) -> None:
    assert exit_reason(code, oom, error, 64 << 20) == expected


def test_references_are_read_as_docker_reads_them() -> None:
    assert str(parse_reference("ubuntu", "docker.io")) == "docker.io/library/ubuntu:latest"
    assert str(parse_reference("vfed/base:1", "docker.io")) == "docker.io/vfed/base:1"
    assert str(parse_reference("vfed/base", "reg.example:5000")) == "reg.example:5000/vfed/base:latest"
    assert str(parse_reference("localhost/a/b@sha256:" + "0" * 64, "x")) == "localhost/a/b@sha256:" + "0" * 64
    assert parse_reference("127.0.0.1:5000/a:v@sha256:" + "1" * 64, "x").tag == "v"
    for bad in ("a@sha512:00", "UPPER/case", "a:b:c", "a//b", ""):
        with pytest.raises(ValueError):
            parse_reference(bad, "docker.io")
    with pytest.raises(ValueError, match="needs `insecure: true`"):
        RegistryEndpoint(url="http://registry.example.org")
    assert RegistryEndpoint(url="http://registry.example.org", insecure=True).insecure
    assert RegistryEndpoint(url="http://127.0.0.1:5000").url


def test_kept_outcomes_survive_a_new_instance_until_forgotten(tmp_path: Path) -> None:
    folder = tmp_path / "kubernetes-ended"
    killed = ExitStatus(exit_code=137, reason="killed (SIGKILL)")
    EndedRuns(folder).put("k8s:ns/vfed-n-run-1", killed, b"last words\n")
    assert (folder.stat().st_mode & 0o777) == 0o700
    again = EndedRuns(folder)  # a restarted agent's runtime
    assert again.get("k8s:ns/vfed-n-run-1") == (killed, b"last words\n")
    assert again.get("k8s:ns/vfed-n-run-2") is None
    again.forget("k8s:ns/vfed-n-run-1")
    assert EndedRuns(folder).get("k8s:ns/vfed-n-run-1") is None and list(folder.iterdir()) == []
    EndedRuns(folder).put("k8s:ns/vfed-n-run-3", killed, b"")
    next(folder.glob("*.status.json")).write_text("{not json")  # a damaged file: unknown, not a crash
    assert EndedRuns(folder).get("k8s:ns/vfed-n-run-3") is None
    memory_only = EndedRuns(None)
    memory_only.put("k8s:ns/vfed-n-run-4", killed, b"x")
    assert memory_only.get("k8s:ns/vfed-n-run-4") == (killed, b"x")
