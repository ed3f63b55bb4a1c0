"""Credentials: password hashes, node API keys, JWTs, and who is calling (`Principal`)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
import nacl.exceptions
import nacl.pwhash

from vfed.server.errors import unauthorized

ALGORITHM = "HS256"
_DUMMY_HASH = hashlib.sha256(b"no-such-key").hexdigest()


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    kind: str  # "user" | "node" | "run"
    organization_id: int
    roles: frozenset[str]
    user_id: int | None = None
    node_id: int | None = None
    collaboration_id: int | None = None
    run_id: int | None = None
    task_id: int | None = None
    job_id: int | None = None
    token_version: int = 0  # the account's; a token issued under another version is refused
    extra: dict[str, Any] = field(default_factory=dict)


async def hash_password(password: str) -> str:
    """argon2id, off the event loop (it costs tens of milliseconds by design)."""
    raw = await asyncio.to_thread(nacl.pwhash.argon2id.str, password.encode())
    return raw.decode()


async def verify_password(stored: str, password: str) -> bool:
    """True when `password` matches the argon2id hash."""
    try:
        return await asyncio.to_thread(nacl.pwhash.verify, stored.encode(), password.encode())
    except (nacl.exceptions.InvalidkeyError, nacl.exceptions.CryptoError, ValueError):
        return False


def new_api_key() -> tuple[str, str, str]:
    """(key_id, full key shown once, stored hash). The secret has 256 bits, so SHA-256 suffices."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return key_id, f"{key_id}.{secret}", hash_secret(secret)


def hash_secret(secret: str) -> str:
    """Stored form of an API key secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def split_api_key(api_key: str) -> tuple[str, str]:
    """`<key_id>.<secret>` -> parts, or 401."""
    key_id, sep, secret = api_key.partition(".")
    if not sep or not key_id or not secret:
        raise unauthorized("an API key has the form <key_id>.<secret>", "invalid-api-key")
    return key_id, secret


def check_secret(secret: str, stored_hash: str | None) -> bool:
    """Constant-time comparison; a missing key still costs one comparison."""
    return hmac.compare_digest(hash_secret(secret), stored_hash or _DUMMY_HASH) and stored_hash is not None


def issue(secret: str, claims: dict[str, Any], ttl_s: float) -> tuple[str, datetime]:
    """Sign a JWT with `claims` valid for `ttl_s` seconds."""
    now = time.time()
    exp = now + ttl_s
    payload = {"jti": secrets.token_hex(8), **claims, "iat": int(now), "exp": int(exp)}
    return jwt.encode(payload, secret, algorithm=ALGORITHM), datetime.fromtimestamp(int(exp), UTC)


def decode(secret: str, token: str, typ: str) -> dict[str, Any]:
    """Verify signature, expiry and token type, or 401."""
    try:
        claims: dict[str, Any] = jwt.decode(token, secret, algorithms=[ALGORITHM])
    except jwt.ExpiredSignatureError as exc:
        raise unauthorized("the token has expired", "token-expired") from exc
    except jwt.PyJWTError as exc:
        raise unauthorized("the token is not valid", "invalid-token") from exc
    if claims.get("typ") != typ:
        raise unauthorized(f"a {typ} token is needed here", "invalid-token")
    return claims


def bearer(header: str | None) -> str:
    """The token from an `Authorization: Bearer ...` header, or 401."""
    if not header:
        raise unauthorized("this endpoint needs Authorization: Bearer <token>")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("use Authorization: Bearer <token>")
    return token.strip()
