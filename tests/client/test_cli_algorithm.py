"""`vfed algorithm new|build` as a user runs them: the template written to a fresh folder, its own test run
there with pytest (offline, in a child process like a user's shell), and the one-line refusals with exit codes
2 (usage) and 1 (failure). The build itself, on a real engine and through real nodes, is in
tests/algorithms/test_alg_template_node.py."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from vfed.client.cli import main

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def pytest_in(folder: Path) -> subprocess.CompletedProcess[str]:
    """`python -m pytest` in the folder, as its author would run it: this tree's vfed, no network proxy."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONPATH"] = os.pathsep.join(
        str(ROOT / root) for root in ("common", "node", "server", "proxy", "client", "algorithms")
    )
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_new_writes_a_project_whose_own_test_passes(tmp_path: Path) -> None:
    code, out, err = cli("algorithm", "new", "my_stats", "--dir", str(tmp_path))
    assert code == 0, err
    folder = tmp_path / "my_stats"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "Dockerfile",
        "README.md",
        "build.sh",
        "data/org1.csv",
        "data/org2.csv",
        "my_stats.py",
        "test_my_stats.py",
    ]
    assert f"created {folder}" in out
    dockerfile = (folder / "Dockerfile").read_text()
    assert "COPY my_stats.py /opt/vfed-algorithm/my_stats.py" in dockerfile
    assert "ENV VFED_ALGORITHM_MODULE=my_stats" in dockerfile
    assert os.access(folder / "build.sh", os.X_OK)
    assert "vfed algorithm build . --tag" in (folder / "build.sh").read_text()
    assert "{{name}}" not in "".join(p.read_text() for p in folder.rglob("*") if p.is_file())

    done = pytest_in(folder)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout

    # The test checks the algorithm: a wrong partial sum makes it fail.
    module = folder / "my_stats.py"
    module.write_text(
        module.read_text().replace('"sum": float(values.sum())', '"sum": float(values.sum()) + 1')
    )
    broken = pytest_in(folder)
    assert broken.returncode == 1 and "1 failed, 2 passed" in broken.stdout, broken.stdout


def test_new_refuses_an_existing_folder_and_leaves_it_alone(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    code, _, err = cli("algorithm", "new", "taken", "--dir", str(tmp_path))
    assert code == 1
    assert err == f"vfed: error: {tmp_path / 'taken'} already exists; choose another name or --dir\n"
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no staging folder left

    code, _, err = cli("algorithm", "new", "fine", "--dir", str(tmp_path / "nowhere"))
    assert (code, err) == (1, f"vfed: error: {tmp_path / 'nowhere'} is not a folder\n")


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("My-Stats", "use lower-case letters, digits and _"),
        ("2stats", "use lower-case letters, digits and _"),
        ("json", "standard-library module"),
        ("class", "keyword"),
        ("pandas", "already a Python package here"),
        ("vfed", "already a Python package here"),
    ],
)
def test_new_refuses_names_the_image_could_not_import(tmp_path: Path, name: str, says: str) -> None:
    code, _, err = cli("algorithm", "new", name, "--dir", str(tmp_path))
    assert code == 2
    assert err.startswith("vfed: error: NAME: ") and says in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_build_refuses_what_it_cannot_use_in_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("algorithm", "new", "ok_alg", "--dir", str(tmp_path))[0] == 0
    project = str(tmp_path / "ok_alg")
    dead = {"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    cases = [
        (("algorithm", "build", str(tmp_path / "missing")), 2, "FOLDER: "),
        (("algorithm", "build", project, "--tag", "Upper/Case:1"), 2, "--tag: 'Upper/Case:1' is not a valid"),
        (("algorithm", "build", project, "--tag", "x:y", "--label", "novalue"), 2, "--label: 'novalue'"),
        (("algorithm", "build", project, "--tag", "x:y"), 1, "Docker engine not running or not reachable"),
    ]
    for args, code, says in cases:
        got, _, err = cli(*args, env=dead)
        assert got == code, (args, err)
        assert err.startswith("vfed: error: ") and says in err and err.count("\n") == 1, (args, err)


@pytest.mark.docker
def test_build_refuses_folders_it_cannot_build(tmp_path: Path, docker_client: object) -> None:
    """Refused before anything is built: no Dockerfile, --base-image the Dockerfile cannot take, a base image
    the engine does not have."""
    empty = tmp_path / "empty"
    empty.mkdir()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "Dockerfile").write_text("FROM vfed/algorithm-base\n")
    assert cli("algorithm", "new", "ok_alg", "--dir", str(tmp_path))[0] == 0
    tag = "vfed-test-tpl/never:built"
    cases = [
        ((str(empty),), 2, "holds no Dockerfile (make one with `vfed algorithm new NAME`)"),
        ((str(plain), "--base-image", "vfed/algorithm-base"), 2, "does not declare ARG VFED_ALGORITHM_BASE"),
        (
            (str(tmp_path / "ok_alg"), "--base-image", "vfed-test-tpl/no-such-base:1"),
            1,
            "the base image vfed-test-tpl/no-such-base:1 is not on this Docker engine: build it with "
            "`vnode image build`",
        ),
    ]
    for args, code, says in cases:
        got, _, err = cli("algorithm", "build", *args, "--tag", tag)
        assert got == code, (args, err)
        assert err.startswith("vfed: error: ") and says in err and err.count("\n") == 1, (args, err)


@pytest.mark.docker
def test_a_build_that_fails_says_why_and_leaves_no_image(tmp_path: Path, docker_client: Any) -> None:
    """A module that cannot be imported, one that declares nothing, a Dockerfile that does not build: exit 1
    with one line after the log's tail, and neither the image nor its stage image is left on the engine."""
    assert cli("algorithm", "new", "bad_alg", "--dir", str(tmp_path))[0] == 0
    folder = tmp_path / "bad_alg"
    module = folder / "bad_alg.py"
    original = module.read_text()
    repository = f"vfed-test-tpl/bad-{secrets.token_hex(3)}"
    cases = [
        ("fails at import", original + '\nraise RuntimeError("broken on purpose")\n', None),
        ("declares nothing", '"""nothing declared"""\n', None),
        ("does not build", original, "RUN false\n"),
    ]
    says = {
        "fails at import": "the SDK could not read the manifest: the image's python3 exited 1",
        "declares nothing": "the module declares no function (@federated or @central)",
        "does not build": f"building {repository}:vfed-stage-",
    }
    dockerfile = (folder / "Dockerfile").read_text()
    try:
        for case, text, extra in cases:
            module.write_text(text)
            (folder / "Dockerfile").write_text(dockerfile + (extra or ""))
            got, _, err = cli("algorithm", "build", str(folder), "--tag", f"{repository}:t")
            assert got == 1, (case, err)
            last = err.splitlines()[-1]
            assert last.startswith("vfed: error: ") and says[case] in last, (case, err)
            if case == "fails at import":
                assert "RuntimeError: broken on purpose" in err  # the tail of the image's stderr, first
            left = [t for i in docker_client.images.list() for t in i.tags if t.startswith(repository)]
            assert not left, (case, left)
    finally:
        for image in docker_client.images.list():
            for name in image.tags:
                if name.startswith(repository):
                    docker_client.images.remove(name, force=True)
