"""asyncpg_transaction on a pool: the query is also cancelled with
``pg_cancel_backend()`` over an idle pooled connection (one round trip, no
forked process), besides asyncpg's CancelRequest; never with the pool
exhausted, never hitting the next user of the connection (issue 12, cascade
speed; bench/bench_cascade.py)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

import pytest

import ctxmiddleware
from ctxmiddleware import Canceled, background, with_cancel
from ctxmiddleware._integrations import _postgres

pytestmark = pytest.mark.timeout(60)

DSN = os.environ.get("CTXTEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="module", autouse=True)
def _pg() -> None:
    try:
        import asyncpg  # noqa: F401
        import psycopg

        with psycopg.connect(DSN, connect_timeout=3, autocommit=True):
            pass
    except Exception as exc:
        pytest.skip(f"PostgreSQL not reachable at {DSN}: {exc!r}")


def _active(tag: str) -> bool:
    import psycopg

    with psycopg.connect(DSN, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s"
            " AND pid <> pg_backend_pid()",
            [f"%-- {tag}"],
        ).fetchone()
    return bool(row and row[0])


async def _cancel_one(pool: Any, tag: str) -> float:
    """Run pg_sleep in the helper, cancel its context; the seconds until the
    helper raised."""
    ctx, cancel = with_cancel(background())
    started = asyncio.Event()

    async def work() -> None:
        async with ctxmiddleware.asyncpg_transaction(pool, ctx) as conn:
            started.set()
            await conn.execute(f"SELECT pg_sleep(30) -- {tag}")

    task = asyncio.create_task(work())
    await started.wait()
    await asyncio.sleep(0.05)  # the query is running
    t0 = time.monotonic()
    cancel()
    with pytest.raises(Canceled):
        await task
    return time.monotonic() - t0


def test_side_cancel_runs_and_the_pool_stays_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncpg

    used: list[int] = []
    original = _postgres._PoolSideCancel._cancel

    async def spy(self: Any, pid: int) -> None:
        used.append(pid)
        await original(self, pid)

    monkeypatch.setattr(_postgres._PoolSideCancel, "_cancel", spy)

    async def main() -> None:
        pool = await asyncpg.create_pool(DSN, min_size=2, max_size=2)
        try:
            for i in range(10):
                tag = f"side-{uuid.uuid4().hex}-{i}"
                await _cancel_one(pool, tag)
                assert not _active(tag)
                # Both connections are reused at once: no late cancel hits them.
                async def short() -> int:
                    async with ctxmiddleware.asyncpg_transaction(pool) as conn:
                        return int(await conn.fetchval("SELECT 1 FROM pg_sleep(0.02)"))

                assert await asyncio.gather(short(), short()) == [1, 1]
        finally:
            await pool.close()

    asyncio.run(main())
    assert len(used) == 10


def test_no_side_cancel_with_the_pool_exhausted(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncpg

    used: list[int] = []
    monkeypatch.setattr(
        _postgres._PoolSideCancel, "_cancel", lambda self, pid: used.append(pid)
    )

    async def main() -> None:
        pool = await asyncpg.create_pool(DSN, min_size=1, max_size=1)
        try:
            tag = f"exhausted-{uuid.uuid4().hex}"
            await _cancel_one(pool, tag)  # asyncpg's own CancelRequest still ends it
            assert not _active(tag)
            async with ctxmiddleware.asyncpg_transaction(pool) as conn:
                assert await conn.fetchval("SELECT 1") == 1
        finally:
            await pool.close()

    asyncio.run(main())
    assert used == []


def test_no_side_cancel_when_no_query_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled between queries (the handler awaits something else): nothing
    to cancel on the server, no pg_cancel_backend."""
    import asyncpg

    used: list[int] = []
    monkeypatch.setattr(
        _postgres._PoolSideCancel, "_cancel", lambda self, pid: used.append(pid)
    )

    async def main() -> None:
        pool = await asyncpg.create_pool(DSN, min_size=2, max_size=2)
        try:
            ctx, cancel = with_cancel(background())

            async def work() -> None:
                async with ctxmiddleware.asyncpg_transaction(pool, ctx) as conn:
                    await conn.execute("SELECT 1")
                    await asyncio.sleep(30)

            task = asyncio.create_task(work())
            await asyncio.sleep(0.1)
            cancel()
            with pytest.raises(Canceled):
                await task
        finally:
            await pool.close()

    asyncio.run(main())
    assert used == []
