"""Session fixtures for real components, and a per-marker summary at the end of the run."""

from __future__ import annotations

import contextlib
import os
import signal
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import docker_registry, infra

MARKERS = ("docker", "mqtt", "postgres", "netns", "k8s", "fabric", "slow")


@pytest.fixture(autouse=True)
def _own_client_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The researcher client's files (trust store, key, credentials) go to each test's own folder, never the
    developer's config: a pin made at first sight against one test's server would name another key in the
    next."""
    monkeypatch.setenv("VFED_CONFIG_DIR", str(tmp_path / "vfed-config"))
    monkeypatch.setenv("VFED_TRUST_FILE", str(tmp_path / "vfed-config" / "trusted_orgs"))
    monkeypatch.delenv("VFED_TRUST", raising=False)
    monkeypatch.delenv("VFED_KEY_FILE", raising=False)
    monkeypatch.delenv("VFED_TOKEN", raising=False)


@pytest.fixture(autouse=True)
def _job_volumes_removed(request: pytest.FixtureRequest) -> Iterator[None]:
    """A job's temporary volume outlives a stopped agent on purpose (the job may go on after a restart); a
    test's agents stop for good, so the job volumes its nodes made (`vfed-<node>-<job>-tmp`) go with it."""
    if request.node.get_closest_marker("docker") is None:
        yield
        return
    try:
        import docker

        engine = docker.from_env(timeout=60)
        before = {v.name for v in engine.volumes.list()}
    except Exception:  # no engine: the test itself says so
        yield
        return
    yield
    for volume in engine.volumes.list():
        name = volume.name
        if name not in before and name.startswith("vfed-") and name.endswith("-tmp"):
            with contextlib.suppress(Exception):  # still mounted by a container the test left: reported there
                volume.remove()
    engine.close()


@pytest.fixture(scope="session")
def docker_client() -> Iterator[object]:
    try:
        import docker

        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:  # any failure to reach the engine means: no engine here
        infra.missing(
            "docker", f"no Docker engine answers ({exc.__class__.__name__}: {exc}); run `make infra`"
        )
        raise AssertionError("unreachable") from exc
    yield client
    client.close()


@pytest.fixture(scope="session")
def mosquitto_server() -> Iterator[infra.Mosquitto]:
    with infra.mosquitto() as broker:
        yield broker


@pytest.fixture
def mqtt_broker(mosquitto_server: infra.Mosquitto) -> infra.Broker:
    """A running Mosquitto on loopback (restarted if a previous test stopped it)."""
    if mosquitto_server.proc is None:
        mosquitto_server.start()
    return infra.Broker("127.0.0.1", mosquitto_server.port)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[infra.Postgres]:
    with infra.postgres() as pg:
        yield pg


@pytest.fixture(scope="session")
def moto_server() -> Iterator[infra.S3Server]:
    """moto's standalone S3 server for the session (tests make a bucket each: tests/server/s3_testkit.py)."""
    with infra.moto_s3() as s3:
        yield s3


@pytest.fixture(scope="session")
def oci_registry() -> Iterator[docker_registry.Registry]:
    """Debian's docker-registry on loopback, open (plain http), for the session; tests push tiny images to it
    (tests/docker_registry.py), which are removed from the engine when it stops."""
    with docker_registry.registry() as registry:
        yield registry


@pytest.fixture
def postgres_url(postgres_server: infra.Postgres) -> str:
    """URL (postgresql+asyncpg) of a fresh, empty database on the session's real PostgreSQL."""
    return postgres_server.url(infra.create_database(postgres_server))


# --- per-marker summary -------------------------------------------------------------------------------------

_markers_of: dict[str, tuple[str, ...]] = {}
_outcomes: dict[str, Counter[str]] = defaultdict(Counter)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Fabric tests skip (or fail when components are required) in their own fixture, tests/fabric/conftest.py,
    # which finds the binaries in $VFED_FABRIC_DIR or ../shared/fabric rather than on PATH.
    for item in items:
        _markers_of[item.nodeid] = tuple(m for m in MARKERS if item.get_closest_marker(m) is not None)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    outcome = None
    if report.when == "call":
        outcome = report.outcome
    elif report.when == "setup" and report.outcome != "passed":
        outcome = report.outcome  # skipped or errored in setup
    elif report.when == "teardown" and report.outcome == "failed":
        outcome = "failed"
    if outcome is None:
        return
    for marker in _markers_of.get(report.nodeid, ()) or ("unmarked",):
        _outcomes[marker][outcome] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _outcomes:
        return
    terminalreporter.section("vfed: tests per marker")
    for marker in (*MARKERS, "unmarked"):
        c = _outcomes.get(marker, Counter())
        ran = c["passed"] + c["failed"]
        terminalreporter.write_line(
            f"marker {marker:9s} ran {ran:4d}  passed {c['passed']:4d}  failed {c['failed']:3d}  "
            f"skipped {c['skipped']:3d}"
        )
    if os.environ.get(infra.REQUIRE_ENV) == "1":
        terminalreporter.write_line(
            "(components required: a missing docker/mqtt/postgres/netns/fabric/kubectl fails, never skips)"
        )


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C must work in the programs tests start (vnode attach, vfed task wait are sent SIGINT). A shell
    that starts `make test` in the background without job control hands it SIGINT ignored, and a child
    inherits an ignored signal, so Python in it would never raise KeyboardInterrupt. Undo that here: a
    Python handler in this process is the default disposition in the children it starts."""
    del config
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
