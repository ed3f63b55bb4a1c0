"""`results(..., to=DIR)` against the real server app, this test doing the nodes' side through the API as
tests/client/test_client_results.py does (real crypto, descriptors, sealed results): a result of many MiB
streams to its file with the process's peak allocation far below its size; a transfer broken off resumes
with Range, in the same call and in the next; a damaged partial is fetched again; a tampered or moved result
is refused with no file left; values are read from the files only when asked for; `vfed task results
--output DIR` streams the same way."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from tests.client.bigresult_kit import results_to_files
from tests.client.breaking_proxy import BreakingProxy
from tests.client.test_client_paths import _chains, _publish
from tests.client.test_client_results import _claimed_run, _vfed
from tests.client.trustkit import open_input
from tests.server.s3_testkit import blob_backend, blobs_settings
from tests.server.vserver_testkit import World, client, db_url, kit_settings, world

from vfed.client import cli_results
from vfed.client.client import AsyncClient, Client
from vfed.client.errors import ResultMismatch
from vfed.client.result_files import sealed_name
from vfed.common.crypto import Keyring, encrypt_bytes
from vfed.common.payload import AlgorithmError, encode_error, encode_result
from vfed.common.trust import result_context, rotation_record
from vfed.server.config import BlobsSettings, Settings

__all__ = ["blob_backend", "blobs_settings", "client", "db_url", "world"]

BIG_BYTES = 64 << 20  # the peak below is ~10 MiB whatever the size (download and decryption overlap)


@pytest.fixture
def settings(tmp_path: Path, db_url: str, blobs_settings: BlobsSettings) -> Settings:
    """The shared test settings with room for results of many MiB."""
    return kit_settings(tmp_path, db_url, blobs_settings, max_blob_bytes=BIG_BYTES * 2)


def _big_table() -> pd.DataFrame:
    """About BIG_BYTES of incompressible rows (Parquet stores random bytes as they are)."""
    rows = BIG_BYTES // 4096
    return pd.DataFrame({"n": range(rows), "noise": [os.urandom(4096) for _ in range(rows)]})


async def _node_result(
    world: World,
    node: str,
    ring: Keyring,
    task: dict[str, Any],
    output: bytes,
    *,
    tamper: bool = False,
    signer: Keyring | None = None,
) -> tuple[int, str]:
    """The node's side: claim, verify and open the input, seal `output` (encoded result bytes) to the
    initiator bound to the run, upload, report completed. `tamper`: one byte of the sealed result flipped
    before the upload (what a server or disk that changes bytes serves); `signer`: sealed with that
    keyring's key instead of the node's. Returns (run id, blob id)."""
    org_id = world.orgs[node[0].upper()]
    run_id = await _claimed_run(world, node, int(task["id"]))
    _, run = await world.call(node, "GET", f"/runs/{run_id}")
    _, sealed_input = await world.call(node, "GET", f"/blobs/{run['input_blob_id']}")
    _, stored = await world.call(node, "GET", f"/tasks/{task['id']}")
    opened = await open_input(stored["descriptor"], sealed_input, ring, org_id, _chains(world, node))
    context = result_context(opened.verified.digest, org_id, run_id)
    sender = (signer or ring).current
    sealed = bytearray(encrypt_bytes(output, sender, list(opened.verified.reply_keys), context=context))
    if tamper:
        sealed[len(sealed) // 2] ^= 1
    blob = await world.upload(node, bytes(sealed))
    status, _ = await world.call(
        node, "PATCH", f"/runs/{run_id}", json={"status": "completed", "result_blob_id": blob}
    )
    assert status == 200
    return run_id, blob


@contextlib.asynccontextmanager
async def _through_proxy(world: World, ring: Keyring) -> AsyncIterator[tuple[AsyncClient, BreakingProxy]]:
    """Researcher a_res with `ring`, talking to the server through a BreakingProxy."""
    server = world.client.server
    assert server.port is not None
    token = await world.token("a_res")
    async with (
        BreakingProxy(str(server.host), server.port) as proxy,
        AsyncClient(proxy.url, token=token) as researcher,
    ):
        researcher.use_keyring(ring)
        yield researcher, proxy


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def test_a_large_result_streams_to_a_file_in_bounded_memory(world: World, tmp_path: Path) -> None:
    ring_a, ring_b = await _publish(world, "a_node", "A"), await _publish(world, "b_node", "B")
    org_a, org_b = world.orgs["A"], world.orgs["B"]
    async with _through_proxy(world, ring_a) as (researcher, _proxy):
        task = await researcher.create_task(world.collabs["ab"], "alpine:3", "m")
        run_a, _ = await _node_result(world, "a_node", ring_a, task, encode_result([{"n": -1}]))
        table = _big_table()
        encoded = encode_result(table)
        assert len(encoded) > BIG_BYTES
        run_b, _ = await _node_result(world, "b_node", ring_b, task, encoded)
        del encoded

        folder = tmp_path / "results"
        tracemalloc.start()
        try:
            found = await researcher.results(task, to=folder)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # the sealed result went through a partial file and a decrypting stream: never whole in memory
        assert peak < BIG_BYTES // 4, f"peak allocation {peak >> 20} MiB for a {BIG_BYTES >> 20} MiB result"

        a_file = folder / f"organization-{org_a}-run-{run_a}.json"
        b_file = folder / f"organization-{org_b}-run-{run_b}.parquet"
        assert _left(folder) == sorted([a_file.name, b_file.name])  # no partial, no temporary file
        assert found.files == {org_a: a_file, org_b: b_file}
        assert all(stat.S_IMODE(f.stat().st_mode) & 0o077 == 0 for f in (a_file, b_file))  # private
        assert b_file.stat().st_size > BIG_BYTES
        big = found.organizations[1]
        assert (big.file, big.organization_id, big.run_id, big.ok) == (b_file, org_b, run_b, True)
        assert not big.loaded and "<not loaded>" in repr(big) and str(b_file) in repr(found)
        assert not big.loaded  # the reprs named the file without reading it

        assert not found.organizations[0].loaded  # JSON too: read when asked for
        assert found[0] == [{"n": -1}] and found.organizations[0].loaded and not big.loaded
        pd.testing.assert_frame_equal(big.value, table)  # read from the file on first access
        assert big.loaded and big.value is big.value  # and kept
        joined = found.to_dataframe()
        assert joined["organization"].tolist() == [org_a] + [org_b] * len(table)

        # the same task without a folder: the values in memory, as before
        again = await researcher.results(task)
        assert again.files == {} and again[0] == [{"n": -1}]
        pd.testing.assert_frame_equal(again[1], table)


async def test_a_broken_transfer_resumes_with_range_in_the_same_call(world: World, tmp_path: Path) -> None:
    ring_a, ring_b = await _publish(world, "a_node", "A"), await _publish(world, "b_node", "B")
    only_b = [world.orgs["B"]]
    async with _through_proxy(world, ring_a) as (researcher, proxy):
        task = await researcher.create_task(world.collabs["ab"], "alpine:3", "m", organizations=only_b)
        value = {"noise": os.urandom(3 << 20).hex()}  # a 6 MiB JSON value
        run_b, _ = await _node_result(world, "b_node", ring_b, task, encode_result(value))
        proxy.break_next("cut", after_bytes=1 << 20, times=2)
        out = tmp_path / "out"
        found = await researcher.results(task, to=out)
        ranges = proxy.ranges()
        assert len(ranges) == 3 and ranges[0] is None, ranges
        starts = [int(r.removeprefix("bytes=").removesuffix("-")) for r in ranges[1:] if r is not None]
        assert len(starts) == 2 and 0 < starts[0] < starts[1], ranges  # each attempt went on from its end
        assert found.by_organization == {world.orgs["B"]: value}
        assert _left(out) == [f"organization-{world.orgs['B']}-run-{run_b}.json"]


async def test_a_download_stopped_midway_resumes_in_the_next_call(world: World, tmp_path: Path) -> None:
    """The first call is cancelled while the transfer is held up (Ctrl-C, a closed notebook): the sealed
    partial stays; the next call asks only for the rest. A partial holding every byte needs no transfer; one
    longer than the blob is dropped; a damaged partial fails to decrypt and is fetched whole once more."""
    ring_a, ring_b = await _publish(world, "a_node", "A"), await _publish(world, "b_node", "B")
    org_b, out = world.orgs["B"], tmp_path / "out"
    async with _through_proxy(world, ring_a) as (researcher, proxy):
        task = await researcher.create_task(world.collabs["ab"], "alpine:3", "m", organizations=[org_b])
        value = {"noise": os.urandom(2 << 20).hex()}
        run_b, blob = await _node_result(world, "b_node", ring_b, task, encode_result(value))
        part = out / sealed_name(org_b, run_b)

        proxy.break_next("stall", after_bytes=1 << 20)
        first = asyncio.create_task(researcher.results(task, to=out))
        await asyncio.wait_for(proxy.stalled.wait(), 30)
        for _ in range(300):  # until the bytes that went through are on disk
            if part.exists() and part.stat().st_size == proxy.body_forwarded:
                break
            await asyncio.sleep(0.05)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        kept = part.stat().st_size
        assert kept == proxy.body_forwarded > 0 and _left(out) == [part.name]

        found = await researcher.results(task, to=out)
        assert proxy.ranges()[-1] == f"bytes={kept}-"
        assert found.by_organization == {org_b: value} and _left(out) == [found.files[org_b].name]

        _, sealed = await world.call("a_res", "GET", f"/blobs/{blob}")
        part.write_bytes(sealed)  # a call that got every byte and stopped before decrypting
        found = await researcher.results(task, to=out)
        assert proxy.ranges()[-1] == f"bytes={len(sealed)}-"  # answered 416: nothing left to send
        assert found[0] == value and _left(out) == [found.files[org_b].name]

        part.write_bytes(sealed + b"more")  # longer than the blob: not its start, so all of it again
        seen = len(proxy.blob_requests)
        found = await researcher.results(task, to=out)
        assert proxy.ranges()[seen:] == [f"bytes={len(sealed) + 4}-", None]
        assert found[0] == value and _left(out) == [found.files[org_b].name]

        damaged = bytearray(sealed[: len(sealed) // 2])
        damaged[len(damaged) // 2] ^= 1
        part.write_bytes(damaged)
        seen = len(proxy.blob_requests)
        found = await researcher.results(task, to=out)
        assert proxy.ranges()[seen:] == [f"bytes={len(damaged)}-", None]  # the rest, then all again
        assert found[0] == value and _left(out) == [found.files[org_b].name]


async def test_a_tampered_moved_or_failing_result_leaves_no_file(world: World, tmp_path: Path) -> None:
    ring_a, ring_b = await _publish(world, "a_node", "A"), await _publish(world, "b_node", "B")
    org_b = world.orgs["B"]
    async with _through_proxy(world, ring_a) as (researcher, _proxy):
        collab = world.collabs["ab"]
        tampered = await researcher.create_task(collab, "alpine:3", "m")
        run_a, _ = await _node_result(world, "a_node", ring_a, tampered, encode_result("fine"))
        run_id, _ = await _node_result(
            world, "b_node", ring_b, tampered, encode_result({"x": "y" * (3 << 20)}), tamper=True
        )
        with pytest.raises(ResultMismatch, match=f"run {run_id} .*does not decrypt .*tampered") as refused:
            await researcher.results(tampered, to=tmp_path / "t")
        assert (refused.value.run_id, refused.value.organization_id) == (run_id, org_b)
        # B's: no final file, no partial, no temporary file; A's result was still written whole
        assert _left(tmp_path / "t") == [f"organization-{world.orgs['A']}-run-{run_a}.json"]

        # a result the server moved from one run to another: bound to the first run, refused at the second
        first = await researcher.create_task(collab, "alpine:3", "m", organizations=[org_b])
        second = await researcher.create_task(collab, "alpine:3", "m", organizations=[org_b])
        _, moved_blob = await _node_result(world, "b_node", ring_b, first, encode_result(1))
        run_second = await _claimed_run(world, "b_node", second["id"])
        patch = {"status": "completed", "result_blob_id": moved_blob}
        assert (await world.call("b_node", "PATCH", f"/runs/{run_second}", json=patch))[0] == 200
        with pytest.raises(ResultMismatch, match=f"run {run_second} .*belongs to another run"):
            await researcher.results(second, to=tmp_path / "m")
        assert _left(tmp_path / "m") == []

        # an algorithm's error document raises as it does in memory, and leaves no file either
        failing = await researcher.create_task(collab, "alpine:3", "m", organizations=[org_b])
        await _node_result(world, "b_node", ring_b, failing, encode_error("ValueError", "bad column"))
        with pytest.raises(AlgorithmError, match="ValueError: bad column"):
            await researcher.results(failing, to=tmp_path / "e")
        assert _left(tmp_path / "e") == []


async def test_a_key_newer_than_the_kept_chain_is_read_again_and_a_stranger_key_refused(
    world: World, tmp_path: Path
) -> None:
    """B rotates its key after the researcher read B's chain: the result signed by the new key streams once
    the chain is read again. A result signed by a key outside B's chain is refused, with no file left."""
    ring_a, ring_b = await _publish(world, "a_node", "A"), await _publish(world, "b_node", "B")
    org_b = world.orgs["B"]
    async with _through_proxy(world, ring_a) as (researcher, _proxy):
        rotated = await researcher.create_task(world.collabs["ab"], "alpine:3", "m", organizations=[org_b])
        before = Keyring(ring_b.keys)  # the node opens the input sealed to its old head
        ring_b.rotate()
        record = rotation_record(org_b, ring_b.keys[-2], ring_b.current)
        path = f"/organizations/{org_b}/key-records"
        assert (await world.call("b_node", "POST", path, json={"records": [record.model_dump()]}))[0] == 201
        run_b, _ = await _node_result(
            world, "b_node", before, rotated, encode_result("new key"), signer=ring_b
        )
        found = await researcher.results(rotated, to=tmp_path / "r")
        assert found == ["new key"] and _left(tmp_path / "r") == [f"organization-{org_b}-run-{run_b}.json"]

        stranger = await researcher.create_task(world.collabs["ab"], "alpine:3", "m", organizations=[org_b])
        run_s, _ = await _node_result(
            world, "b_node", ring_b, stranger, encode_result("forged"), signer=Keyring.generate()
        )
        with pytest.raises(
            ResultMismatch, match=f"run {run_s} .*is not signed by a key of that organization"
        ):
            await researcher.results(stranger, to=tmp_path / "s")
        assert _left(tmp_path / "s") == []


