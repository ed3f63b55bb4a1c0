

class DatabaseError(Exception):
    """The database cannot be used: a driver that is not installed, a server that does not answer, a schema
    this code does not match. The message is one line for the operator, saying what to do."""


# SQLAlchemy driver (the `+name` of a URL, or a dialect's default) -> how to get it
_DRIVER_INSTALL = {
    "asyncpg": "pip install 'vfed[postgres]'",
    "aiosqlite": "pip install vfed (aiosqlite is one of its dependencies)",
}
SUPPORTED = "sqlite+aiosqlite:// or postgresql+asyncpg://"


def safe_url(url: str) -> str:
    """The URL for messages: the password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<not a database URL>"


def open_engine(url: str) -> AsyncEngine:
    """make_engine, with a URL that cannot work (bad form, a driver not installed, a synchronous driver)
    refused in one line that names what to install or write instead."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"database_url is not a database URL (e.g. {SUPPORTED})") from None
    try:
        return make_engine(url)
    except NoSuchModuleError:
        raise DatabaseError(
            f"database_url {safe_url(url)}: no SQLAlchemy dialect {parsed.drivername!r} is installed; "
            f"vfed supports {SUPPORTED}"
        ) from None
    except ImportError as exc:
        module = (exc.name or str(exc)).split(".")[0]
        install = _DRIVER_INSTALL.get(module, f"pip install {module}; vfed is tested with {SUPPORTED}")
        if parsed.get_backend_name() == "postgresql" and module != "asyncpg":
            install = f"pip install {module}, or write postgresql+asyncpg:// and pip install 'vfed[postgres]'"
        raise DatabaseError(
            f"database_url {safe_url(url)}: its driver {module} is not installed ({install})"
        ) from None
    except InvalidRequestError as exc:  # "The asyncio extension requires an async driver"
        raise DatabaseError(
            f"database_url {safe_url(url)}: {parsed.get_driver_name()} is not an asyncio driver; write "
            f"{SUPPORTED} ({exc})"
        ) from None


def _schema_state(connection: Connection) -> tuple[str | None, bool]:
    """(the stored revision, whether any other table exists)."""
    revision = MigrationContext.configure(connection).get_current_revision()
    tables = set(inspect(connection).get_table_names()) - {"alembic_version"}
    return revision, bool(tables)


def head_revision() -> str:
    """The newest revision this code knows."""
    return str(ScriptDirectory.from_config(alembic_config()).get_current_head())


async def prepare(engine: AsyncEngine, *, upgrade_schema: bool) -> None:
    """Make sure the schema is the one this code expects before serving.

    An empty database gets the newest schema (nothing to migrate, nothing to lose). An older schema is
    migrated only when asked (`vserver start --upgrade`, `auto_migrate: true`, `vserver db upgrade`):
    migrations may take long and cannot always be undone, so they are the operator's step, run with the
    backup in hand, not a side effect of a restart. A schema newer than the code (a downgraded server) is
    refused either way.
    """
    try:
        async with engine.connect() as conn:
            revision, has_tables = await conn.run_sync(_schema_state)
    except (OSError, DBAPIError, TimeoutError) as exc:
        raise DatabaseError(
            f"the database at {safe_url(str(engine.url))} is unreachable: {_reason(exc)}"
        ) from None
    head = head_revision()
    if revision == head:
        return
    script = ScriptDirectory.from_config(alembic_config())
    if revision is not None and _unknown(script, revision):
        raise DatabaseError(
            f"the database schema is at revision {revision}, newer than this vserver knows (up to {head}): "
            "run the vserver version that wrote it, or restore a backup"
        )
    if revision is None and has_tables:
        raise DatabaseError(
            "the database has tables but no vfed schema revision (alembic_version): point database_url at "
            "a vfed database or an empty one"
        )
    if revision is not None and not upgrade_schema:
        raise DatabaseError(
            f"the database schema is at revision {revision}, this vserver needs {head}: run `vserver db "
            "upgrade` (after a backup: `vserver backup`), or start with `vserver start --upgrade`"
        )
    await upgrade(engine)


def _unknown(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is None
    except CommandError:
        return True


def _reason(exc: BaseException) -> str:
    """A driver's error on one line, without the SQLAlchemy boilerplate around it."""
    inner = getattr(exc, "orig", None) or exc
    text = " ".join(str(inner).split()) or type(inner).__name__
    return text[:300]
