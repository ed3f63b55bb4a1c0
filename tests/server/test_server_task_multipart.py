"""One-request task creation (multipart: `task` JSON + streamed `input`) and blobs kept in their row."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import aiohttp
import pytest
from s3_testkit import both_backends
from sqlalchemy import func, select
from vserver_testkit import World, client, db_url, settings, world

from vfed.common import multipart
from vfed.common.crypto import Keyring
from vfed.server.api.task_create import SMALL_FORM_BYTES
from vfed.server.models import Blob, Task
from vfed.server.state import BLOBS, SESSIONS

__all__ = ["client", "db_url", "settings", "world"]


def form(fields: Any, data: bytes | None, *, task_type: str = "application/json") -> aiohttp.FormData:
    """The multipart body a researcher's client sends."""
    f = aiohttp.FormData()
    if fields is not None:
        f.add_field("task", fields if isinstance(fields, str) else json.dumps(fields), content_type=task_type)
    if data is not None:
        f.add_field("input", data, content_type="application/octet-stream", filename="input")
    return f


def fields(w: World, orgs: list[str], collab: str = "ab", **extra: Any) -> dict[str, Any]:
    return {
        "collaboration_id": w.collabs[collab],
        "image": "alpine:3",
        "organizations": [{"id": w.orgs[o]} for o in orgs],
        **extra,
    }


async def counts(client: Any) -> tuple[int, int]:
    """(blob rows, task rows): what a refused request must leave unchanged."""
    async with client.app[SESSIONS]() as s:
        blobs = (await s.execute(select(func.count()).select_from(Blob))).scalar_one()
        tasks = (await s.execute(select(func.count()).select_from(Task))).scalar_one()
    return int(blobs), int(tasks)


async def blob_files(client: Any) -> list[str]:
    """Blobs in the blob store, whichever it is (small blobs have none: they live in their row)."""
    return [item.blob_id for item in await client.app[BLOBS].leftovers(time.time() + 3600)]


@both_backends
async def test_one_request_creates_blob_task_and_runs(client: Any, world: World) -> None:
    envelope = bytes(range(256)) * 4
    status, task = await world.call("a_res", "POST", "/tasks", data=form(fields(world, ["A", "B"]), envelope))
    assert status == 201, task
    assert task["organization_ids"] == [world.orgs["A"], world.orgs["B"]]
    _, runs = await world.call("a_res", "GET", f"/runs?task_id={task['id']}")
    blob_ids = {r["input_blob_id"] for r in runs["data"]}
    assert len(runs["data"]) == 2 and len(blob_ids) == 1 and None not in blob_ids
    blob_id = blob_ids.pop()
    for reader in (
        "a_node",
        "b_node",
        "a_res",
    ):  # each target node reads the sealed input, as does its author
        r = await client.get(f"/api/v1/blobs/{blob_id}", headers=await world.h(reader))
        assert r.status == 200 and await r.read() == envelope
        assert r.headers["X-Sha256"] == hashlib.sha256(envelope).hexdigest()
    status, _ = await world.call("c_node", "GET", f"/blobs/{blob_id}")
    assert status == 404


async def test_parts_in_either_order(world: World) -> None:
    f = aiohttp.FormData()
    f.add_field("input", b"sealed", content_type="application/octet-stream", filename="input")
    f.add_field("task", json.dumps(fields(world, ["A"])), content_type="application/json")
    status, body = await world.call("a_res", "POST", "/tasks", data=f)
    assert status == 201, body


@both_backends
async def test_refusals_store_nothing(client: Any, world: World) -> None:
    before = await counts(client)
    cases: list[tuple[str, Any, int, str]] = [
        ("a_view", form(fields(world, ["A"]), b"x"), 403, "forbidden"),
        ("a_res", form(fields(world, ["A"]), None), 400, "malformed-multipart"),
        ("a_res", form(None, b"x"), 400, "malformed-multipart"),
        ("a_res", form("{not json", b"x"), 400, "malformed-json"),
        ("a_res", form({"image": "x"}, b"x"), 422, "validation-error"),
        ("a_res", form(fields(world, ["C"]), b"x"), 422, "validation-error"),
        ("a_res", form(fields(world, ["C"], collab="cx"), b"x"), 404, "not-found"),
        ("c_res", form(fields(world, ["A"]), b"x"), 404, "not-found"),
        ("a_res", form(fields(world, ["A"]), b"x" * (1024 * 1024 + 1)), 413, "too-large"),
    ]
    with_blob = fields(world, ["A"])
    with_blob["organizations"][0]["input_blob_id"] = "ab" * 16
    cases.append(("a_res", form(with_blob, b"x"), 422, "validation-error"))
    for who, body, status, error in cases:
        got, answer = await world.call(who, "POST", "/tasks", data=body)
        assert (got, answer["error"]) == (status, error), (who, answer)
        assert answer["detail"]
    assert await counts(client) == before
    assert await blob_files(client) == []


async def test_malformed_multipart_is_a_clear_400(client: Any, world: World) -> None:
    headers = {**await world.h("a_res"), "Content-Type": "multipart/form-data; boundary=xyz"}
    for raw in (b"garbage without any boundary", b"--xyz\r\nContent-Disposition: form-data\r\n\r\nno end"):
        r = await client.post("/api/v1/tasks", data=raw, headers=headers)
        body = await r.json()
        assert r.status == 400 and body["error"] == "malformed-multipart", body
    headers["Content-Type"] = "multipart/form-data"  # no boundary at all
    r = await client.post("/api/v1/tasks", data=b"x", headers=headers)
    assert r.status == 400 and (await r.json())["error"] == "malformed-multipart"


