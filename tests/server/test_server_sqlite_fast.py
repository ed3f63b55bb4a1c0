"""sqlite_fast: a first write tried on the loop falls back to the worker thread when another connection
holds the write lock, so it waits there (the loop stays free) instead of failing or blocking the loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import text

from vfed.server import db


async def test_first_write_waits_off_the_loop_when_the_lock_is_taken(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite+aiosqlite:///{tmp_path / 'lock.sqlite'}")
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (who TEXT)"))
        async with engine.connect() as holder:
            await holder.execute(text("INSERT INTO t VALUES ('holder')"))  # holds the write lock

            async def second() -> None:
                async with engine.connect() as other:
                    await other.execute(text("INSERT INTO t VALUES ('second')"))
                    await other.commit()

            waiting = asyncio.create_task(second())
            for _ in range(20):  # the loop keeps running while the second writer waits for the lock
                await asyncio.sleep(0.01)
            assert not waiting.done()
            await holder.commit()
        await asyncio.wait_for(waiting, 30)
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT who FROM t ORDER BY rowid"))).scalars().all()
        assert rows == ["holder", "second"]
    finally:
        await engine.dispose()
