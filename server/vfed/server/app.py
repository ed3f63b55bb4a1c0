"""The app factory: settings in, a ready aiohttp application out; resources live in cleanup contexts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Middleware

from vfed.common.slow_clients import head_middleware
from vfed.server import blob_collector, db
from vfed.server.api.meta import DOCS_HTML, OPENAPI, scrape
from vfed.server.api.tokens import DUMMY_HASH
from vfed.server.api.uploads import UPLOADS
from vfed.server.blob_limits import USAGE, Usage
from vfed.server.blobs import BlobStore, BlobStoreError, FileBlobStore
from vfed.server.broker_auth import BROKER, BrokerAccounts
from vfed.server.config import Settings
from vfed.server.doorbell import Doorbell
from vfed.server.embedded import EmbeddedBroker, start_embedded
from vfed.server.errors import error_middleware
from vfed.server.ledger_store import LedgerStates
from vfed.server.metrics import (
    METRICS,
    METRICS_ACCESS,
    Metrics,
    MetricsAccess,
    metrics_listener,
    metrics_middleware,
)
from vfed.server.openapi import build_docs_html, build_openapi
from vfed.server.pg_events import PgEvents, new_origin
from vfed.server.presence import Presence
from vfed.server.routes import add_routes
from vfed.server.state import (
    BLOBS,
    DOORBELL,
    ENGINE,
    LEDGER_STATES,
    PG_EVENTS,
    PRESENCE,
    PRINCIPALS,
    SESSIONS,
    SETTINGS,
    TASK_EVENTS,
    TOKENS,
)
from vfed.server.task_events import TaskEvents
from vfed.server.throttle import THROTTLES, LoginThrottles
from vfed.server.tls import proxy_only_middleware

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> web.Application:
    """Build the server application; nothing touches disk, database or network until it starts."""
    middlewares: list[Middleware] = [head_middleware, metrics_middleware, error_middleware]  # slow_clients.py
    if settings.tls.terminated_by == "proxy":  # plain HTTP from anyone but the TLS proxy: refused (tls.py)
        middlewares.insert(1, proxy_only_middleware(settings.trusted_proxies))
    app = web.Application(middlewares=middlewares, client_max_size=4 * 1024 * 1024)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[METRICS_ACCESS] = MetricsAccess()
    app[PRESENCE] = Presence()
    app[PRINCIPALS] = {}
    app[TOKENS] = {}
    app[TASK_EVENTS] = TaskEvents()
    app[LEDGER_STATES] = LedgerStates()
    app[DUMMY_HASH] = []
    app[THROTTLES] = LoginThrottles.from_settings(settings.login)
    app[BLOBS] = blob_store(settings)
    app[BROKER] = BrokerAccounts.from_settings(settings)
    app[USAGE] = Usage()
    app[UPLOADS] = {}
    app[OPENAPI] = build_openapi()
    app[DOCS_HTML] = build_docs_html()
    add_routes(app)
    app.cleanup_ctx.append(_blobs)
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_doorbell)
    app.cleanup_ctx.append(blob_collector.collector)
    listener = metrics_listener(settings.metrics, scrape, reuse_port=settings.workers > 1)
    app.cleanup_ctx.append(listener)  # once the database is there
    return app


def blob_store(settings: Settings) -> BlobStore:
    """The configured blob store (no I/O yet); BlobStoreError when S3 has no credentials."""
    if settings.blobs.backend == "s3":
        assert settings.blobs.s3 is not None  # BlobsSettings requires it with backend s3
        try:
            from vfed.server.blobs_s3 import S3BlobStore  # the S3 client loads only when configured
        except ImportError as exc:
            raise BlobStoreError(
                f"blobs.backend s3 needs the {exc.name or 'minio'} package: pip install 'vfed[s3]'"
            ) from None
        return S3BlobStore(settings.blobs.s3, settings.max_blob_bytes)
    return FileBlobStore(settings.blob_path(), settings.max_blob_bytes)


async def _blobs(app: web.Application) -> AsyncIterator[None]:
    """The blob store is checked before anything is served (an S3 bucket that is missing stops the start)."""
    store = app[BLOBS]
    await store.prepare()
    yield
    await store.close()


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = db.open_engine(settings.db_url())  # db.DatabaseError: one line for `vserver start`
    try:
        await db.prepare(engine, upgrade_schema=settings.auto_migrate)
    except BaseException:
        await engine.dispose()
        raise
    app[ENGINE] = engine
    listener: PgEvents | None = None
    origin: str | None = None
    if engine.url.get_backend_name() == "postgresql":  # other server processes may share the database
        origin = new_origin()
        listener = app[PG_EVENTS] = PgEvents(settings.db_url(), app[TASK_EVENTS], origin)
        await listener.start()
    app[SESSIONS] = db.make_sessionmaker(engine, app[TASK_EVENTS], origin)
    await app[PRESENCE].start(app[SESSIONS])
    yield
    await app[PRESENCE].stop(app[SESSIONS])
    if listener is not None:
        await listener.stop()
    await engine.dispose()


async def _doorbell(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    broker: EmbeddedBroker | None = None
    url = settings.mqtt.url
    mqtt = settings.mqtt
    accounts = app[BROKER]
    if accounts.folder is not None:  # our own broker accounts: the files first, then the broker and doorbell
        password = accounts.load_server_password(settings)
        await accounts.sync(app[SESSIONS])
        mqtt = mqtt.model_copy(update={"username": accounts.username, "password": password})
    if url is None and settings.mqtt.embedded_broker:
        broker = await start_embedded(settings.mqtt.embedded_port, accounts.folder)
        url = broker.url if broker is not None else None
    doorbell = Doorbell(mqtt, url, app[METRICS])
    app[DOORBELL] = doorbell
    await doorbell.start()
    yield
    await doorbell.stop()
    if broker is not None:
        await broker.stop()
