"""Shared fixtures and a seeded "world" for the server tests (imported by each test module).

Three organizations: A and B share collaboration `ab`; C is alone in collaboration `cx`, so anything of C
that a caller from A can see is a cross-organization leak.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.pwhash
import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy import select

from vfed.server import auth
from vfed.server.app import create_app
from vfed.server.config import BlobsSettings, LoginSettings, Settings
from vfed.server.models import Collaboration, Node, Organization, Role, User
from vfed.server.state import SESSIONS

PASSWORD = "correct horse battery"
JWT_SECRET = "test-secret-that-is-long-enough-for-hs256"


@functools.cache
def password_hash() -> str:
    """Hash once per session; argon2id costs ~0.1 s here by design."""
    return nacl.pwhash.argon2id.str(PASSWORD.encode()).decode()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same tests on SQLite (file) and on a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'vserver.sqlite'}"
    return str(request.getfixturevalue("postgres_url"))


def kit_settings(tmp_path: Path, db_url: str, blobs: BlobsSettings, **changes: Any) -> Settings:
    """The test server's settings (small blob and log limits, a quick login throttle), with `changes`."""
    fields: dict[str, Any] = {
        "max_blob_bytes": 1024 * 1024,
        "run_log_max_bytes": 1000,
        "login": LoginSettings(throttle_after=3, throttle_base_s=30),
    }
    fields.update(changes)
    return Settings(data_dir=tmp_path, database_url=db_url, jwt_secret=JWT_SECRET, blobs=blobs, **fields)


@pytest.fixture
def settings(tmp_path: Path, db_url: str, blobs_settings: BlobsSettings) -> Settings:
    """`blobs_settings` is the filesystem store unless a test asks for both (s3_testkit.both_backends)."""
    return kit_settings(tmp_path, db_url, blobs_settings)


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> TestClient:  # type: ignore[type-arg]
    return await aiohttp_client(create_app(settings))  # type: ignore[no-any-return]


USERS = {
    "root": ("A", ["root"]),
    "a_admin": ("A", ["org-admin"]),
    "a_res": ("A", ["researcher"]),
    "a_res2": ("A", ["researcher"]),
    "a_view": ("A", ["viewer"]),
    "b_admin": ("B", ["org-admin"]),
    "b_res": ("B", ["researcher"]),
    "c_admin": ("C", ["org-admin"]),
    "c_res": ("C", ["researcher"]),
    "c_view": ("C", ["viewer"]),
}
NODES = {"a_node": ("A", "ab"), "a_node2": ("A", "ab"), "b_node": ("B", "ab"), "c_node": ("C", "cx")}


@dataclass
class World:
    """Seeded organizations, collaborations, users and nodes, with tokens fetched through the API."""

    client: TestClient  # type: ignore[type-arg]
    orgs: dict[str, int] = field(default_factory=dict)
    collabs: dict[str, int] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)
    api_keys: dict[str, str] = field(default_factory=dict)
    _tokens: dict[str, str] = field(default_factory=dict)

    async def token(self, who: str) -> str:
        """Log in (user password or node API key) once, then reuse the access token."""
        if who not in self._tokens:
            if who in self.api_keys:
                r = await self.client.post("/api/v1/token/node", json={"api_key": self.api_keys[who]})
            else:
                r = await self.client.post("/api/v1/token/user", json={"username": who, "password": PASSWORD})
            assert r.status == 200, await r.text()
            self._tokens[who] = (await r.json())["access_token"]
        return self._tokens[who]

    async def h(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.token(who)}"}

    async def call(self, who: str, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        """One API call as `who`; returns (status, parsed JSON or raw bytes)."""
        r = await self.client.request(method, "/api/v1" + path, headers=await self.h(who), **kw)
        body = await r.read()
        ctype = r.headers.get("Content-Type", "")
        return r.status, (await r.json()) if "json" in ctype else body

    async def upload(self, who: str, data: bytes) -> str:
        status, body = await self.call(who, "POST", "/blobs", data=data)
        assert status == 201, body
        return str(body["id"])

    async def task(self, who: str, collab: str, orgs: list[str], **extra: Any) -> dict[str, Any]:
        """Create a task with a fresh input blob per target organization."""
        targets = [
            {"id": self.orgs[o], "input_blob_id": await self.upload(who, b"sealed-" + o.encode())}
            for o in orgs
        ]
        payload = {
            "collaboration_id": self.collabs[collab],
            "image": "alpine:3",
            "organizations": targets,
            **extra,
        }
        status, body = await self.call(who, "POST", "/tasks", json=payload)
        assert status == 201, body
        return dict(body)


async def seed(client: TestClient) -> World:  # type: ignore[type-arg]
    """Insert the world directly (argon2 hashing through the API would dominate test time)."""
    world = World(client)
    async with client.app[SESSIONS]() as s:
        orgs = {n: Organization(name=f"org-{n}") for n in "ABC"}
        s.add_all(orgs.values())
        collabs = {
            "ab": Collaboration(name="ab", organizations=[orgs["A"], orgs["B"]]),
            "cx": Collaboration(name="cx", organizations=[orgs["C"]]),
        }
        s.add_all(collabs.values())
        roles = {r.name: r for r in (await s.execute(select(Role))).scalars()}
        users = {
            name: User(username=name, password_hash=password_hash(), roles=[roles[r] for r in rs])
            for name, (_, rs) in USERS.items()
        }
        await s.flush()
        for name, (org, _) in USERS.items():
            users[name].organization_id = orgs[org].id
        s.add_all(users.values())
        nodes = {}
        for name, (org, collab) in NODES.items():
            key_id, api_key, key_hash = auth.new_api_key()
            world.api_keys[name] = api_key
            nodes[name] = Node(
                name=name,
                organization_id=orgs[org].id,
                collaboration_id=collabs[collab].id,
                api_key_id=key_id,
                api_key_hash=key_hash,
            )
        s.add_all(nodes.values())
        await s.commit()
        world.orgs = {n: o.id for n, o in orgs.items()}
        world.collabs = {n: c.id for n, c in collabs.items()}
        world.users = {n: u.id for n, u in users.items()}
        world.nodes = {n: x.id for n, x in nodes.items()}
    return world


@pytest.fixture
async def world(client: TestClient) -> AsyncIterator[World]:  # type: ignore[type-arg]
    yield await seed(client)


async def scrape_metrics(client: TestClient) -> str:  # type: ignore[type-arg]
    """`GET /metrics` on the API port, with the bearer token a `metrics.token_file` would have given the app
    (without one the API port refuses: tests/server/test_server_metrics_access.py)."""
    from vfed.server.metrics import METRICS_ACCESS

    token = "test-metrics-token-0123456789"
    client.app[METRICS_ACCESS].token = token
    r = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert r.status == 200, await r.text()
    return str(await r.text())
