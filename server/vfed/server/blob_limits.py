"""Per-organization blob quotas and the body read timeout of uploads (docs/security.md "Limits").

An organization's usage is what its stored blobs take (one indexed SUM) plus what its uploads in progress have
written so far (counted here, in memory): several parallel uploads cannot together pass the quota. Past it the
upload stops at once and nothing is kept; other organizations are not affected.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from vfed.server.config import LimitsSettings
from vfed.server.errors import ApiError
from vfed.server.models import Blob


class QuotaExceeded(Exception):
    """An upload went past its organization's quota; the ApiError to answer is attached."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.detail)
        self.error = error


@dataclass
class _InFlight:
    uploads: int = 0
    bytes: int = 0


@dataclass
class Usage:
    """Uploads in progress per organization (one server process; see docs for several)."""

    in_flight: dict[int, _InFlight] = field(default_factory=dict)


USAGE = web.AppKey("blob_usage", Usage)


def quota_error(status: int, org_id: int, what: str, limit: int) -> ApiError:
    return ApiError(
        status,
        "quota-exceeded",
        f"organization {org_id} has reached its blob quota of {limit} {what}; blobs no run uses are "
        "removed after a while, or ask the server's operator for more",
    )


async def stored(s: AsyncSession, org_id: int) -> tuple[int, int]:
    """(count, bytes) of the organization's stored blobs."""
    row = (
        await s.execute(
            select(func.count(), func.coalesce(func.sum(Blob.size), 0)).where(
                Blob.owner_organization_id == org_id
            )
        )
    ).one()
    return int(row[0]), int(row[1])


class Upload:
    """One upload counted against its organization: `chunks` meters the body (and times its reads)."""

    def __init__(self, usage: Usage, limits: LimitsSettings, org_id: int, count: int, size: int) -> None:
        self._limits = limits
        self._org_id = org_id
        self._base_bytes = size
        self._flight = usage.in_flight.setdefault(org_id, _InFlight())
        if count + self._flight.uploads >= limits.blob_quota_count:
            raise QuotaExceeded(quota_error(429, org_id, "blobs", limits.blob_quota_count))
        self._flight.uploads += 1
        self._mine = 0

    async def chunks(self, source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        limit = self._limits.blob_quota_bytes
        while True:
            try:
                async with asyncio.timeout(self._limits.body_timeout_s):
                    chunk = await anext(source)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise ApiError(
                    408,
                    "body-timeout",
                    f"no body bytes for {self._limits.body_timeout_s} s; the upload was dropped",
                ) from None
            self._mine += len(chunk)
            self._flight.bytes += len(chunk)
            if self._base_bytes + self._flight.bytes > limit:
                raise QuotaExceeded(quota_error(413, self._org_id, "bytes", limit))
            yield chunk

    def release(self) -> None:
        self._flight.uploads -= 1
        self._flight.bytes -= self._mine
