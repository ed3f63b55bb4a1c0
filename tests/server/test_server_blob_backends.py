"""The server on either blob store: a run's result up and down (whole and resumed), the collector, the
`blobs` settings, and a `vserver start` killed mid-upload with S3 (nothing partial visible, nothing lost)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import yaml
from s3_testkit import both_backends, empty_bucket, minio_client
from test_server_blob_stores import until_a_part_arrived
from tests import infra
from vserver_proc import server_process, vserver
from vserver_testkit import World, client, db_url, settings, world

from vfed.server.blob_collector import collect
from vfed.server.blobs import ROW_BYTES
from vfed.server.blobs_s3 import S3BlobStore
from vfed.server.config import ConfigError, S3Settings, load_settings
from vfed.server.state import BLOBS, SESSIONS

__all__ = ["client", "db_url", "settings", "world"]
MIB = 1024 * 1024


@both_backends
async def test_a_runs_result_goes_up_and_comes_back_whole_and_resumed(client: Any, world: World) -> None:
    task = await world.task("a_res", "ab", ["A"], name="big result")
    _, runs = await world.call("a_node", "GET", f"/runs?task_id={task['id']}")
    run = runs["data"][0]
    status, _ = await world.call("a_node", "POST", f"/runs/{run['id']}/claim")
    assert status == 200
    result = os.urandom(900 * 1024)  # past the row limit: stored in the blob store
    assert len(result) > ROW_BYTES
    blob_id = await world.upload("a_node", result)
    patch = {"status": "completed", "exit_code": 0, "result_blob_id": blob_id}
    status, _ = await world.call("a_node", "PATCH", f"/runs/{run['id']}", json=patch)
    assert status == 200
    h = await world.h("a_res")
    r = await client.get(f"/api/v1/blobs/{blob_id}", headers=h)
    assert r.status == 200 and await r.read() == result
    assert r.headers["X-Sha256"] == hashlib.sha256(result).hexdigest()
    r = await client.get(f"/api/v1/blobs/{blob_id}", headers={**h, "Range": "bytes=500000-"})
    assert r.status == 206 and await r.read() == result[500000:]
    assert r.headers["Content-Range"] == f"bytes 500000-{len(result) - 1}/{len(result)}"
    r = await client.get(f"/api/v1/blobs/{blob_id}", headers={**h, "Range": "bytes=10-19"})
    assert r.status == 206 and await r.read() == result[10:20]
    r = await client.get(f"/api/v1/blobs/{blob_id}", headers={**h, "Range": f"bytes={len(result)}-"})
    assert r.status == 416


@both_backends
async def test_collector_removes_unreferenced_and_orphaned_blobs_only(client: Any, world: World) -> None:
    store = client.app[BLOBS]
    unused = await world.upload("a_res", os.urandom(200 * 1024))
    used = await world.upload("a_res", os.urandom(200 * 1024))
    payload = {
        "collaboration_id": world.collabs["ab"],
        "image": "alpine:3",
        "organizations": [{"id": world.orgs["A"], "input_blob_id": used}],
    }
    status, body = await world.call("a_res", "POST", "/tasks", json=payload)
    assert status == 201, body

    async def body_of(data: bytes) -> AsyncIterator[bytes]:
        yield data

    orphan = (await store.write(body_of(os.urandom(300 * 1024)))).id  # stored, its row never committed
    await asyncio.sleep(2.2)  # S3 keeps times to the second
    fresh = await world.upload("a_res", os.urandom(200 * 1024))
    fresh_orphan = (await store.write(body_of(os.urandom(300 * 1024)))).id

    done = await collect(client.app[SESSIONS], store, keep_s=1.5)

    assert (done.rows, done.files) == (1, 1)
    left = {item.blob_id for item in await store.leftovers(time.time() + 3600)}
    assert left == {used, fresh, fresh_orphan}
    for blob_id, status in ((unused, 404), (used, 200), (fresh, 200)):
        status_got, _ = await world.call("a_res", "GET", f"/blobs/{blob_id}")
        assert status_got == status, blob_id
    assert orphan not in left


def _config(tmp_path: Path, blobs: str) -> Path:
    path = tmp_path / "vserver.yaml"
    path.write_text(f"data_dir: {tmp_path / 'data'}\nblobs:\n{blobs}")
    return path


@pytest.mark.parametrize(
    ("blobs", "expected"),
    [
        ("  backend: s3\n", "blobs: Value error, backend s3 needs the s3 section"),
        ("  s3: {endpoint: 'https://s3.example', bucket: vfed-b}\n", "an s3 section is set but backend is"),
        (
            "  backend: s3\n  s3: {endpoint: 'ftp://x', bucket: vfed-b}\n",
            "blobs.s3.endpoint: Value error, 'ftp",
        ),
        (
            "  backend: s3\n  s3: {endpoint: 'https://x/path', bucket: vfed-b}\n",
            "give only scheme, host and port",
        ),
        ("  backend: s3\n  s3: {endpoint: 'https://x', bucket: Bad_Name}\n", "is not an S3 bucket name"),
        (
            "  backend: s3\n  s3: {endpoint: 'http://10.1.2.3:9000', bucket: vfed-b}\n",
            "plain HTTP to another",
        ),
        ("  backend: s3\n  s3: {endpoint: 'https://x', bucket: vfed-b, part_bytes: 1000}\n", "part_bytes"),
        ("  backend: s3\n  s3: {endpoint: 'https://x', bucket: vfed-b, access_key_id: a}\n", "go together"),
        ("  backend: nfs\n", "blobs.backend: Input should be 'filesystem' or 's3'"),
    ],
)
def test_bad_blob_settings_are_one_clear_line(tmp_path: Path, blobs: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(_config(tmp_path, blobs))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_s3_secret_from_a_file_named_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "s3-secret"
    secret.write_text("from-a-secret-file\n")
    secret.chmod(0o600)
    monkeypatch.setenv("VFED_SERVER__BLOBS__S3__SECRET_ACCESS_KEY_FILE", str(secret))
    monkeypatch.setenv("VFED_SERVER__BLOBS__S3__ACCESS_KEY_ID", "key-id")
    config = _config(
        tmp_path, "  backend: s3\n  s3: {endpoint: 'https://s3.eu-west-1.amazonaws.com', bucket: vfed-b}\n"
    )
    s3 = load_settings(config).blobs.s3
    assert s3 is not None and (s3.access_key_id, s3.secret_access_key) == ("key-id", "from-a-secret-file")
    assert "from-a-secret-file" not in repr(s3)


def test_vserver_start_refuses_an_s3_store_it_cannot_use(tmp_path: Path, moto_server: infra.S3Server) -> None:
    """A missing bucket, and no credentials at all: `vserver start` exits with one line each."""
    for extra, expected in (
        ("access_key_id: k, secret_access_key: s", "S3 bucket vfed-missing does not exist at"),
        ("", "blobs.s3: no credentials"),
    ):
        config = _config(
            tmp_path,
            f"  backend: s3\n  s3: {{endpoint: '{moto_server.endpoint}', bucket: vfed-missing, {extra}}}\n",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        done = vserver_env(env, "start", "--config", str(config), "--port", str(infra.free_port()))
        assert done.returncode == 1 and expected in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def vserver_env(env: dict[str, str], *args: str) -> Any:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "vfed.server.cli", "--log-level", "WARNING", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


IMPORT = """
organizations: [{name: alpha}]
users: [{username: res, password: "long password", organization: alpha, roles: [researcher]}]
"""


async def test_vserver_killed_mid_upload_shows_no_partial_blob_and_loses_nothing(
    tmp_path: Path, s3_settings: S3Settings, moto_server: infra.S3Server
) -> None:
    s3 = {**s3_settings.model_dump(mode="json"), "part_bytes": 5 * MIB}
    spec = tmp_path / "import.yaml"
    spec.write_text(IMPORT)
    client = minio_client(moto_server)
    kept = os.urandom(7 * MIB)
    port = infra.free_port()
    config: dict[str, Any] = {"port": port, "blobs": {"backend": "s3", "s3": s3}}
    with server_process(tmp_path, **config) as srv:
        vserver("import", str(spec), "--config", str(srv.config))
        async with aiohttp.ClientSession(srv.url) as http:
            auth = await _login(http)
            async with http.post("/api/v1/blobs", data=kept, headers=auth) as r:
                assert r.status == 201
                kept_id = (await r.json())["id"]
            release = asyncio.Event()
            upload = asyncio.create_task(http.post("/api/v1/blobs", data=_held(release), headers=auth))
            await until_a_part_arrived(client, s3_settings.bucket)
            srv.proc.send_signal(signal.SIGKILL)  # the worker dies mid-upload
            srv.proc.wait(10)
            with pytest.raises(aiohttp.ClientError):
                await upload
    names = sorted(str(o.object_name) for o in client.list_objects(s3_settings.bucket, recursive=True))
    assert names == [f"blobs/{kept_id}"]  # the cut upload is no object: nothing partial is visible
    assert len(client._list_multipart_uploads(s3_settings.bucket).uploads) == 1

    with server_process(tmp_path, **config) as srv:  # the same database and bucket, restarted
        async with aiohttp.ClientSession(srv.url) as http:
            auth = await _login(http)
            async with http.get(f"/api/v1/blobs/{kept_id}", headers=auth) as r:
                assert r.status == 200 and await r.read() == kept
            async with http.get(
                f"/api/v1/blobs/{kept_id}", headers={**auth, "Range": f"bytes={6 * MIB}-"}
            ) as r:
                assert r.status == 206 and await r.read() == kept[6 * MIB :]
            again = os.urandom(6 * MIB)  # the client sends the cut upload again
            async with http.post("/api/v1/blobs", data=again, headers=auth) as r:
                assert r.status == 201
    store = S3BlobStore(s3_settings, 100 * MIB)  # the collector's view once the cut upload is idle
    await asyncio.sleep(1.1)
    (idle,) = [item for item in await store.leftovers(time.time()) if item.partial]
    await store.remove(idle)
    assert client._list_multipart_uploads(s3_settings.bucket).uploads == []
    await store.close()


async def _login(http: aiohttp.ClientSession) -> dict[str, str]:
    r = await http.post("/api/v1/token/user", json={"username": "res", "password": "long password"})
    assert r.status == 200, await r.text()
    return {"Authorization": f"Bearer {(await r.json())['access_token']}"}


async def _held(release: asyncio.Event) -> AsyncIterator[bytes]:
    for _ in range(6):
        yield os.urandom(MIB)
    await release.wait()
    yield b"never sent"


@pytest.mark.parametrize("blob_backend", ["s3"], indirect=True)
async def test_a_failing_store_answers_503_in_one_line(
    client: Any, world: World, s3_settings: S3Settings, moto_server: infra.S3Server
) -> None:
    blob_id = await world.upload("a_res", os.urandom(200 * 1024))
    s3 = minio_client(moto_server)
    empty_bucket(s3, s3_settings.bucket)  # the bucket is gone under the running server
    try:
        for method, path, kw in (
            ("GET", f"/blobs/{blob_id}", {}),
            ("POST", "/blobs", {"data": os.urandom(200 * 1024)}),
        ):
            status, body = await world.call("a_res", method, path, **kw)
            assert status == 503 and body["error"] == "blob-store-unavailable", body
            assert f"S3 bucket {s3_settings.bucket} does not exist" in body["detail"]
    finally:
        s3.make_bucket(s3_settings.bucket)  # for the fixture's own clean-up


@pytest.mark.postgres
async def test_two_servers_share_the_bucket_and_the_database(
    tmp_path: Path, s3_settings: S3Settings, postgres_url: str
) -> None:
    """What the S3 store is for: a blob uploaded to one server machine is served by another."""
    config: dict[str, Any] = {
        "database_url": postgres_url,
        "blobs": {"backend": "s3", "s3": s3_settings.model_dump(mode="json")},
    }
    spec = tmp_path / "import.yaml"
    spec.write_text(IMPORT)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    data = os.urandom(11 * MIB)
    with server_process(tmp_path / "a", **config) as one:
        vserver("import", str(spec), "--config", str(one.config))  # the schema exists once one has started
        with server_process(tmp_path / "b", **config) as two:
            async with aiohttp.ClientSession(one.url) as http_one, aiohttp.ClientSession(two.url) as http_two:
                auth = await _login(http_one)
                async with http_one.post("/api/v1/blobs", data=data, headers=auth) as r:
                    assert r.status == 201
                    blob_id = (await r.json())["id"]
                async with http_two.get(f"/api/v1/blobs/{blob_id}", headers=auth) as r:
                    assert r.status == 200 and await r.read() == data
                async with http_two.get(
                    f"/api/v1/blobs/{blob_id}", headers={**auth, "Range": "bytes=-100"}
                ) as r:
                    assert r.status == 206 and await r.read() == data[-100:]


def test_backup_with_s3_holds_the_database_and_leaves_blobs_to_the_bucket(
    tmp_path: Path, s3_settings: S3Settings
) -> None:
    spec = tmp_path / "import.yaml"
    spec.write_text(IMPORT)
    config = tmp_path / "vserver.yaml"
    s3 = s3_settings.model_dump(mode="json")
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "jwt_secret": "backup-secret-long-enough-for-hs256",
                "blobs": {"backend": "s3", "s3": s3},
            }
        )
    )
    vserver("import", str(spec), "--config", str(config))
    archive = tmp_path / "vfed.tar.gz"
    done = vserver("backup", str(archive), "--config", str(config))
    assert done.stdout.strip() == f"{archive}: database and 0 blob files"
    with tarfile.open(archive) as tar:
        assert not [m.name for m in tar.getmembers() if m.name.startswith("blobs")]
    done = vserver("backup", "--blobs-only", str(tmp_path / "b.tar.gz"), "--config", str(config), check=False)
    assert done.returncode == 1 and f"the blobs are in S3 bucket {s3_settings.bucket}" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    with_files = tmp_path / "files.tar.gz"
    with tarfile.open(with_files, "w:gz") as tar:
        for name, body in (
            ("vfed-backup.json", b'{"format": 1, "database": false, "blobs": 1}'),
            ("blobs/ab/x", b"x"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    empty = tmp_path / "empty.yaml"
    empty.write_text(config.read_text().replace(str(tmp_path / "data"), str(tmp_path / "fresh")))
    done = vserver("restore", str(with_files), "--config", str(empty), check=False)
    assert done.returncode == 1 and "holds blob files but the blobs are in S3 bucket" in done.stderr
    assert not (tmp_path / "fresh" / "blobs").exists()


@pytest.mark.parametrize("blob_backend", ["s3"], indirect=True)
async def test_a_download_cut_by_the_store_resumes_with_range(
    client: Any, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store failing midway cannot be caused on a live S3 server at a chosen byte, so `open` is wrapped
    (a fault injector, not a fake store): after 100 KiB the real stream raises as a broken S3 read would."""
    from contextlib import asynccontextmanager

    from vfed.server.blobs import BlobStoreError

    data = os.urandom(900 * 1024)
    blob_id = await world.upload("a_res", data)
    store = client.app[BLOBS]
    real_open = store.open

    @asynccontextmanager
    async def breaks_after_100k(blob: str, start: int = 0, stop: int | None = None) -> AsyncIterator[Any]:
        async with real_open(blob, start, stop) as chunks:

            async def cut() -> AsyncIterator[bytes]:
                async for chunk in chunks:
                    yield chunk[: 100 * 1024]
                    raise BlobStoreError("S3 download at http://127.0.0.1 failed: connection reset")

            yield cut()

    monkeypatch.setattr(store, "open", breaks_after_100k)
    h = await world.h("a_res")
    got = bytearray()
    r = await client.get(f"/api/v1/blobs/{blob_id}", headers=h)
    assert r.status == 200 and int(r.headers["Content-Length"]) == len(data)
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in r.content.iter_any():
            got.extend(chunk)
    assert got == data[: len(got)] and 0 < len(got) < len(data)
    monkeypatch.setattr(store, "open", real_open)
    r = await client.get(f"/api/v1/blobs/{blob_id}", headers={**h, "Range": f"bytes={len(got)}-"})
    assert r.status == 206
    got.extend(await r.read())
    assert got == data


