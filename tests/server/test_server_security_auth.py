"""Accounts, tokens, credentials and the audit log (security hardening, issue 17 items 1, 7 and 9).

Against the real server application on SQLite and on PostgreSQL: an org-admin cannot touch root, nobody edits
a user holding a role they could not grant, changed passwords and roles revoke tokens, refresh tokens rotate
and a reused one revokes its family, nodes can be deleted and their keys rotated, logins slow down per
address and per account at an address (never a lockout), X-Forwarded-For counts only from trusted proxies,
and each administrative action leaves an audit entry.

Throttle delays are 30 s here, so no test waits for one; the test that watches delays grow moves the
throttles' clock instead of sleeping.
"""

from __future__ import annotations

import asyncio
from ipaddress import ip_network
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy import select
from vserver_testkit import PASSWORD, World, client, db_url, seed, settings, world

from vfed.client.http import ApiSession
from vfed.common.crypto.keys import OrgKey
from vfed.server.app import create_app
from vfed.server.config import LoginSettings, Settings
from vfed.server.models import Node, User
from vfed.server.state import SESSIONS
from vfed.server.throttle import THROTTLES

__all__ = ["client", "db_url", "settings", "world"]
API = "/api/v1"
ATTACKER, ROOT_HOME, ELSEWHERE = "203.0.113.5", "198.51.100.7", "192.0.2.44"


@pytest.fixture
async def proxied(aiohttp_client: Any, settings: Settings) -> World:
    """The seeded world behind a trusted reverse proxy on loopback, so X-Forwarded-For names the client."""
    behind_proxy = settings.model_copy(
        update={
            "trusted_proxies": [ip_network("127.0.0.1/32")],
            "login": LoginSettings(
                throttle_after=3, throttle_base_s=30, address_throttle_after=5, node_throttle_after=5
            ),
        }
    )
    return await seed(await aiohttp_client(create_app(behind_proxy)))


async def _login(
    c: TestClient,  # type: ignore[type-arg]
    username: str,
    password: str = PASSWORD,
    xff: str | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"X-Forwarded-For": xff} if xff else {}
    r = await c.post(f"{API}/token/user", json={"username": username, "password": password}, headers=headers)
    return r.status, await r.json(), dict(r.headers)


async def _tokens(c: TestClient, username: str, password: str = PASSWORD) -> dict[str, Any]:  # type: ignore[type-arg]
    status, body, _ = await _login(c, username, password)
    assert status == 200, body
    return body


async def _get(c: TestClient, access: str, path: str) -> tuple[int, Any]:  # type: ignore[type-arg]
    r = await c.get(API + path, headers={"Authorization": f"Bearer {access}"})
    return r.status, await r.json()


async def _refresh(c: TestClient, refresh: str) -> tuple[int, dict[str, Any]]:  # type: ignore[type-arg]
    r = await c.post(f"{API}/token/refresh", json={"refresh_token": refresh})
    return r.status, await r.json()


async def _accounts(c: TestClient) -> dict[str, Any]:  # type: ignore[type-arg]
    """Everything an edit could change, per user and per node, straight from the database."""
    async with c.app[SESSIONS]() as s:
        users = (await s.execute(select(User))).scalars().all()
        nodes = (await s.execute(select(Node))).scalars().all()
        return {
            **{
                u.username: (u.password_hash, sorted(r.name for r in u.roles), u.token_version, u.disabled)
                for u in users
            },
            **{f"node:{n.name}": (n.api_key_id, n.api_key_hash, n.token_version) for n in nodes},
        }


def _refused(status: int, body: Any, code: int = 403) -> None:
    assert status == code, body
    assert isinstance(body, dict) and body["error"] and body["detail"], body


# --- item 1: nobody edits, locks or deletes a user holding a role they could not grant ----