async def test_two_step_form_still_works(world: World) -> None:
    task = await world.task("a_res", "ab", ["A", "B"])
    assert task["organization_ids"] == [world.orgs["A"], world.orgs["B"]]


async def test_small_blob_in_row_serves_ranges(client: Any, world: World) -> None:
    data = bytes(range(256)) * 8
    blob = await world.upload("a_res", data)
    assert await blob_files(client) == []
    h = await world.h("a_res")
    r = await client.get(f"/api/v1/blobs/{blob}", headers=h)
    assert r.status == 200 and await r.read() == data
    r = await client.get(f"/api/v1/blobs/{blob}", headers={**h, "Range": "bytes=1000-"})
    assert r.status == 206 and await r.read() == data[1000:]
    assert r.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    r = await client.get(f"/api/v1/blobs/{blob}", headers={**h, "Range": "bytes=10-19"})
    assert r.status == 206 and await r.read() == data[10:20]
    r = await client.get(f"/api/v1/blobs/{blob}", headers={**h, "Range": f"bytes={len(data)}-"})
    assert r.status == 416 and (await r.json())["error"] == "range-not-satisfiable"


@both_backends
async def test_large_input_streams_to_a_file(client: Any, world: World) -> None:
    """Past the in-memory split (SMALL_FORM_BYTES) the parts stream through aiohttp's reader."""
    envelope = bytes(range(256)) * (SMALL_FORM_BYTES // 256 + 100)
    status, task = await world.call("a_res", "POST", "/tasks", data=form(fields(world, ["A"]), envelope))
    assert status == 201, task
    _, runs = await world.call("a_node", "GET", f"/runs?task_id={task['id']}")
    blob_id = runs["data"][0]["input_blob_id"]
    assert await blob_files(client) == [blob_id]
    r = await client.get(f"/api/v1/blobs/{blob_id}", headers=await world.h("a_node"))
    assert await r.read() == envelope


def test_form_splitter_takes_what_clients_send_and_refuses_the_rest() -> None:
    ctype = 'multipart/form-data; charset=utf-8; boundary="b-1"'
    body = (
        b'--b-1\r\ncontent-disposition: form-data; filename="f"; name="ta\\"sk"\r\n\r\n{}\r\n'
        b"--b-1\r\nContent-Disposition: form-data; name=input\r\nContent-Type: x\r\n\r\n\r\n--b-\r\n"
        b"--b-1--\r\nepilogue"
    )
    parts = multipart.split(ctype, body, "form-data")
    assert [(p.name, p.data) for p in parts] == [('ta"sk', b"{}"), ("input", b"\r\n--b-")]
    for bad_type, bad_body in (
        ("multipart/form-data", b"--b-1--"),
        (ctype, b"no boundary at all"),
        (ctype, b"--b-1\r\nContent-Disposition: form-data; name=a\r\n\r\nnever closed"),
        (ctype, b"--b-1\r\nno colon here\r\n\r\nx\r\n--b-1--"),
        (ctype, b"--b-1\r\nContent-Disposition: form-data; name=a"),
    ):
        with pytest.raises(ValueError):
            multipart.split(bad_type, bad_body, "form-data")


@both_backends
async def test_a_stale_key_id_is_refused_and_nothing_is_stored(client: Any, world: World) -> None:
    """An input sealed to a key the organization no longer has: 409 stale-key, in both forms, before any
    row or file is kept; the current key id (or none at all, as older clients send) is accepted."""
    ring = Keyring.generate()
    path = f"/organizations/{world.orgs['A']}/public_key"
    status, _ = await world.call("a_node", "PUT", path, json={"public_key": ring.current.public.to_text()})
    assert status == 200
    current = ring.current.public.key_id
    stale = {"id": world.orgs["A"], "key_id": "0" * 32}
    before, files = await counts(client), await blob_files(client)
    big = b"x" * (SMALL_FORM_BYTES + 1000)  # streamed to a file while the task part waits
    status, body = await world.call(
        "a_res", "POST", "/tasks", data=form(fields(world, ["A"], organizations=[stale]), big)
    )
    assert status == 409 and body["error"] == "stale-key", body
    assert f"{world.orgs['A']} (sealed to {'0' * 32}, current {current})" in body["detail"]
    assert await counts(client) == before and await blob_files(client) == files

    blob_id = await world.upload("a_res", b"sealed elsewhere")
    uploaded = await counts(client)
    status, body = await world.call(
        "a_res",
        "POST",
        "/tasks",
        json=fields(world, ["A"], organizations=[{**stale, "input_blob_id": blob_id}]),
    )
    assert status == 409 and body["error"] == "stale-key"
    assert await counts(client) == uploaded

    fresh = [{"id": world.orgs["A"], "key_id": current}]
    status, task = await world.call(
        "a_res", "POST", "/tasks", data=form(fields(world, ["A"], organizations=fresh), big)
    )
    assert status == 201, task
    assert await counts(client) == (uploaded[0] + 1, uploaded[1] + 1)
