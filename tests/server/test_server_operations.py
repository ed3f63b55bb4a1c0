"""Operations: the schema check at start (`--upgrade`), database errors in one line, backup and restore."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from tests import infra
from vserver_testkit import JWT_SECRET, seed

from vfed.server import db
from vfed.server.app import create_app
from vfed.server.config import Settings

VSERVER = [sys.executable, "-m", "vfed.server.cli", "--log-level", "WARNING"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("VFED_SERVER__")}


def _vserver(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VSERVER, *args], capture_output=True, text=True, env=_env(), timeout=90, check=False
    )


def _config(tmp_path: Path, **keys: Any) -> Path:
    cfg = {
        "port": infra.free_port(),
        "data_dir": str(tmp_path / "data"),
        "jwt_secret": "operations-secret-long-enough-for-hs256",
        "mqtt": {"embedded_port": infra.free_port()},
        "metrics": {"port": None},
        **keys,
    }
    path = tmp_path / "vserver.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextmanager
def _started(config: Path, *args: str) -> Iterator[int]:
    """`vserver start` until the test ends; yields the port once it answers."""
    port = int(yaml.safe_load(config.read_text())["port"])
    log = (config.parent / "vserver.log").open("wb")
    proc = subprocess.Popen(
        [*VSERVER, "start", "--config", str(config), *args], stdout=log, stderr=log, env=_env()
    )
    try:
        infra.wait_for_port(port, 30, lambda: proc.poll() is None)
        yield port
    finally:
        infra.stop(proc)
        log.close()


async def _at_revision(url: str, revision: str) -> None:
    engine = db.make_engine(url)
    try:
        await db.upgrade(engine, revision)
    finally:
        await engine.dispose()


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


async def test_start_refuses_an_older_schema_until_upgraded(tmp_path: Path) -> None:
    config = _config(tmp_path)
    (tmp_path / "data").mkdir()
    await _at_revision(f"sqlite+aiosqlite:///{tmp_path / 'data' / 'vserver.sqlite'}", "0009")
    line = _one_error_line(await asyncio.to_thread(_vserver, "start", "--config", str(config)))
    assert "schema is at revision 0009" in line and "vserver db upgrade" in line and "--upgrade" in line
    with _started(config, "--upgrade") as port:
        async with aiohttp.ClientSession() as http:
            r = await http.get(f"http://127.0.0.1:{port}/api/v1/openapi.json")
            assert r.status == 200
    with _started(config) as port:  # migrated: a plain start serves now
        async with aiohttp.ClientSession() as http:
            r = await http.get(f"http://127.0.0.1:{port}/api/v1/openapi.json")
            assert r.status == 200


async def test_start_on_an_empty_database_creates_the_schema(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with _started(config) as port:
        async with aiohttp.ClientSession() as http:
            r = await http.get(f"http://127.0.0.1:{port}/api/v1/openapi.json")
            assert r.status == 200
    engine = db.make_engine(f"sqlite+aiosqlite:///{tmp_path / 'data' / 'vserver.sqlite'}")
    try:
        await db.prepare(engine, upgrade_schema=False)  # at head: nothing to refuse
    finally:
        await engine.dispose()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'vserver.sqlite'}"
    await _at_revision(url, "head")
    engine = db.make_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
        with pytest.raises(db.DatabaseError, match="9999, newer than this vserver knows"):
            await db.prepare(engine, upgrade_schema=True)
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("url", "needles"),
    [
        (
            "mysql+aiomysql://vfed:secret@127.0.0.1/vfed",
            ["driver aiomysql is not installed", "pip install aiomysql"],
        ),
        ("postgresql://vfed@127.0.0.1/vfed", ["driver psycopg is not installed", "postgresql+asyncpg://"]),
        ("nosuchdb+driver://x/y", ["no SQLAlchemy dialect 'nosuchdb+driver'"]),
        ("not a url", ["is not a database URL"]),
    ],
)
def test_a_driver_that_is_missing_is_named(tmp_path: Path, url: str, needles: list[str]) -> None:
    line = _one_error_line(_vserver("start", "--config", str(_config(tmp_path, database_url=url))))
    assert all(n in line for n in needles), line
    assert "secret" not in line and "cannot listen" not in line


def test_missing_asyncpg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # as if vfed[postgres] were not installed
    with pytest.raises(
        db.DatabaseError, match=r"asyncpg is not installed \(pip install 'vfed\[postgres\]'\)"
    ):
        db.open_engine("postgresql+asyncpg://vfed@127.0.0.1/vfed")


def test_unreachable_postgres_says_so(tmp_path: Path) -> None:
    closed = infra.free_port()
    url = f"postgresql+asyncpg://vfed:secret@127.0.0.1:{closed}/vfed"
    for args in (["start"], ["db", "upgrade"]):
        line = _one_error_line(_vserver(*args, "--config", str(_config(tmp_path, database_url=url))))
        assert f"the database at postgresql+asyncpg://vfed:***@127.0.0.1:{closed}/vfed is unreachable" in line
        assert "cannot listen" not in line


async def _seeded_server_with_blobs(
    data_dir: Path, database_url: str | None = None
) -> tuple[str, str, str, bytes]:
    """A task whose input is a file blob (past the row limit) and one in a row; returns ids and bytes."""
    settings = Settings(data_dir=data_dir, jwt_secret=JWT_SECRET, database_url=database_url)
    from aiohttp.test_utils import TestClient, TestServer

    async with TestClient(TestServer(create_app(settings))) as client:
        world = await seed(client)
        big = os.urandom(200 * 1024)
        big_id = await world.upload("a_res", big)
        task = await world.task("a_res", "ab", ["A", "B"])
        status, body = await world.call("a_res", "GET", f"/blobs/{big_id}")
        assert status == 200 and body == big
        return str(task["id"]), big_id, str(world.orgs["A"]), big


async def _read_back(
    data_dir: Path, task_id: str, blob_id: str, database_url: str | None = None
) -> tuple[int, bytes]:
    from aiohttp.test_utils import TestClient, TestServer
    from vserver_testkit import World

    settings = Settings(data_dir=data_dir, jwt_secret=JWT_SECRET, database_url=database_url)
    async with TestClient(TestServer(create_app(settings))) as client:
        world = World(client)
        status, task = await world.call("a_res", "GET", f"/tasks/{task_id}")
        assert status == 200, task
        status, body = await world.call("a_res", "GET", f"/blobs/{blob_id}")
        assert status == 200
        return int(task["id"]), body


async def test_backup_and_restore_round_trip(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    task_id, blob_id, _org, big = await _seeded_server_with_blobs(source)
    assert list((source / "blobs").rglob(blob_id)), "the big blob should be a file"
    archive = tmp_path / "backups" / "vfed.tar.gz"
    result = await asyncio.to_thread(_vserver, "backup", str(archive), "--data-dir", str(source))
    assert result.returncode == 0, result.stderr
    assert archive.stat().st_mode & 0o777 == 0o600
    result = await asyncio.to_thread(_vserver, "restore", str(archive), "--data-dir", str(target))
    assert result.returncode == 0, result.stderr
    found_task, body = await _read_back(target, task_id, blob_id)
    assert found_task == int(task_id) and body == big
    # a non-empty data folder is not overwritten without --force, and is with it
    again = await asyncio.to_thread(_vserver, "restore", str(archive), "--data-dir", str(target))
    assert "is not empty" in _one_error_line(again) and "--force" in again.stderr
    forced = await asyncio.to_thread(_vserver, "restore", str(archive), "--data-dir", str(target), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (await _read_back(target, task_id, blob_id))[1] == big


def test_restore_of_something_else_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive")
    line = _one_error_line(_vserver("restore", str(junk), "--data-dir", str(tmp_path / "d")))
    assert "not a vserver backup" in line


@pytest.mark.postgres
def test_backup_of_postgres_points_at_pg_dump(tmp_path: Path, postgres_url: str) -> None:
    config = _config(tmp_path, database_url=postgres_url)
    line = _one_error_line(_vserver("backup", str(tmp_path / "b.tar.gz"), "--config", str(config)))
    assert "pg_dump" in line and "--blobs-only" in line
    result = _vserver("backup", str(tmp_path / "b.tar.gz"), "--config", str(config), "--blobs-only")
    assert result.returncode == 0, result.stderr


def _archive(path: Path, members: dict[str, bytes]) -> None:
    """A gzipped tar with a valid manifest and these members."""
    import io
    import json
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        manifest = json.dumps({"format": 1, "created": 0, "database": False, "blobs": len(members)})
        for name, data in {"vfed-backup.json": manifest.encode(), **members}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("name", ["blobs//tmp/escaped", "blobs/../escaped", "blobs/a/../../escaped"])
def test_restore_refuses_members_outside_the_blob_folder(tmp_path: Path, name: str) -> None:
    """A crafted archive cannot write outside the blob folder, and nothing at all is written."""
    archive = tmp_path / "evil.tar.gz"
    escaped = Path("/tmp/escaped") if name.startswith("blobs//") else tmp_path / "data" / "escaped"
    escaped.unlink(missing_ok=True)
    _archive(archive, {"blobs/fine": b"ok", name: b"outside"})
    line = _one_error_line(_vserver("restore", str(archive), "--data-dir", str(tmp_path / "data")))
    assert "is not a path inside the blob folder" in line, line
    assert not escaped.exists() and not (tmp_path / "escaped").exists()
    assert not (tmp_path / "data" / "blobs" / "fine").exists()


def test_unusable_data_folder_is_one_line_not_a_listen_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = _config(tmp_path, data_dir=str(blocker / "data"))
    line = _one_error_line(_vserver("start", "--config", str(config)))
    assert str(blocker / "data") in line and "cannot listen" not in line, line


def _tool(*cmd: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.postgres
async def test_postgres_backup_with_pg_dump_and_blobs_only(
    tmp_path: Path, postgres_server: infra.Postgres
) -> None:
    """The documented PostgreSQL path, run as written: pg_dump -Fc, `vserver backup --blobs-only`, then into
    a new empty database pg_restore --no-owner and `vserver restore`; the task and its file blob are back."""
    source_db = infra.create_database(postgres_server)
    target_db = infra.create_database(postgres_server)
    source, target = tmp_path / "source", tmp_path / "target"
    task_id, blob_id, _org, big = await _seeded_server_with_blobs(source, postgres_server.url(source_db))
    dump = tmp_path / "vfed.dump"
    plain = postgres_server.url(source_db, driver="postgresql")
    await asyncio.to_thread(_tool, "pg_dump", "-Fc", "-f", str(dump), plain)
    archive = tmp_path / "vfed-blobs.tar.gz"
    config = _config(tmp_path, database_url=postgres_server.url(source_db), data_dir=str(source))
    result = await asyncio.to_thread(
        _vserver, "backup", "--blobs-only", str(archive), "--config", str(config)
    )
    assert result.returncode == 0, result.stderr

    restored = postgres_server.url(target_db, driver="postgresql")
    await asyncio.to_thread(_tool, "pg_restore", "--no-owner", "-d", restored, str(dump))
    config = _config(tmp_path, database_url=postgres_server.url(target_db), data_dir=str(target))
    result = await asyncio.to_thread(_vserver, "restore", str(archive), "--config", str(config))
    assert result.returncode == 0, result.stderr
    found_task, body = await _read_back(target, task_id, blob_id, postgres_server.url(target_db))
    assert found_task == int(task_id) and body == big


async def test_auto_migrate_from_the_environment_is_the_same_as_upgrade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from vfed.server.config import load_settings

    (tmp_path / "data").mkdir()
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'vserver.sqlite'}"
    await _at_revision(url, "0009")
    monkeypatch.setenv("VFED_SERVER__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("VFED_SERVER__JWT_SECRET", JWT_SECRET)
    settings = load_settings(None)
    assert settings.auto_migrate is False  # the default: an older schema is the operator's step
    with pytest.raises(db.DatabaseError, match="schema is at revision 0009"):
        async with TestClient(TestServer(create_app(settings))):
            pass
    monkeypatch.setenv("VFED_SERVER__AUTO_MIGRATE", "true")
    async with TestClient(TestServer(create_app(load_settings(None)))) as client:
        r = await client.get("/api/v1/openapi.json")
        assert r.status == 200
    engine = db.make_engine(url)
    try:
        await db.prepare(engine, upgrade_schema=False)  # at head now
    finally:
        await engine.dispose()


def test_sqlite_file_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'no-such-folder' / 'vserver.sqlite'}"
    for args in (["start"], ["db", "upgrade"], ["db", "upgrade"]):  # no traceback from aiosqlite's thread
        line = _one_error_line(_vserver(*args, "--config", str(_config(tmp_path, database_url=url))))
        assert "vserver.sqlite cannot be used: unable to open database file" in line, line