async def test_forbidden_user_edits_are_403_and_change_nothing(world: World) -> None:
    root_id, admin_id, res_id = world.users["root"], world.users["a_admin"], world.users["a_res"]
    edits: list[tuple[str, str, dict[str, Any] | None]] = [
        ("PATCH", "{}", {"password": "taken over!"}),
        ("PATCH", "{}", {"roles": ["researcher"]}),
        ("PATCH", "{}", {"roles": ["root"]}),
        ("PATCH", "{}", {"disabled": True}),
        ("DELETE", "{}", None),
    ]
    cases = [
        ("a_admin", root_id, "root"),  # org-admin against root of its own organization
        ("a_res", admin_id, "user"),  # researcher against its org-admin
        ("a_res", root_id, "user"),
        ("a_view", res_id, "user"),
        ("a_node", admin_id, "user"),  # a node token is no administrator either
    ]
    before = await _accounts(world.client)
    for who, target, reason in cases:
        for method, _, body in edits:
            status, answer = await world.call(who, method, f"/users/{target}", json=body)
            _refused(status, answer)
            assert reason in answer["detail"], (who, target, method, body, answer)
    # another organization's users stay invisible: 404, not 403
    for method, _, body in edits:
        status, answer = await world.call("c_admin", method, f"/users/{admin_id}", json=body)
        _refused(status, answer, 404)
    assert await _accounts(world.client) == before
    status, _, _ = await _login(world.client, "root")
    assert status == 200
    # the org-admin may still manage whom it could have created (the control that the refusals are specific)
    status, answer = await world.call("a_admin", "PATCH", f"/users/{res_id}", json={"roles": ["viewer"]})
    assert status == 200 and answer["roles"] == ["viewer"]
    # and root may do everything to the org-admin
    status, answer = await world.call("root", "PATCH", f"/users/{admin_id}", json={"roles": ["researcher"]})
    assert status == 200 and answer["roles"] == ["researcher"]


async def test_nobody_disables_or_deletes_themselves(world: World) -> None:
    me = world.users["a_admin"]
    before = await _accounts(world.client)
    status, body = await world.call("a_admin", "PATCH", f"/users/{me}", json={"disabled": True})
    _refused(status, body)
    status, body = await world.call("a_admin", "DELETE", f"/users/{me}")
    _refused(status, body)
    assert await _accounts(world.client) == before


async def test_delete_and_disable_users(world: World) -> None:
    c = world.client
    victim = await _tokens(c, "a_res2")
    status, _ = await world.call(
        "a_admin", "PATCH", f"/users/{world.users['a_res']}", json={"disabled": True}
    )
    assert status == 200
    status, body, _ = await _login(c, "a_res")
    _refused(status, body)
    assert body["error"] == "account-disabled"
    status, body = await world.call(
        "a_admin", "PATCH", f"/users/{world.users['a_res']}", json={"disabled": False}
    )
    assert status == 200 and body["disabled"] is False
    assert (await _login(c, "a_res"))[0] == 200
    status, _ = await world.call("a_admin", "DELETE", f"/users/{world.users['a_res2']}")
    assert status == 204
    status, body = await _get(c, victim["access_token"], "/users")
    _refused(status, body, 401)
    status, body, _ = await _login(c, "a_res2")
    _refused(status, body, 401)
    status, body = await world.call("a_admin", "GET", f"/users/{world.users['a_res2']}")
    assert status == 404


# --- item 7: token revocation, own password, refresh rotation ----


async def test_password_change_by_admin_revokes_tokens(world: World) -> None:
    c = world.client
    old = await _tokens(c, "a_res")
    assert (await _get(c, old["access_token"], "/users"))[0] == 200
    status, _ = await world.call(
        "a_admin", "PATCH", f"/users/{world.users['a_res']}", json={"password": "a brand new one"}
    )
    assert status == 200
    status, body = await _get(c, old["access_token"], "/users")
    _refused(status, body, 401)
    assert body["error"] == "token-revoked"
    status, body = await _refresh(c, old["refresh_token"])
    _refused(status, body, 401)
    assert (await _login(c, "a_res"))[0] == 401
    fresh = await _tokens(c, "a_res", "a brand new one")
    assert (await _get(c, fresh["access_token"], "/users"))[0] == 200


