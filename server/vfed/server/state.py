"""Typed application keys for shared resources (no module globals)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from vfed.server.auth import Principal
from vfed.server.blobs import BlobStore
from vfed.server.config import Settings
from vfed.server.doorbell import Doorbell
from vfed.server.ledger_store import LedgerStates
from vfed.server.pg_events import PgEvents
from vfed.server.presence import Presence
from vfed.server.task_events import TaskEvents

SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", AsyncEngine)
SESSIONS = web.AppKey("sessions", async_sessionmaker[AsyncSession])
BLOBS = web.AppKey("blobs", BlobStore)
DOORBELL = web.AppKey("doorbell", Doorbell)
PRESENCE = web.AppKey("presence", Presence)
TASK_EVENTS = web.AppKey("task_events", TaskEvents)
LEDGER_STATES = web.AppKey("ledger_states", LedgerStates)
PG_EVENTS = web.AppKey("pg_events", PgEvents)  # only on PostgreSQL
# (kind, id) -> (monotonic expiry, principal): saves the account lookups on every request for a few seconds
# access token -> its verified claims: a token's signature is checked once, its expiry on every request
TOKENS = web.AppKey("tokens", dict[str, dict[str, Any]])
PRINCIPALS = web.AppKey("principals", dict[tuple[str, int], tuple[float, Principal]])
