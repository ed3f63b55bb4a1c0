"""Prometheus metrics, one registry per app (no module globals), and the middleware that counts requests."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from vfed.server.errors import Handler


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
        self.runs = Gauge("vserver_runs", "runs by status", ["status"], registry=self.registry)
        self.doorbell = Counter(
            "vserver_doorbell_messages", "doorbell messages", ["outcome"], registry=self.registry
        )
        self.ledger_appends = Counter(
            "vserver_ledger_appends", "entries appended to ledgers", ["kind"], registry=self.registry
        )
        self.task_waiters = Gauge("vserver_task_waiters", "open task long polls", registry=self.registry)
        self._request_counters: dict[tuple[str, str, int], Counter] = {}

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