async def test_role_change_revokes_tokens(world: World) -> None:
    c = world.client
    old = await _tokens(c, "a_res2")
    status, _ = await world.call(
        "a_admin", "PATCH", f"/users/{world.users['a_res2']}", json={"roles": ["viewer"]}
    )
    assert status == 200
    status, body = await _get(c, old["access_token"], "/users")
    _refused(status, body, 401)
    status, body = await _refresh(c, old["refresh_token"])
    _refused(status, body, 401)
    fresh = await _tokens(c, "a_res2")
    status, me = await _get(c, fresh["access_token"], f"/users/{world.users['a_res2']}")
    assert status == 200 and me["roles"] == ["viewer"]


async def test_own_password_change_needs_the_old_password(world: World) -> None:
    c = world.client
    me = f"/users/{world.users['a_res']}"
    before = await _accounts(c)
    status, body = await world.call("a_res", "PATCH", me, json={"password": "stolen token pw"})
    _refused(status, body, 422)
    assert "old_password" in body["detail"]
    status, body = await world.call(
        "a_res", "PATCH", me, json={"password": "stolen token pw", "old_password": "a guess"}
    )
    _refused(status, body)
    assert body["error"] == "wrong-password"
    assert await _accounts(c) == before
    status, _ = await world.call(
        "a_res", "PATCH", me, json={"password": "my own new pw", "old_password": PASSWORD}
    )
    assert status == 200
    status, body = await world.call("a_res", "GET", me)  # the token used for the change is revoked too
    _refused(status, body, 401)
    assert (await _login(c, "a_res"))[0] == 401
    assert (await _login(c, "a_res", "my own new pw"))[0] == 200


async def test_refresh_rotates_and_reuse_revokes_the_family(world: World) -> None:
    c = world.client
    first = await _tokens(c, "b_res")
    status, second = await _refresh(c, first["refresh_token"])
    assert status == 200 and second["refresh_token"] != first["refresh_token"]
    status, third = await _refresh(c, second["refresh_token"])
    assert status == 200
    assert (await _get(c, third["access_token"], "/users"))[0] == 200
    other_session = await _tokens(c, "b_res")
    # the first refresh token comes back: someone holds a copy
    status, body = await _refresh(c, first["refresh_token"])
    _refused(status, body, 401)
    assert body["error"] == "token-reused"
    for refresh in (third["refresh_token"], other_session["refresh_token"]):
        status, body = await _refresh(c, refresh)
        _refused(status, body, 401)
    for access in (third["access_token"], other_session["access_token"]):
        status, body = await _get(c, access, "/users")
        _refused(status, body, 401)
    fresh = await _tokens(c, "b_res")
    assert (await _get(c, fresh["access_token"], "/users"))[0] == 200
    status, log = await world.call("root", "GET", "/audit?action=token.reuse-revoked")
    assert status == 200 and [e["target_id"] for e in log["data"]] == [world.users["b_res"]]


# --- item 7: nodes: delete and API-key rotation ----


async def _node_login(c: TestClient, api_key: str) -> tuple[int, dict[str, Any]]:  # type: ignore[type-arg]
    r = await c.post(f"{API}/token/node", json={"api_key": api_key})
    return r.status, await r.json()


