"""Domain errors and the middleware that turns every failure into `{"error", "detail"}` JSON."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from sqlalchemy.exc import IntegrityError

from vfed.common.api import errors as api_errors
from vfed.common.api.errors import error_response
from vfed.server.blobs import BlobStoreError

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(api_errors.ApiError):
    """An answer other than success, with a short machine code, a human detail and extra headers."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        headers: dict[str, str] | None = None,
        extra: dict[str, int | str] | None = None,
    ) -> None:
        super().__init__(status, error, detail)
        self.headers = headers or {}
        self.extra = extra or {}


def bad_request(detail: str, error: str = "bad-request") -> ApiError:
    """400: the request itself is wrong."""
    return ApiError(400, error, detail)


def unauthorized(detail: str, error: str = "unauthorized") -> ApiError:
    """401: no or bad credentials."""
    return ApiError(401, error, detail, {"WWW-Authenticate": "Bearer"})


def forbidden(detail: str) -> ApiError:
    """403: known caller, not allowed."""
    return ApiError(403, "forbidden", detail)


def not_found(what: str, ident: object) -> ApiError:
    """404: absent or invisible to this caller (the same answer, so nothing leaks)."""
    return ApiError(404, "not-found", f"{what} {ident} not found")


def conflict(error: str, detail: str) -> ApiError:
    """409: the state of the resource forbids this."""
    return ApiError(409, error, detail)


_HTTP_CODES = {
    404: "not-found",
    405: "method-not-allowed",
    413: "too-large",
    415: "unsupported-media-type",
    400: "bad-request",
}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Catch domain errors, aiohttp's own HTTP errors and bugs; answer JSON always."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.error, exc.detail, exc.headers, exc.extra)
    except BlobStoreError as exc:
        log.warning("blob store failure on %s %s: %s", request.method, request.path, exc)
        return error_response(503, "blob-store-unavailable", str(exc), {"Retry-After": "30"})
    except IntegrityError as exc:
        log.info("integrity conflict on %s %s: %s", request.method, request.path, exc.orig)
        return error_response(409, "conflict", "the change conflicts with existing data (a duplicate?)")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers: dict[str, Any] = {k: v for k, v in exc.headers.items() if k.lower() in {"allow"}}
        code = _HTTP_CODES.get(exc.status, "http-error")
        return error_response(exc.status, code, exc.reason, headers)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal", "the server hit a bug; it is logged")
