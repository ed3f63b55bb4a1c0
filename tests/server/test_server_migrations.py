"""The migrations and the models describe the same schema, on SQLite and on real PostgreSQL.

A model change without a migration (or a migration edited by hand) would let a fresh test database, built
from the migrations, differ from what the code expects; this catches it the way `alembic check` would.
Downgrading to nothing and upgrading again proves each migration's `downgrade()` undoes its `upgrade()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from vfed.server.db import alembic_config, make_engine, upgrade
from vfed.server.models import Base


def _drift(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names()) - {"alembic_version"}


def _version(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _downgrade_to_base(connection: Connection) -> None:
    command.downgrade(alembic_config(connection), "base")


async def _check(url: str) -> None:
    engine = make_engine(url)
    try:
        await upgrade(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_drift) == []
            assert await conn.run_sync(_tables) == set(Base.metadata.tables)
            head = ScriptDirectory.from_config(alembic_config()).get_current_head()
            assert await conn.run_sync(_version) == head
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade_to_base)
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) == set()
        await upgrade(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_drift) == []
    finally:
        await engine.dispose()


async def test_migrations_match_models_sqlite(tmp_path: Path) -> None:
    await _check(f"sqlite+aiosqlite:///{tmp_path / 'vfed.db'}")


@pytest.mark.postgres
async def test_migrations_match_models_postgres(postgres_url: str) -> None:
    await _check(postgres_url)
