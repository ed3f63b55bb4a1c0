"""`vnode datasets|leases|ledger`: the org admin's commands on a real server (in this process, SQLite, no
broker, no Docker), through the real CLI: register, grant with sealed metadata a grantee's key opens, list,
extend, revoke, verify, a database edit caught naming the entry, a researcher's key refused, bad input."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from tests.node.node_harness import Server, server_sql
from vnode_testlib import Dirs, dirs, vnode

from vfed.common.crypto import Keyring
from vfed.common.ledger import LeaseGranted
from vfed.common.ledger.metadata import (
    MetadataError,
    compute_metadata,
    content_hash,
    open_metadata,
    seal_metadata,
)
from vfed.common.trust import fingerprint

__all__ = ["dirs"]

CSV = "age,sex,bmi\n34,f,22.5\n51,m,\n47,f,30.1\n29,x,19.0\n"


async def run(*args: str) -> Result:
    return await asyncio.to_thread(vnode, *args)


def one_error(result: Result, needle: str, code: int = 1) -> None:
    """A refusal: exit code, one `Error: ...` line naming the problem."""
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert needle in lines[0], result.output


async def ok(*args: str) -> Result:
    result = await run(*args)
    assert result.exit_code == 0, result.output
    return result


async def as_json(*args: str) -> Any:
    return json.loads((await ok(*args, "--format", "json")).stdout)


async def test_org_admin_datasets_leases_and_verify(dirs: Dirs, tmp_path: Path) -> None:
    server = Server(tmp_path / "server", mqtt_url=None)
    api_keys = await server.seed(["a", "b"])
    await server.start()
    try:
        users = {name: uid for uid, name in await server_sql(server, "SELECT id, username FROM users")}
        orgs = {name: oid for oid, name in await server_sql(server, "SELECT id, name FROM organizations")}
        rings = {o: Keyring.generate() for o in "ab"}
        data = tmp_path / "patients.csv"
        data.write_text(CSV)
        for o in "ab":
            rings[o].save(tmp_path / f"{o}.json")
            await ok(
                "new", f"node-{o}", "--server-url", server.url, "--api-key", api_keys[o],
                "--private-key", str(tmp_path / f"{o}.json"), "--dataset", f"patients={data}",
            )  # fmt: skip
            await ok("keys", "upload", f"node-{o}")
        await ok("trust", str(orgs["b"]), "--fingerprint", fingerprint(rings["b"].keys[0].public), "node-a")

        # keys of people: a's org admin and a's researcher (certified by a), b's researcher (by b)
        people = {who: Keyring.generate() for who in ("admin", "researcher", "grantee")}
        for who, ring in people.items():
            ring.save(tmp_path / f"{who}.json")
        key = {who: ring.current.public.to_text() for who, ring in people.items()}
        await ok(
            "users", "certify", str(users["res-a"]), "node-a", "--key", key["admin"], "--roles", "org-admin"
        )
        await ok("users", "certify", str(users["res-a"]), "node-a", "--key", key["researcher"])
        await ok("users", "certify", str(users["res-b"]), "node-b", "--key", key["grantee"])
        admin = ("--identity", str(tmp_path / "admin.json"))

        # register (twice: the second changes nothing), list
        done = await ok("datasets", "register", "patients", "node-a", "--description", "one row per stay")
        assert done.output.startswith("registered dataset patients (content sha256 "), done.output
        again = await ok("datasets", "register", "patients", "node-a", "--description", "one row per stay")
        assert "registered already" in again.output

        # grant with metadata; a researcher's key may not
        granted = await ok(
            "leases", "grant", "node-a", "--dataset", "patients", "--to", "b", "--expires", "30d",
            "--max-runs", "5", "--epsilon", "2", "--purpose", "readmissions", *admin, "--format", "json",
        )  # fmt: skip
        lease = json.loads(granted.stdout)
        assert lease["grantee"] == orgs["b"] and lease["status"] == "active" and lease["metadata"]
        refused = await run(
            "leases", "grant", "node-a", "--dataset", "patients", "--to", str(orgs["b"]), "--expires", "30d",
            "--identity", str(tmp_path / "researcher.json"),
        )  # fmt: skip
        one_error(refused, "with roles researcher, not org-admin")

        # the sealed metadata opens for the grantee's researcher and the owner, not for a stranger
        history = await as_json("ledger", "history", "node-a")
        entry = next(e for e in history if e["kind"] == "lease.granted")
        body = LeaseGranted.model_validate(entry["body"])
        sender = people["admin"].current.public
        meta = open_metadata(body, people["grantee"], sender)
        assert meta is not None and meta.rows == 4 and meta.label == "patients"
        columns = {c.name: c for c in meta.columns}
        assert [c.name for c in meta.columns] == ["age", "sex", "bmi"]
        assert columns["age"].kind == "numeric" and columns["age"].min == 29 and columns["age"].max == 51
        assert columns["bmi"].missing == 1
        assert math.isclose(columns["bmi"].mean or 0, (22.5 + 30.1 + 19.0) / 3)
        assert columns["sex"].kind == "categorical" and columns["sex"].distinct == 3
        assert open_metadata(body, rings["a"], sender) == meta
        with pytest.raises(MetadataError) as stranger:
            open_metadata(body, Keyring.generate(), sender)
        assert stranger.value.reason == "not-a-recipient"

        # a second, short lease is flagged as expiring; extend, revoke, list
        await ok("leases", "grant", "node-a", "--dataset", "patients", "--to", str(orgs["b"]),
                 "--expires", "2d", "--user", str(users["res-b"]), "--no-metadata", *admin)  # fmt: skip
        listed = await as_json("leases", "list", "node-a")
        assert [(x["expiring"], x["runs"], x["max_runs"], x["users"]) for x in listed] == [
            (False, 0, 5, None),
            (True, 0, None, [users["res-b"]]),
        ]
        short = listed[1]["id"]
        soon = await as_json("leases", "list", "node-a", "--expiring", "7d")
        assert [x["id"] for x in soon] == [short]
        text = (await ok("leases", "list", "node-a")).output.splitlines()
        assert text[2].startswith(f"! {short[:12]}") and "active" in text[2], text
        extended = await ok("leases", "extend", short[:8], "node-a", "--expires", "60d", *admin)
        assert extended.output.startswith(f"extended lease {short[:12]} on patients until")
        revoked = await ok("leases", "revoke", lease["id"][:8], "node-a", "--reason", "study ended", *admin)
        assert revoked.output.startswith(f"revoked lease {lease['id'][:12]}")
        again_revoked = await run("leases", "revoke", lease["id"][:8], "node-a", "--reason", "x", *admin)
        one_error(again_revoked, "was revoked already")
        after = {x["id"]: x for x in await as_json("leases", "list", "node-a")}
        assert after[lease["id"]]["status"] == "revoked" and not after[short]["expiring"]
        datasets = await as_json("datasets", "list", "node-a")
        assert [(d["owner"], d["label"], d["active_leases"]) for d in datasets] == [
            (orgs["a"], "patients", 1)
        ]
        assert (await ok("ledger", "receipts", "node-a", "--format", "json")).output.strip() == "[]"
        about = await as_json("ledger", "history", "node-a", "--dataset", "patients")
        assert [e["kind"] for e in about] == [
            "dataset.registered", "lease.granted", "lease.granted", "lease.extended", "lease.revoked",
        ]  # fmt: skip

        # verify: fine, then a database edit is caught naming the entry and both heads
        verified = await ok("ledger", "verify", "node-a")
        first = verified.output.splitlines()[0]
        assert first.startswith(f"ledger ok: {len(history) + 3} entries, head {len(history) + 3}:"), first
        registered = next(e for e in history if e["kind"] == "dataset.registered")
        await server_sql(
            server,
            "UPDATE ledger_entries SET entry = replace(entry, 'one row per stay', 'two rows per stay') "
            "WHERE seq = :seq",
            seq=registered["seq"],
        )
        caught = await run("ledger", "verify", "node-a")
        one_error(caught, f"ledger entry {registered['seq']} (dataset.registered ")
        assert "changed after it was chained" in caught.output
        assert "server head" in caught.output and "this node's head" in caught.output
    finally:
        await server.stop()


async def test_bad_input_is_one_line(dirs: Dirs, tmp_path: Path) -> None:
    data = tmp_path / "patients.csv"
    data.write_text(CSV)
    await ok("new", "node-x", "--server-url", "http://127.0.0.1:9", "--api-key", "1.secret",
             "--dataset", f"patients={data}")  # fmt: skip
    unknown = await run("datasets", "register", "nope", "node-x")
    one_error(unknown, "dataset 'nope' is not in node node-x's config")
    identity = str(tmp_path / "missing.json")
    grant = ("leases", "grant", "node-x", "--dataset", "patients", "--to", "2", "--identity", identity)
    one_error(await run(*grant, "--expires", "soon"), "--expires: 'soon' is not a duration", code=2)
    one_error(await run(*grant, "--expires", "2001-01-01"), "is not after now", code=2)
    one_error(await run(*grant, "--expires", "3d", "--not-before", "5d"), "is not after --not-before", code=2)
    one_error(await run(*grant, "--expires", "3d", "--image", "latest"), "--image: 'latest' is not", code=2)
    one_error(await run(*grant, "--expires", "3d"), "no key file at")
    unknown = await run(
        *grant[:3], "--dataset", "nope", "--to", "2", "--expires", "3d", "--identity", identity
    )
    one_error(unknown, "dataset 'nope' is not in node")
    one_error(await run("leases", "list", "node-x", "--expiring", "soon"), "--expiring: 'soon'", code=2)
    past = await run("leases", "extend", "zz", "node-x", "--expires", "2001-01-01", "--identity", identity)
    one_error(past, "is in the past", code=2)


def test_metadata_content_hash_and_sealing(tmp_path: Path) -> None:
    """Metadata of a parquet file equals the CSV's; folders hash their files; a database URL has no hash; the
    sealed metadata opens only for its dataset's registration, signed by its sender."""
    import pandas as pd

    csv = tmp_path / "a.csv"
    csv.write_text(CSV)
    parquet = tmp_path / "a.parquet"
    pd.read_csv(csv).to_parquet(parquet)
    from_csv = compute_metadata("a", str(csv), "csv", now=0)
    from_parquet = compute_metadata("a", f"file://{parquet}", "parquet", now=0)
    assert from_csv.model_copy(update={"type": "parquet"}) == from_parquet
    with pytest.raises(MetadataError, match="not 'sql'"):
        compute_metadata("a", "postgresql://db/x", "sql")

    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "one.txt").write_text("1")
    before = content_hash(str(folder), "folder")
    assert before is not None and before == content_hash(str(folder), "folder")
    (folder / "two.txt").write_text("2")
    assert content_hash(str(folder), "folder") != before
    assert content_hash("postgresql://db/x", "sql") is None
    with pytest.raises(MetadataError, match="cannot read"):
        content_hash(str(tmp_path / "missing.csv"), "csv")

    admin, reader = Keyring.generate(), Keyring.generate()
    sealed = seal_metadata(
        from_csv, admin.current, [reader.current.public], collaboration_id=1, dataset_digest="ab" * 32
    )
    assert sealed["format"] == "vfed.sealed-metadata/1"
    body = {
        "collab": 1, "at": 0, "seen": {"seq": 0, "hash": "0" * 64}, "dataset": "ab" * 32, "owner": 1,
        "grantee": 2, "not_before": 0, "expires_at": 10, "metadata": sealed,
        "by": {"user": 1, "certificate": "cd" * 32},
    }  # fmt: skip
    lease = LeaseGranted.model_validate(body)
    assert open_metadata(lease, reader.current, admin.current.public) == from_csv
    moved = LeaseGranted.model_validate({**body, "dataset": "ef" * 32})
    with pytest.raises(MetadataError) as elsewhere:
        open_metadata(moved, reader, admin.current.public)
    assert elsewhere.value.reason == "metadata-invalid"
    with pytest.raises(MetadataError):
        open_metadata(lease, reader, Keyring.generate().current.public)  # not the sender who signed it
    assert (
        open_metadata(LeaseGranted.model_validate({**body, "metadata": None}), reader, admin.current.public)
        is None
    )
