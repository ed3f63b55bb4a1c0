"""Prometheus metrics, one registry per app (no module globals), the middleware that counts requests, and who
may read them: the metrics listener of its own (`metrics.host:metrics.port`, loopback by default) and, with a
bearer token (`metrics.token_file`), `/metrics` on the API port."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.multiprocess import MultiProcessCollector

from vfed.common.secret_file import SecretFileError, bearer_matches, read_secret_file
from vfed.server.config import ConfigError, MetricsSettings
from vfed.server.errors import Handler, error_middleware, forbidden, unauthorized

log = logging.getLogger(__name__)
TOKEN_MIN_LENGTH = 16
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's: values go to files shared by the workers


class Metrics:
    """Requests by route and status, runs by status, blob bytes in and out, doorbell messages, ledger
    appends by kind."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vserver_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.blob_bytes_in = Counter("vserver_blob_bytes_in", "blob bytes received", registry=self.registry)
        self.blob_bytes_out = Counter("vserver_blob_bytes_out", "blob bytes sent", registry=self.registry)
        self.runs = Gauge(  # set from the database at each scrape: the latest scrape's counts are the truth
            "vserver_runs",
            "runs by status",
            ["status"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.doorbell = Counter(
            "vserver_doorbell_messages", "doorbell messages", ["outcome"], registry=self.registry
        )
        self.ledger_appends = Counter(
            "vserver_ledger_appends", "entries appended to ledgers", ["kind"], registry=self.registry
        )
        self.task_waiters = Gauge(
            "vserver_task_waiters",
            "open task long polls",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self._request_counters: dict[tuple[str, str, int], Counter] = {}

    def exposition(self) -> CollectorRegistry:
        """What a scrape answers: this registry, or with several worker processes (vfed.server.workers sets
        PROMETHEUS_MULTIPROC_DIR) every live worker's values summed, whichever worker is asked."""
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return registry
        return self.registry

    def count_request(self, method: str, route: str, status: int) -> None:
        """One answered request; the labelled child is looked up once per label set, not per request."""
        key = (method, route, status)
        child = self._request_counters.get(key)
        if child is None:
            child = self._request_counters[key] = self.requests.labels(method, route, str(status))
        child.inc()


METRICS = web.AppKey("metrics", Metrics)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every answer by its route template (not the raw path, so labels stay few)."""
    response = await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    request.app[METRICS].count_request(request.method, route, response.status)
    return response


@dataclass
class MetricsAccess:
    """The token read at start (None: none configured), and the metrics listener's address once it listens."""

    token: str | None = None
    address: tuple[str, int] | None = None


METRICS_ACCESS = web.AppKey("metrics_access", MetricsAccess)


def read_token(settings: MetricsSettings) -> str | None:
    """The configured bearer token; a file that cannot be used is a ConfigError naming it."""
    if settings.token_file is None:
        return None
    try:
        token = read_secret_file(settings.token_file, "metrics.token_file", min_length=TOKEN_MIN_LENGTH)
    except SecretFileError as exc:
        raise ConfigError(str(exc)) from None
    return token.strip()


def check_access(request: web.Request, access: MetricsAccess, *, on_api_port: bool) -> None:
    """Raise the JSON refusal unless this request may read the metrics."""
    if access.token is None:
        if not on_api_port:
            return
        raise forbidden(
            "metrics are not served on the API port without a token: scrape the metrics listener "
            "(metrics.host:metrics.port, loopback by default) or configure metrics.token_file"
        )
    if not bearer_matches(request.headers.get("Authorization"), access.token):
        raise unauthorized("metrics need `Authorization: Bearer <the token in metrics.token_file>`")


Scrape = Callable[[web.Application], Awaitable[web.Response]]


def listener_app(api: web.Application, scrape: Scrape) -> web.Application:
    """The metrics listener: `GET /metrics` and nothing else, answered from the API app's registry."""

    async def handler(request: web.Request) -> web.Response:
        check_access(request, api[METRICS_ACCESS], on_api_port=False)
        return await scrape(api)

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/metrics", handler)
    return app


def metrics_listener(
    settings: MetricsSettings, scrape: Scrape, *, reuse_port: bool = False
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: read the token, then serve the listener while the API app runs. A listener that
    cannot bind (port in use) is logged and the server serves on without it. With `reuse_port` every worker
    process listens on the port (each answers with all workers' values)."""

    async def context(api: web.Application) -> AsyncIterator[None]:
        access = api[METRICS_ACCESS]
        access.token = read_token(settings)
        runner: web.AppRunner | None = None
        if settings.port is not None:
            runner = web.AppRunner(listener_app(api, scrape), access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port or None)
            try:
                await site.start()
            except OSError as exc:
                log.error(
                    "metrics listener could not start on %s:%s (%s; port in use?): no metrics there. Set "
                    "metrics.port (null: no listener) or metrics.token_file to scrape the API port.",
                    settings.host,
                    settings.port,
                    exc.strerror or exc,
                )
                await runner.cleanup()
                runner = None
            else:
                sockets = getattr(site._server, "sockets", None) or []
                port = int(sockets[0].getsockname()[1]) if sockets else settings.port
                access.address = (settings.host, port)
                log.info("metrics on http://%s:%s/metrics", settings.host, port)
        yield
        if runner is not None:
            await runner.cleanup()

    return context
