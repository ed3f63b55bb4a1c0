"""`vserver`: start the server, import organizations, users and nodes, upgrade, back up and restore."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import ValidationError

from vfed.server import db
from vfed.server.config import (
    DEFAULT_METRICS_PORT,
    ConfigError,
    MetricsSettings,
    Settings,
    format_validation_error,
    load_settings,
)

_config = click.option("--config", "config", type=click.Path(path_type=Path), help="YAML config file")
_data_dir = click.option("--data-dir", type=click.Path(path_type=Path), help="SQLite and blobs folder")


if TYPE_CHECKING:
    from vfed.server.backup import Summary


def _fail(message: str) -> None:
    """A runtime failure: one line, exit code 1 (2 is click's, for usage errors)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _settings(config: Path | None, generate_secret: bool = True, **overrides: Any) -> Settings:
    """Settings from the file, the environment (VFED_SERVER__...) and the flags in `overrides`."""
    try:
        settings = load_settings(config, **overrides)
    except ConfigError as exc:
        _fail(str(exc))
        raise
    if generate_secret and "jwt_secret" not in settings.model_fields_set:
        try:
            secret = _stable_secret(settings.data_dir)
        except OSError as exc:
            _fail(f"{exc.filename or settings.data_dir}: {exc.strerror or exc}")
            raise
        settings = settings.model_copy(update={"jwt_secret": secret})
    return settings


def _stable_secret(data_dir: Path) -> str:
    """Without a configured secret, keep one in the data folder so tokens survive restarts."""
    path = data_dir / "jwt_secret"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret)
    return secret


@click.group(epilog="Exit codes: 0 success, 1 failure, 2 usage error.")
@click.version_option(package_name="vfed", prog_name="vserver")
@click.option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING, ERROR")
def main(log_level: str) -> None:
    """vfed central server."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@_config
@click.option("--host", help="address to listen on (default 127.0.0.1)")
@click.option("--port", type=int, help="port (default 7600)")
@_data_dir
@click.option(
    "--insecure-http",
    is_flag=True,
    help="serve plain HTTP on an address other machines reach (refused without it: configure tls.*)",
)
@click.option("--upgrade", is_flag=True, help="migrate an older database schema first (vserver db upgrade)")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    help="server processes sharing the port (default 1, or `workers` in the config); more than 1 needs "
    "PostgreSQL",
)
def start(
    config: Path | None,
    host: str | None,
    port: int | None,
    data_dir: Path | None,
    insecure_http: bool,
    upgrade: bool,
    workers: int | None,
) -> None:
    """Run the server (with an embedded MQTT broker on loopback unless a broker URL is configured); HTTPS
    with tls.cert_file and tls.key_file (reloaded on SIGHUP). With --workers N, N processes serve the port
    (PostgreSQL only; docs/deployment.md "Several server processes").

    On a database schema older than the code it refuses to serve unless --upgrade (or auto_migrate: true)."""
    from vfed.server.app import create_app
    from vfed.server.blobs import BlobStoreError
    from vfed.server.metrics import read_token

    settings = _settings(
        config, host=host, port=port, data_dir=data_dir, auto_migrate=upgrade or None, workers=workers
    )
    if settings.mqtt.url is None:
        settings.mqtt.embedded_broker = True
    try:
        if "port" not in settings.metrics.model_fields_set:  # a config's `metrics.port: null` means none
            metrics = {**settings.metrics.model_dump(), "port": DEFAULT_METRICS_PORT}
            settings.metrics = MetricsSettings.model_validate(metrics)
        read_token(settings.metrics)  # a token file that cannot be used fails here, in one line
    except ValidationError as exc:
        _fail(format_validation_error(exc))
    except ConfigError as exc:
        _fail(str(exc))
    from vfed.server.serve import serve
    from vfed.server.tls import ServerTls, TlsError, plain_http_refusal

    refusal = plain_http_refusal(settings, insecure_http)
    if refusal is not None:
        _fail(refusal)
    try:
        tls = ServerTls.from_settings(settings.tls)
    except TlsError as exc:
        _fail(str(exc))
        return
    if settings.workers > 1:
        _start_workers(settings)
        return
    try:
        asyncio.run(serve(create_app(settings), settings.host, settings.port, settings.limits, tls))
    except (db.DatabaseError, BlobStoreError) as exc:
        _fail(str(exc))
    except OSError as exc:
        if exc.filename:  # the data folder or blob folder, before the listener
            _fail(f"{exc.filename}: {exc.strerror or exc}")
        _fail(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}")


def _start_workers(settings: Settings) -> None:
    from vfed.server.workers import WorkersError, run_workers

    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    try:
        run_workers(settings, settings.workers, level)
    except (WorkersError, db.DatabaseError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{exc.filename or settings.data_dir}: {exc.strerror or exc}")


@main.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@_config
@_data_dir
def import_(file: Path, config: Path | None, data_dir: Path | None) -> None:
    """Create organizations, collaborations, users and nodes from FILE (prints new node API keys once)."""
    from vfed.server.importer import read_import_file

    settings = _settings(config, data_dir=data_dir)
    try:
        spec = read_import_file(file)
        lines = asyncio.run(_import(settings, spec))
    except (ConfigError, db.DatabaseError) as exc:
        _fail(str(exc))
        return
    except OSError as exc:
        _fail(f"{exc.filename or settings.data_dir}: {exc.strerror or exc}")
        return
    for line in lines:
        click.echo(line)


async def _import(settings: Settings, spec: Any) -> list[str]:
    from vfed.server.importer import run_import

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = db.open_engine(settings.db_url())
    try:
        await db.prepare(engine, upgrade_schema=True)
        async with db.make_sessionmaker(engine)() as s:
            return await run_import(s, spec)
    finally:
        await engine.dispose()


@main.group("db")
def db_group() -> None:
    """Database maintenance."""


@db_group.command()
@_config
@_data_dir
def upgrade(config: Path | None, data_dir: Path | None) -> None:
    """Bring the database schema to the newest version."""
    settings = _settings(config, data_dir=data_dir)

    async def run() -> None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = db.open_engine(settings.db_url())
        try:
            await db.prepare(engine, upgrade_schema=True)
        finally:
            await engine.dispose()

    try:
        asyncio.run(run())
    except db.DatabaseError as exc:
        _fail(str(exc))
    except OSError as exc:
        where = exc.filename or "the database"
        _fail(f"{where}: {exc.strerror or exc}")
    click.echo("database schema is up to date")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@_config
@_data_dir
@click.option("--blobs-only", is_flag=True, help="leave the database out (PostgreSQL: pg_dump it yourself)")
def backup(archive: Path, config: Path | None, data_dir: Path | None, blobs_only: bool) -> None:
    """Write ARCHIVE (.tar.gz): a consistent copy of the SQLite database, the blobs and the JWT secret.

    Safe while the server runs. PostgreSQL: `pg_dump -Fc`, then `vserver backup --blobs-only`."""
    from vfed.server.backup import backup as run_backup

    settings = _settings(config, generate_secret=False, data_dir=data_dir)
    summary = _archive_step(archive, lambda: run_backup(settings, archive, blobs_only=blobs_only))
    what = "database and " if summary.database else ""
    click.echo(f"{archive}: {what}{summary.blobs} blob files")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@_config
@_data_dir
@click.option("--force", is_flag=True, help="replace the database and blobs of a data folder in use")
def restore(archive: Path, config: Path | None, data_dir: Path | None, force: bool) -> None:
    """Unpack ARCHIVE (from `vserver backup`) into the configured data folder (stop the server first).

    A data folder that is not empty is refused unless --force."""
    from vfed.server.backup import restore as run_restore

    settings = _settings(config, generate_secret=False, data_dir=data_dir)
    summary = _archive_step(archive, lambda: run_restore(settings, archive, force=force))
    what = "database and " if summary.database else ""
    click.echo(f"restored {what}{summary.blobs} blob files into {settings.data_dir}")


def _archive_step(archive: Path, step: Callable[[], Summary]) -> Summary:
    """`vserver backup` / `restore`'s work; a failure is one line naming the archive or file (exit 1)."""
    from vfed.server.backup import BackupError

    try:
        return step()
    except BackupError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{exc.filename or archive}: {exc.strerror or exc}")
    raise AssertionError("unreachable: _fail exits")