async def test_s3_upload_and_download_hold_parts_not_the_blob(
    tmp_path: Path, s3_settings: S3Settings
) -> None:
    """64 MiB up and down through a real `vserver start` with 5 MiB parts: the server's resident set grows by
    a few parts (one filling, one sent, the joined copy), far less than the blob."""
    spec = tmp_path / "import.yaml"
    spec.write_text(IMPORT)
    s3 = {**s3_settings.model_dump(mode="json"), "part_bytes": 5 * MIB}
    with server_process(tmp_path, blobs={"backend": "s3", "s3": s3}) as srv:
        vserver("import", str(spec), "--config", str(srv.config))
        async with aiohttp.ClientSession(srv.url) as http:
            auth = await _login(http)
            process = psutil.Process(srv.proc.pid)
            baseline, peak, stop = process.memory_info().rss, 0, asyncio.Event()

            async def sample() -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, process.memory_info().rss)
                    await asyncio.sleep(0.02)

            async def body() -> AsyncIterator[bytes]:
                for i in range(64):
                    yield i.to_bytes(8, "big") * (MIB // 8)

            sampler = asyncio.create_task(sample())
            async with http.post("/api/v1/blobs", data=body(), headers=auth) as r:
                assert r.status == 201
                blob = await r.json()
            got, size = hashlib.sha256(), 0
            async with http.get(f"/api/v1/blobs/{blob['id']}", headers=auth) as r:
                async for chunk in r.content.iter_chunked(MIB):
                    got.update(chunk)
                    size += len(chunk)
            stop.set()
            await sampler
    assert size == 64 * MIB and got.hexdigest() == blob["sha256"]
    growth = (peak - baseline) / MIB
    print(f"server RSS grew by {growth:.0f} MiB moving 64 MiB through S3")
    assert growth < 40, f"server RSS grew by {growth:.0f} MiB moving 64 MiB"


def test_s3_without_its_client_package_is_one_line(
    monkeypatch: pytest.MonkeyPatch, s3_settings: S3Settings
) -> None:
    """A server installed without the `s3` extra: the store says what to install instead of a traceback."""
    import sys

    from vfed.server.app import blob_store
    from vfed.server.blobs import BlobStoreError
    from vfed.server.config import BlobsSettings, Settings

    monkeypatch.setitem(sys.modules, "minio", None)  # what `import minio` meets when it is not installed
    monkeypatch.delitem(sys.modules, "vfed.server.blobs_s3")
    settings = Settings(blobs=BlobsSettings(backend="s3", s3=s3_settings))
    with pytest.raises(BlobStoreError, match=r"needs the minio package: pip install 'vfed\[s3\]'"):
        blob_store(settings)