async def test_node_key_rotation_refuses_old_key_and_tokens(world: World) -> None:
    c = world.client
    old_key = world.api_keys["a_node"]
    status, old = await _node_login(c, old_key)
    assert status == 200
    node = world.nodes["a_node"]
    before = await _accounts(c)
    for who, code in (("a_res", 403), ("b_admin", 403), ("a_node", 403), ("c_admin", 404)):
        status, body = await world.call(who, "POST", f"/nodes/{node}/api-key")
        _refused(status, body, code)
    assert await _accounts(c) == before
    status, rotated = await world.call("a_admin", "POST", f"/nodes/{node}/api-key")
    assert status == 200 and rotated["id"] == node and rotated["api_key"] != old_key
    status, body = await _node_login(c, old_key)
    _refused(status, body, 401)
    status, body = await _get(c, old["access_token"], "/nodes/self")
    _refused(status, body, 401)
    status, body = await _refresh(c, old["refresh_token"])
    _refused(status, body, 401)
    status, new = await _node_login(c, rotated["api_key"])
    assert status == 200 and new["node_id"] == node
    status, me = await _get(c, new["access_token"], "/nodes/self")
    assert status == 200 and me["id"] == node


async def test_node_delete(world: World) -> None:
    c = world.client
    node = world.nodes["a_node2"]
    status, tokens = await _node_login(c, world.api_keys["a_node2"])
    assert status == 200
    before = await _accounts(c)
    # a_node sees no node but itself, c_admin nothing of A's: invisible is 404, visible but not theirs 403
    for who, code in (("a_res", 403), ("a_view", 403), ("b_admin", 403), ("a_node", 404), ("c_admin", 404)):
        status, body = await world.call(who, "DELETE", f"/nodes/{node}")
        _refused(status, body, code)
    assert await _accounts(c) == before
    status, _ = await world.call("a_admin", "DELETE", f"/nodes/{node}")
    assert status == 204
    status, body = await _node_login(c, world.api_keys["a_node2"])
    _refused(status, body, 401)
    status, body = await _get(c, tokens["access_token"], "/nodes/self")
    _refused(status, body, 401)
    status, body = await world.call("a_admin", "GET", f"/nodes/{node}")
    _refused(status, body, 404)
    status, body = await world.call("a_admin", "DELETE", f"/nodes/{node}")
    _refused(status, body, 404)
    assert (await _node_login(c, world.api_keys["a_node"]))[0] == 200  # the other node is untouched


# --- item 7: throttling, never a lockout ----


async def test_attacker_cannot_lock_root_out(proxied: World) -> None:
    c = proxied.client
    codes = [(await _login(c, "root", "guess", ATTACKER))[0] for _ in range(3)]
    assert codes == [401, 401, 401]
    status, body, headers = await _login(c, "root", PASSWORD, ATTACKER)
    assert status == 429 and body["error"] == "too-many-attempts" and int(headers["Retry-After"]) > 0
    status, body, _ = await _login(c, "root", PASSWORD, ROOT_HOME)
    assert status == 200, body


async def test_unknown_and_known_users_get_the_same_answers(proxied: World) -> None:
    c = proxied.client
    answers = {}
    for name, address in (("b_res", ATTACKER), ("no-such-user", ELSEWHERE)):
        seen = []
        for _ in range(4):
            status, body, headers = await _login(c, name, "guess", address)
            seen.append(
                (status, body["error"], body["detail"] if status == 401 else "", "Retry-After" in headers)
            )
        answers[name] = seen
    assert answers["b_res"] == answers["no-such-user"]
    assert [s for s, *_ in answers["b_res"]] == [401, 401, 401, 429]


async def test_one_address_trying_many_accounts_is_slowed(proxied: World) -> None:
    c = proxied.client
    for name in ("a_res", "a_res2", "a_view", "b_res", "nobody"):  # address_throttle_after=5, one try each
        assert (await _login(c, name, "guess", ATTACKER))[0] == 401
    status, body, _ = await _login(c, "c_res", PASSWORD, ATTACKER)
    assert status == 429 and body["error"] == "too-many-attempts"
    assert (await _login(c, "c_res", PASSWORD, ELSEWHERE))[0] == 200


