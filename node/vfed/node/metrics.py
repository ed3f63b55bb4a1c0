"""The agent's Prometheus metrics and the small local HTTP endpoint that serves them.

The endpoint is off unless `metrics_port` is set, listens on `metrics_host` (loopback by default: nothing to
hand out, and no other machine reaches it; algorithms have no network at all), and wants a bearer token when
`metrics_token_file` is set (required for an address that is not loopback: vfed.node.config)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from vfed.common.secret_file import bearer_matches


class NodeMetrics:
    """One registry per agent, so several agents in one test process do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.runs = Counter(
            "vnode_runs", "Runs finished, by final status", ["status"], registry=self.registry
        )
        self.active = Gauge("vnode_runs_active", "Runs with a container now", registry=self.registry)
        self.start_latency = Histogram(
            "vnode_container_start_seconds",
            "From claim to container started",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30),
            registry=self.registry,
        )
        self.bytes_down = Counter("vnode_bytes_down", "Blob bytes downloaded", registry=self.registry)
        self.bytes_up = Counter("vnode_bytes_up", "Blob bytes uploaded", registry=self.registry)
        self.doorbells = Counter("vnode_doorbells", "Doorbell messages received", registry=self.registry)
        self.trust_refusals = Counter(
            "vfed_node_trust_refusals",
            "Runs refused because what the server handed over did not verify, by reason code",
            ["reason"],
            registry=self.registry,
        )
        self.key_reloads = Counter(
            "vnode_key_reloads", "Organization key file changes picked up", registry=self.registry
        )
        self.ledger_forks = Counter(
            "vfed_node_ledger_forks",
            "Ledger heads met that are not on this node's verified chain (different histories shown)",
            registry=self.registry,
        )
        self.lease_refusals = Counter(
            "vfed_node_lease_refusals", "Runs refused for want of a valid lease", registry=self.registry
        )
        self.leases_expiring = Gauge(
            "vfed_node_leases_expiring",
            "Active leases on this organization's datasets that expire within 7 days",
            registry=self.registry,
        )
        self.ledger_length = Gauge(
            "vfed_node_ledger_length",
            "Entries of the collaboration's ledger verified here",
            registry=self.registry,
        )
        self.lease_kills = Counter(
            "vfed_node_lease_kills",
            "Runs killed because a lease they used was revoked or expired, by reason code",
            ["reason"],
            registry=self.registry,
        )
        self.receipts_queued = Gauge(
            "vfed_node_receipts_queued", "Run receipts not yet accepted by the ledger", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def metrics_app(metrics: NodeMetrics, token: str | None = None) -> web.Application:
    """`GET /metrics` in the Prometheus text format (with this bearer token, if given); nothing else."""

    async def handler(request: web.Request) -> web.Response:
        if token is not None and not bearer_matches(request.headers.get("Authorization"), token):
            return web.json_response(
                {
                    "error": "unauthorized",
                    "detail": "metrics need `Authorization: Bearer <metrics_token_file>`",
                },
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        response = web.Response(body=metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/metrics", handler)
    return app


async def serve_metrics(
    metrics: NodeMetrics, host: str, port: int, token: str | None = None
) -> tuple[web.AppRunner, int]:
    """Start the endpoint; port 0 picks a free one, returned with the runner (cleanup() stops it)."""
    runner = web.AppRunner(metrics_app(metrics, token), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, int(bound)
