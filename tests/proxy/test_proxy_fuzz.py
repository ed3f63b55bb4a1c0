"""Fuzzing a run's proxy with hypothesis: any method, path, query, headers and body an algorithm could send
answer below 500, every refusal is JSON with a reason, and the proxy keeps serving. Bounded (a fixed number
of examples, no shrinking) so it runs in seconds."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from tests.proxy.proxy_kit import World, world

__all__ = ["world"]

ROUTES = ["/run", "/organizations", "/tasks", "/tasks/{n}", "/tasks/{n}/wait", "/runs/{n}/result", "/{junk}"]
# well-formed HTTP only: a request aiohttp cannot parse (an unknown method) gets its plain-text 400
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
SAFE_TEXT = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="%?#"), max_size=30)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("proxy", timeout=30)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
task_like = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=30),
        "organizations": st.lists(st.integers(-5, 10**12), max_size=3),
        "input": json_values,
        "inputs": json_values,
        "image": st.text(max_size=30),
        "datasets": json_values,
        "description": json_values,
    },
)
bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    task_like.map(lambda v: json.dumps(v).encode()),
)


def _fuzz(path: str) -> list[tuple[str, str, int]]:
    seen: list[tuple[str, str, int]] = []

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],  # no shrinking: a failure is reported as found
    )
    @given(
        method=st.sampled_from(METHODS),
        route=st.sampled_from(ROUTES),
        n=st.one_of(st.integers(-(10**20), 10**20).map(str), SAFE_TEXT),
        junk=SAFE_TEXT,
        query=st.dictionaries(st.sampled_from(["timeout_s", "page", "x"]), SAFE_TEXT, max_size=2),
        content_type=st.sampled_from(["application/json", "text/plain", "application/octet-stream", "x/y"]),
        body=bodies,
    )
    def one(
        method: str, route: str, n: str, junk: str, query: dict[str, str], content_type: str, body: bytes
    ) -> None:
        target = route.format(n=n, junk=junk)
        if "timeout_s" in query:
            query["timeout_s"] = query["timeout_s"][:3] or "0"
        if query:
            target += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        conn = _UnixConnection(path)
        try:
            conn.request(method, target, body=body or None, headers={"Content-Type": content_type})
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        seen.append((method, target, response.status))
        assert response.status < 500, (method, target, response.status, raw[:300])
        if response.status >= 400 and method != "HEAD":
            try:
                document = json.loads(raw)
            except ValueError:
                document = {}
            assert document.get("error") and document.get("detail"), (method, target, response.status, raw)

    one()
    return seen


async def test_fuzzed_requests_never_crash_the_proxy(world: World, tmp_path: Path) -> None:
    socket_path = tmp_path / "sock" / "proxy.sock"  # the world's proxy
    assert socket_path.exists()
    seen: list[Any] = await asyncio.to_thread(_fuzz, str(socket_path))
    assert len(seen) >= 100
    assert {status for _, _, status in seen} & {400, 403, 404, 405, 413, 429} != set()
    async with world.proxy_session.get("/run") as r:  # still serving
        assert r.status == 200
        assert (await r.json())["run_id"] == world.parent_run