async def test_delays_grow_with_each_failure(proxied: World) -> None:
    c = proxied.client
    now = [1000.0]
    throttles = c.app[THROTTLES]
    for brake in (throttles.address, throttles.account, throttles.node_key):
        brake.clock = lambda: now[0]
    for _ in range(3):
        assert (await _login(c, "a_view", "guess", ATTACKER))[0] == 401
    waits = []
    for _ in range(4):
        status, _, headers = await _login(c, "a_view", PASSWORD, ATTACKER)
        assert status == 429  # even the right password waits
        waits.append(int(headers["Retry-After"]))
        now[0] += waits[-1]  # the delay has passed: the next try is heard
        if len(waits) < 4:
            assert (await _login(c, "a_view", "guess", ATTACKER))[0] == 401
    assert waits == [31, 61, 121, 241]  # 30 s, doubling with each failure (+1: Retry-After rounds up)
    assert (await _login(c, "a_view", PASSWORD, ATTACKER))[0] == 200


async def test_node_logins_are_throttled_per_key_id(proxied: World) -> None:
    c = proxied.client
    key_id = proxied.api_keys["a_node"].split(".")[0]
    for _ in range(5):
        assert (await _node_login(c, f"{key_id}.wrong-secret"))[0] == 401
    status, body = await _node_login(c, proxied.api_keys["a_node"])
    assert status == 429 and body["error"] == "too-many-attempts"
    assert (await _node_login(c, proxied.api_keys["a_node2"]))[0] == 200


async def _create_user_via(w: World, username: str, xff: str) -> int:
    """An administrative action (a_admin creates a user) with an X-Forwarded-For header."""
    headers = {**await w.h("a_admin"), "X-Forwarded-For": xff}
    body = {"username": username, "password": "long enough"}
    r = await w.client.post(f"{API}/users", json=body, headers=headers)
    return r.status


async def test_forwarded_for_is_ignored_from_untrusted_peers(world: World) -> None:
    """No trusted proxies configured: the header is the client's own claim and changes nothing."""
    c = world.client
    for _ in range(3):
        assert (await _login(c, "a_view", "guess", ATTACKER))[0] == 401
    status, body, _ = await _login(c, "a_view", PASSWORD, ROOT_HOME)
    assert status == 429 and body["error"] == "too-many-attempts"
    status = await _create_user_via(world, "x1", ROOT_HOME)
    assert status == 201
    status, log = await world.call("root", "GET", "/audit?action=user.create")
    assert [e["address"] for e in log["data"]] == ["127.0.0.1"]


async def test_forwarded_for_from_a_trusted_proxy_names_the_client(proxied: World) -> None:
    c = proxied.client
    for _ in range(3):
        assert (await _login(c, "root", "guess", ATTACKER))[0] == 401
    # the attacker puts root's address in front; our proxy appends the address it really saw
    status, body, _ = await _login(c, "root", PASSWORD, f"{ROOT_HOME}, {ATTACKER}")
    assert status == 429 and body["error"] == "too-many-attempts"
    assert (await _login(c, "root", PASSWORD, f"{ATTACKER}, {ROOT_HOME}"))[0] == 200
    status = await _create_user_via(proxied, "x2", ELSEWHERE)
    assert status == 201
    status, log = await proxied.call("root", "GET", "/audit?action=user.create")
    assert [e["address"] for e in log["data"]] == [ELSEWHERE]


# --- item 9: the audit log ----