def _add_tls() -> None:
    from vfed.server.cli_tls import tls

    main.add_command(tls)


_add_tls()


def _add_admin() -> None:
    from vfed.server.cli_admin import register

    register(main)


_add_admin()


@main.group("broker")
def broker_group() -> None:
    """The production MQTT broker (Mosquitto): configuration, per-node passwords, ACLs."""


@broker_group.command("config")
@_config
@_data_dir
@click.option("--dir", "folder", type=click.Path(path_type=Path, file_okay=False), help="[mqtt.broker_dir]")
@click.option("--listen", default="0.0.0.0", show_default=True, help="HOST[:PORT] (8883; 1883 if plain)")
@click.option("--cert-file", type=click.Path(path_type=Path, dir_okay=False), help="listener certificate")
@click.option("--key-file", type=click.Path(path_type=Path, dir_okay=False), help="its private key")
@click.option("--insecure-plain", is_flag=True, help="no TLS (a broker on loopback or a network you trust)")
@click.option("--run-as", help="the account Mosquitto runs as: it must read the files vserver rewrites [you]")
def broker_config(
    config: Path | None,
    data_dir: Path | None,
    folder: Path | None,
    listen: str,
    cert_file: Path | None,
    key_file: Path | None,
    insecure_plain: bool,
    run_as: str | None,
) -> None:
    """Write mosquitto.conf, its password file and its ACL file; the server keeps the last two current."""
    from vfed.server.broker_config import broker_config as write

    settings = _settings(config, data_dir=data_dir)
    try:
        lines = write(settings, folder, listen, cert_file, key_file, insecure_plain, run_as)
    except ConfigError as exc:
        _fail(str(exc))
        return
    except OSError as exc:
        _fail(f"cannot write the broker files: {exc}")
        return
    for line in lines:
        click.echo(line)


if __name__ == "__main__":
    main()