async def test_the_blocking_client_and_a_child_process_stream_to_files(world: World, tmp_path: Path) -> None:
    """`Client.results(to=)` (its loop on its own thread; called from a thread here, the server runs on
    this test's loop), and tests/client/bigresult_kit.results_to_files, the helper end-to-end tests call,
    which streams in a child process and reports that process's peak RSS."""
    ring_a, ring_b = await _publish(world, "a_node", "A"), await _publish(world, "b_node", "B")
    org_b = world.orgs["B"]
    url = str(world.client.make_url("")).rstrip("/")
    token = await world.token("a_res")
    async with AsyncClient(url, token=token) as researcher:
        researcher.use_keyring(ring_a)
        task = await researcher.create_task(world.collabs["ab"], "alpine:3", "m", organizations=[org_b])
    run_b, _ = await _node_result(world, "b_node", ring_b, task, encode_result(pd.DataFrame({"x": [1.5]})))

    def blocking() -> Any:
        with Client(url, token=token) as researcher:
            researcher.use_keyring(ring_a)
            return researcher.results(task, to=tmp_path / "sync")

    found = await asyncio.to_thread(blocking)
    assert found.files == {org_b: tmp_path / "sync" / f"organization-{org_b}-run-{run_b}.parquet"}
    assert found[0]["x"].tolist() == [1.5]

    key_file = tmp_path / "a-key.json"
    ring_a.save(key_file)
    child = await asyncio.to_thread(
        results_to_files, url, token, key_file, int(task["id"]), tmp_path / "child", timeout_s=120
    )
    assert child.files == [tmp_path / "child" / f"organization-{org_b}-run-{run_b}.parquet"]
    assert pd.read_parquet(child.files[0])["x"].tolist() == [1.5]
    assert 0 < child.peak_rss_mib < 1024


