p = "/work/main/server/vfed/server/cli.py"
s = open(p).read()
def rep(old, new):
    global s
    assert s.count(old) == 1, old
    s = s.replace(old, new)
rep('''@click.option("--port", type=int, help="port (default 7600)")
@_data_dir
def start(config: Path | None, host: str | None, port: int | None, data_dir: Path | None) -> None:
    """Run the server (with an embedded MQTT broker on loopback unless a broker URL is configured)."""
    from vfed.server.app import create_app
    from vfed.server.metrics import read_token

    settings = _settings(config, host=host, port=port, data_dir=data_dir)''', '''@click.option("--port", type=int, help="port (default 7600)")
@_data_dir
@click.option("--upgrade", is_flag=True, help="migrate an older database schema first (vserver db upgrade)")
def start(
    config: Path | None, host: str | None, port: int | None, data_dir: Path | None, upgrade: bool
) -> None:
    """Run the server (with an embedded MQTT broker on loopback unless a broker URL is configured).

    On a database schema older than the code it refuses to serve unless --upgrade (or auto_migrate: true)."""
    from vfed.server.app import create_app
    from vfed.server.metrics import read_token

    settings = _settings(config, host=host, port=port, data_dir=data_dir, auto_migrate=upgrade or None)''')
rep('''    try:
        asyncio.run(serve(create_app(settings), settings.host, settings.port, settings.limits))
    except OSError as exc:''', '''    try:
        asyncio.run(serve(create_app(settings), settings.host, settings.port, settings.limits))
    except db.DatabaseError as exc:
        _fail(str(exc))
    except OSError as exc:''')
rep('''    try:
        spec = read_import_file(file)
        lines = asyncio.run(_import(settings, spec))
    except ConfigError as exc:
        _fail(str(exc))
        return''', '''    try:
        spec = read_import_file(file)
        lines = asyncio.run(_import(settings, spec))
    except (ConfigError, db.DatabaseError) as exc:
        _fail(str(exc))
        return''')
rep('''    engine = db.make_engine(settings.db_url())
    try:
        await db.upgrade(engine)
        async with db.make_sessionmaker(engine)() as s:''', '''    engine = db.open_engine(settings.db_url())
    try:
        await db.prepare(engine, upgrade_schema=True)
        async with db.make_sessionmaker(engine)() as s:''')
rep('''    async def run() -> None:
        engine = db.make_engine(settings.db_url())
        try:
            await db.upgrade(engine)
        finally:
            await engine.dispose()

    try:
        asyncio.run(run())
    except OSError as exc:
        _fail(f"cannot reach the database: {exc}")
    click.echo("database schema is up to date")
''', '''    async def run() -> None:
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
        _fail(f"cannot reach the database: {exc}")
    click.echo("database schema is up to date")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@_config
@_data_dir
@click.option("--blobs-only", is_flag=True, help="leave the database out (PostgreSQL: pg_dump it yourself)")
def backup(archive: Path, config: Path | None, data_dir: Path | None, blobs_only: bool) -> None:
    """Write ARCHIVE (.tar.gz): a consistent copy of the SQLite database, the blobs and the JWT secret.

    Safe while the server runs. PostgreSQL: `pg_dump -Fc`, then `vserver backup --blobs-only`."""
    from vfed.server.backup import BackupError
    from vfed.server.backup import backup as run_backup

    settings = _settings(config, data_dir=data_dir)
    try:
        summary = run_backup(settings, archive, blobs_only=blobs_only)
    except (BackupError, OSError) as exc:
        _fail(str(exc))
        return
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
    from vfed.server.backup import BackupError
    from vfed.server.backup import restore as run_restore

    settings = _settings(config, data_dir=data_dir, generate_secret=False)
    try:
        summary = run_restore(settings, archive, force=force)
    except (BackupError, OSError) as exc:
        _fail(str(exc))
        return
    what = "database and " if summary.database else ""
    click.echo(f"restored {what}{summary.blobs} blob files into {settings.data_dir}")
''')
rep('''def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        settings = load_settings(config, **overrides)
    except ConfigError as exc:
        _fail(str(exc))
        raise
    if "jwt_secret" not in settings.model_fields_set:''', '''def _settings(config: Path | None, generate_secret: bool = True, **overrides: Any) -> Settings:
    try:
        settings = load_settings(config, **overrides)
    except ConfigError as exc:
        _fail(str(exc))
        raise
    if generate_secret and "jwt_secret" not in settings.model_fields_set:''')
open(p, "w").write(s)
print("server cli patched")