async def test_audit_entries_for_each_administrative_action(world: World) -> None:
    status, new = await world.call(
        "a_admin",
        "POST",
        "/users",
        json={"username": "newbie", "password": "long enough", "roles": ["viewer"]},
    )
    assert status == 201
    uid = new["id"]
    for change in (
        {"roles": ["researcher"]},
        {"password": "changed it!"},
        {"disabled": True},
        {"disabled": False},
    ):
        assert (await world.call("a_admin", "PATCH", f"/users/{uid}", json=change))[0] == 200
    assert (await world.call("a_admin", "DELETE", f"/users/{uid}"))[0] == 204
    status, node = await world.call(
        "a_admin", "POST", "/nodes", json={"collaboration_id": world.collabs["ab"]}
    )
    assert status == 201
    assert (await world.call("a_admin", "POST", f"/nodes/{node['id']}/api-key"))[0] == 200
    assert (await world.call("a_admin", "DELETE", f"/nodes/{node['id']}"))[0] == 204
    key = OrgKey.generate().public
    path = f"/organizations/{world.orgs['A']}/public_key"
    assert (await world.call("a_admin", "PUT", path, json={"public_key": key.to_text()}))[0] == 200
    status, c_user = await world.call(
        "c_admin", "POST", "/users", json={"username": "c_new", "password": "long enough"}
    )
    assert status == 201
    # a refused action leaves no entry
    assert (await world.call("a_admin", "DELETE", f"/users/{world.users['root']}"))[0] == 403

    status, log = await world.call("root", "GET", "/audit?per_page=500")
    assert status == 200
    mine = [(e["action"], e["target_kind"], e["target_id"]) for e in reversed(log["data"])]
    assert mine == [
        ("user.create", "user", uid),
        ("user.roles", "user", uid),
        ("user.password", "user", uid),
        ("user.disable", "user", uid),
        ("user.enable", "user", uid),
        ("user.delete", "user", uid),
        ("node.create", "node", node["id"]),
        ("node.rotate-key", "node", node["id"]),
        ("node.delete", "node", node["id"]),
        ("organization.public-key", "organization", world.orgs["A"]),
        ("user.create", "user", c_user["id"]),
    ]
    first = log["data"][-1]
    assert first["actor_kind"] == "user" and first["actor_name"] == "a_admin"
    assert first["actor_id"] == world.users["a_admin"] and first["target_name"] == "newbie"
    assert first["organization_id"] == world.orgs["A"] and first["address"] == "127.0.0.1" and first["at"]
    assert first["detail"] == {"roles": ["viewer"]}
    assert log["data"][-2]["detail"] == {"before": ["viewer"], "after": ["researcher"]}
    assert log["data"][1]["detail"] == {"key_id": key.key_id, "previous_key_id": None}
    assert "changed it!" not in str(log)  # no secret is logged

    # org-admins see their own organization's entries only; others may not read the log
    status, a_log = await world.call("a_admin", "GET", "/audit?per_page=500")
    assert status == 200 and len(a_log["data"]) == 10
    assert {e["organization_id"] for e in a_log["data"]} == {world.orgs["A"]}
    status, c_log = await world.call("c_admin", "GET", f"/audit?organization_id={world.orgs['A']}")
    assert status == 200 and c_log["data"] == [] and c_log["total"] == 0
    for who in ("a_res", "a_view", "a_node"):
        status, body = await world.call(who, "GET", "/audit")
        _refused(status, body)
    # pagination: newest first, with a link to the next page
    status, page = await world.call("root", "GET", "/audit?per_page=4")
    assert status == 200 and page["total"] == 11 and len(page["data"]) == 4 and page["links"]["next"]
    assert [e["id"] for e in page["data"]] == [e["id"] for e in log["data"][:4]]
    status, last = await world.call("root", "GET", "/audit?per_page=4&page=3")
    assert [e["id"] for e in last["data"]] == [e["id"] for e in log["data"][8:]] and last["links"][
        "next"
    ] is None


# --- the client follows the rotation ----


async def test_client_refreshes_once_for_concurrent_requests(world: World) -> None:
    """Five requests meet a 401 together: the client refreshes once, so the server sees no reuse."""
    api = ApiSession(str(world.client.make_url("")))
    try:
        await api.login("a_res", PASSWORD)
        api.token = "not-a-token"  # as if it had expired
        answers = await asyncio.gather(*(api.request("GET", "/users") for _ in range(5)))
        assert all(a["data"][0]["username"] == "a_res" for a in answers)
        api.token = "not-a-token"
        assert (await api.request("GET", "/users"))["total"] == 1  # the rotated refresh token still works
    finally:
        await api.close()
    status, log = await world.call("root", "GET", "/audit?action=token.reuse-revoked")
    assert status == 200 and log["data"] == []