async def test_cli_output_streams_and_converts(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vfed task results --output DIR` in a child process (native, json, csv; --format native alone is a
    usage error), and in this process with the size above which JSON is copied rather than parsed turned
    down to a few bytes, so the bounded paths run on a small result."""
    ring_a, ring_b = await _publish(world, "a_node", "A"), await _publish(world, "b_node", "B")
    org_a, org_b = world.orgs["A"], world.orgs["B"]
    key_file = tmp_path / "a-key.json"
    ring_a.save(key_file)
    rows = pd.DataFrame({"x": [1, 2, 3], "y": ["p", "q", "r"]})
    value = {"mean": 2.5, "names": ["a", "b"]}
    async with _through_proxy(world, ring_a) as (researcher, _proxy):
        task = await researcher.create_task(world.collabs["ab"], "alpine:3", "m")
    await _node_result(world, "a_node", ring_a, task, encode_result(value))
    await _node_result(world, "b_node", ring_b, task, encode_result(rows))
    tid = str(task["id"])

    out = tmp_path / "native"
    res = await _vfed(world, key_file, "task", "results", tid, "--output", str(out), "--format", "native")
    assert res.returncode == 0, res.stderr
    assert _left(out) == [f"organization-{org_a}.json", f"organization-{org_b}.parquet"]
    assert json.loads((out / f"organization-{org_a}.json").read_text()) == value
    pd.testing.assert_frame_equal(pd.read_parquet(out / f"organization-{org_b}.parquet"), rows)
    assert f"wrote {out / f'organization-{org_b}.parquet'} (org-B ({org_b}))" in res.stdout.splitlines()

    res = await _vfed(world, key_file, "task", "results", tid, "--output", str(tmp_path / "j"))
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "j" / f"organization-{org_b}.json").read_text()) == [
        {"x": 1, "y": "p"},
        {"x": 2, "y": "q"},
        {"x": 3, "y": "r"},
    ]
    res = await _vfed(
        world, key_file, "task", "results", tid, "--output", str(tmp_path / "c"), "--format", "csv"
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "c" / f"organization-{org_b}.csv").read_text() == "x,y\n1,p\n2,q\n3,r\n"
    assert (tmp_path / "c" / f"organization-{org_a}.csv").read_text() == 'mean,names\n2.5,"[""a"", ""b""]"\n'
    res = await _vfed(world, key_file, "task", "results", tid, "--format", "native")
    assert res.returncode == 2 and "--format native writes files: give --output DIR" in res.stderr

    # in this process: JSON above the (lowered) limit is copied as bytes, and cannot become CSV
    monkeypatch.setattr(cli_results, "CONVERT_MAX_BYTES", 8)
    monkeypatch.setattr(cli_results, "PARQUET_BATCH_ROWS", 2)  # the table in batches of two rows
    monkeypatch.setenv("VFED_SERVER_URL", str(world.client.make_url("")).rstrip("/"))
    monkeypatch.setenv("VFED_TOKEN", await world.token("a_res"))
    monkeypatch.setenv("VFED_KEY_FILE", str(key_file))
    big = tmp_path / "big"
    await asyncio.to_thread(cli_results.write_results, int(tid), "json", big)
    assert json.loads((big / f"organization-{org_a}.json").read_text()) == value
    assert json.loads((big / f"organization-{org_b}.json").read_text())[2] == {"x": 3, "y": "r"}
    assert _left(big) == [f"organization-{org_a}.json", f"organization-{org_b}.json"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        await asyncio.to_thread(cli_results.write_results, int(tid), "csv", big / "csv")
    assert exited.value.code == 1
    err = capsys.readouterr().err.splitlines()
    kept = sorted((big / "csv").glob(f"organization-{org_a}-run-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["value"] == value
    assert err[0].startswith(f"org-A ({org_a}): its result (0.0 MiB of JSON) is kept as {kept[0]}: CSV")
    assert err[-1] == f"vfed: error: 1 result(s) of task {tid} were not converted to CSV"
    assert (big / "csv" / f"organization-{org_b}.csv").read_text() == "x,y\n1,p\n2,q\n3,r\n"
