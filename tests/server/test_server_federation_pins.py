"""Fingerprints in the federation file (`vserver import`): recorded per organization, and the honest server
then refuses a first key that differs (a mis-keyed node is told at once), on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from vserver_testkit import World, client, db_url, settings, world

from vfed.common.crypto import OrgKey
from vfed.common.trust import fingerprint, genesis_record, records_for_keys, show_fingerprint
from vfed.server.config import ConfigError
from vfed.server.importer import ImportFile, read_import_file, run_import
from vfed.server.models import Organization
from vfed.server.state import SESSIONS

__all__ = ["client", "db_url", "settings", "world"]


async def _import(w: World, organizations: list[dict[str, Any]]) -> list[str]:
    spec = ImportFile.model_validate({"organizations": organizations})
    async with w.client.app[SESSIONS]() as s:
        return await run_import(s, spec)


async def _roots(w: World) -> dict[str, str | None]:
    async with w.client.app[SESSIONS]() as s:
        rows = await s.execute(select(Organization.name, Organization.root_key_id))
        return {name: root for name, root in rows}


async def _genesis(w: World, org: str, key: OrgKey) -> tuple[int, Any]:
    records = [genesis_record(w.orgs[org], key).model_dump(mode="json")]
    return await w.call(
        f"{org.lower()}_node", "POST", f"/organizations/{w.orgs[org]}/key-records", json={"records": records}
    )


async def test_import_records_fingerprints(world: World) -> None:
    ka, kn = OrgKey.generate(), OrgKey.generate()
    typed = " ".join(kn.key_id[i : i + 8].upper() for i in range(0, 32, 8))  # as read out loud
    lines = await _import(
        world,
        [
            {"name": "org-A", "fingerprint": fingerprint(ka.public)},  # exists: its fingerprint is recorded
            {"name": "newcomer", "fingerprint": typed},
            {"name": "plain"},
        ],
    )
    assert lines == [
        f"organization org-A: first key {fingerprint(ka.public)} recorded",
        f"organization newcomer: created, first key {fingerprint(kn.public)}",
        "organization plain: created",
    ]
    roots = await _roots(world)
    assert roots["org-A"] == ka.key_id and roots["newcomer"] == kn.key_id
    assert roots["plain"] is None and roots["org-B"] is None
    # importing the same file again changes nothing and says nothing
    assert await _import(world, [{"name": "org-A", "fingerprint": ka.key_id}, {"name": "plain"}]) == []
    assert (await _roots(world))["org-A"] == ka.key_id


async def test_a_bad_fingerprint_is_an_import_error_naming_the_organization(world: World) -> None:
    with pytest.raises(ConfigError) as caught:
        await _import(world, [{"name": "fine"}, {"name": "typo-org", "fingerprint": "1a2b-3c4d"}])
    message = str(caught.value)
    assert "organizations.1.fingerprint: organization 'typo-org'" in message
    assert "is not a key fingerprint" in message
    assert "fine" not in await _roots(world)  # nothing was written
    key = OrgKey.generate()
    twice = [{"name": "twice", "fingerprint": key.key_id}, {"name": "twice", "fingerprint": "ab" * 16}]
    with pytest.raises(ConfigError, match="'twice' is listed with two fingerprints"):
        await _import(world, twice)


def test_the_import_file_carries_fingerprints(tmp_path: Path) -> None:
    key = OrgKey.generate()
    path = tmp_path / "federation.yaml"
    path.write_text(f"organizations:\n  - {{name: alpha, fingerprint: {fingerprint(key.public)}}}\n")
    assert read_import_file(path).organizations[0].fingerprint == fingerprint(key.public)
    path.write_text("organizations:\n  - {name: alpha, fingerprint: 12345678901234567890123456789012}\n")
    with pytest.raises(ConfigError, match=r"organizations\.0\.fingerprint: Input should be a valid string"):
        read_import_file(path)


async def test_the_server_refuses_a_first_key_the_file_does_not_name(world: World) -> None:
    named, other = OrgKey.generate(created_s=1000), OrgKey.generate(created_s=1000)
    await _import(world, [{"name": "org-A", "fingerprint": fingerprint(named.public)}])
    status, body = await _genesis(world, "A", other)
    assert (status, body["error"]) == (409, "key-chain-conflict"), body
    detail = body["detail"]
    assert f"the federation file names first key {show_fingerprint(named.key_id)}" in detail
    assert show_fingerprint(other.key_id) in detail
    _, served = await world.call("a_res", "GET", f"/organizations/{world.orgs['A']}/key-records")
    assert served == {"data": [], "head_key_id": None}  # nothing stored
    # the named key (and its rotations) go in; an organization the file names no key for takes any
    rotated = OrgKey.generate(created_s=1001)
    records = [r.model_dump(mode="json") for r in records_for_keys(world.orgs["A"], [named, rotated])]
    status, body = await world.call(
        "a_node", "POST", f"/organizations/{world.orgs['A']}/key-records", json={"records": records}
    )
    assert status == 201 and body["head_key_id"] == rotated.key_id, body
    assert (await _genesis(world, "B", other))[0] == 201


async def test_reimport_with_another_fingerprint(world: World) -> None:
    first, second = OrgKey.generate(), OrgKey.generate()
    # no first key published yet: the file may still change its mind
    await _import(world, [{"name": "org-B", "fingerprint": first.key_id}])
    lines = await _import(world, [{"name": "org-B", "fingerprint": second.key_id}])
    assert lines == [
        f"organization org-B: first key {fingerprint(second.public)} recorded "
        f"(was {fingerprint(first.public)})"
    ]
    # once the organization published its first key, a file naming another one is refused
    assert (await _genesis(world, "B", second))[0] == 201
    with pytest.raises(ConfigError) as caught:
        await _import(world, [{"name": "org-B", "fingerprint": first.key_id}])
    message = str(caught.value)
    assert message.startswith("organization 'org-B': the file names first key")
    assert fingerprint(first.public) in message and fingerprint(second.public) in message
    assert (await _roots(world))["org-B"] == second.key_id
    # and an organization that published its first key before any file named one is checked the same way
    key_c = OrgKey.generate()
    assert (await _genesis(world, "C", key_c))[0] == 201
    with pytest.raises(ConfigError, match="'org-C': the file names first key"):
        await _import(world, [{"name": "org-C", "fingerprint": first.key_id}])
    assert await _import(world, [{"name": "org-C", "fingerprint": key_c.key_id}]) == [
        f"organization org-C: first key {fingerprint(key_c.public)} recorded"
    ]
