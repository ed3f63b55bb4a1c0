"""Typed application keys for shared resources (no module globals)."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from vfed.server.auth import Principal
from vfed.server.blobs import BlobStore
from vfed.server.config import Settings
from vfed.server.doorbell import Doorbell
from vfed.server.presence import Presence

SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", AsyncEngine)
SESSIONS = web.AppKey("sessions", async_sessionmaker[AsyncSession])
BLOBS = web.AppKey("blobs", BlobStore)
DOORBELL = web.AppKey("doorbell", Doorbell)
PRESENCE = web.AppKey("presence", Presence)
# (kind, id) -> (monotonic expiry, principal): saves the account lookups on every request for a few seconds
PRINCIPALS = web.AppKey("principals", dict[tuple[str, int], tuple[float, Principal]])
