"""Health, metrics, doorbell info and the API description."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select

from vfed.common.api.statuses import RunStatus
from vfed.common.netaddr import is_loopback_host
from vfed.server.api.common import json_response, session
from vfed.server.doorbell import TOPIC_PREFIX
from vfed.server.metrics import METRICS, METRICS_ACCESS, check_access
from vfed.server.models import Run
from vfed.server.schemas import DoorbellOut, HealthOut
from vfed.server.state import DOORBELL, SESSIONS, SETTINGS
from vfed.server.throttle import client_address

OPENAPI = web.AppKey("openapi", dict)
DOCS_HTML = web.AppKey("docs_html", str)


def server_version() -> str:
    """The installed package version."""
    try:
        return version("vfed")
    except PackageNotFoundError:
        return "0+unknown"


async def health(request: web.Request) -> web.Response:
    """Liveness plus a database round trip."""
    async with session(request) as s:
        await s.execute(select(1))
    return json_response(HealthOut(status="ok", version=server_version()))


async def doorbell_info(request: web.Request) -> web.Response:
    """Where nodes can listen for doorbells (no secrets: a node's broker password comes with its login).

    `mqtt.public_url` when configured; else the address the server itself uses, except a loopback address
    to a caller that is not on this machine (it would reach its own loopback: better no doorbell, it polls).
    """
    settings = request.app[SETTINGS]
    address = request.app[DOORBELL].address
    url = settings.mqtt.public_url
    if url is None and address is not None:
        caller_local = is_loopback_host(client_address(request, settings.trusted_proxies))
        if caller_local or not is_loopback_host(address.host):
            url = f"{'mqtts' if address.tls else 'mqtt'}://{address.host}:{address.port}"
    return json_response(DoorbellOut(url=url, topic_prefix=TOPIC_PREFIX))


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition on the API port: only with the metrics bearer token (vfed.server.metrics)."""
    check_access(request, request.app[METRICS_ACCESS], on_api_port=True)
    return await scrape(request.app)


async def scrape(app: web.Application) -> web.Response:
    """Prometheus exposition of the API app's registry; runs by status are counted at scrape time."""
    m = app[METRICS]
    async with app[SESSIONS]() as s:
        result = await s.execute(select(Run.status, func.count()).group_by(Run.status))
        rows = {status: count for status, count in result}
    for status in RunStatus:
        m.runs.labels(str(status)).set(rows.get(str(status), 0))
    body = generate_latest(m.exposition())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document, generated from the route table and pydantic models."""
    return web.json_response(request.app[OPENAPI])


async def docs(request: web.Request) -> web.Response:
    """A browsable list of operations (self-contained: no external assets)."""
    return web.Response(text=request.app[DOCS_HTML], content_type="text/html")
